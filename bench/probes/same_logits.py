"""Dev logits of three small ablation runs (vanilla, adv+selfcal, transductive), for a before/after check.

Runs `vegalm ablate` on MiniLM-L6 and a slice of RTE with the checkout's own code and prints one JSON line
{combo: {dev_logits_sha256, config_hash}}. Run it in two checkouts (e.g. a `git worktree` of the old commit) and
compare the lines; issue 15 asks for them to be equal on the CPU.

  python bench/probes/same_logits.py --out /tmp/sl-new
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

COMBOS = ("vanilla", "adv+selfcal", "transductive")
# fp32 (the default mixed_precision=no; not spelled out, since 0a14d9f could not parse `no`)
SETTINGS = ["max_train_samples=64", "max_steps=6", "batch_size=16", "max_length=64", "progress=false"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--vegalm", default=str(Path(sys.executable).with_name("vegalm")), help="the vegalm to run")
    ap.add_argument("--glue-dir", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"))
    args = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [args.vegalm, "ablate", "--model", "minilm-l6", "--tasks", "rte", "--seeds", "1", "--tricks",
           ",".join(COMBOS), "--out", args.out, "--results-dir", str(Path(args.out) / "records"),
           f"glue_dir={args.glue_dir}", *SETTINGS]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    digests = {}
    for combo in COMBOS:
        path = Path(args.out) / combo / "rte" / "seed0" / "dev_logits.npy"  # --seeds 1: one seed, seed 0
        key = json.loads((path.parent / "results.json").read_text(encoding="utf-8"))["config_hash"]
        digests[combo] = {"dev_logits_sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16], "config_hash": key}
    print(json.dumps(digests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
