"""One fine-tuning epoch of MiniLM-L6: `vegalm finetune` at its defaults vs transformers' Trainer at run_glue's.

    python bench/finetune.py                 # RTE + MRPC, full train sets, 1 epoch, 5 alternating repeats
    python bench/finetune.py --quick         # 96 train examples per run, 1 repeat (< 3 min on a quiet 2-core machine)
    python bench/finetune.py --ours mixed_precision=bf16   # extra key=value settings for our side

The Trainer side is bench/glue_anchor.py's `hf_side` (run_glue.py defaults: fp32, lr 2e-5, batch 32, every batch
padded to 128 as run_glue.py's `pad_to_max_length` does). Our side is the `vegalm finetune` CLI with no settings but
the epoch count, the subset and `--ours`. Each run is a fresh process with the same OMP_NUM_THREADS; the sides
alternate and swap who goes first. Speed-up = Trainer training seconds / ours (median of the paired ratios). Our
side's Trainer keeps freed memory in glibc's heap on a CPU (train/allocator.py); `--trainer-malloc keep` gives the
Trainer side the same. Both sides train the same number of epochs, so each run's dev score is comparable; with
--quick the subsets are too small for the scores to mean anything.
The last stdout line is one JSON object (speedup_rte, speedup_mrpc, dev_rte, dev_mrpc, dev_trainer_*).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TRAINER_KEEP = "VEGALM_BENCH_TRAINER_KEEP"
HERE = Path(__file__).resolve().parent


def trainer_child(task: str, seed: int, n: int | None, threads: int) -> dict:
    """In a fresh process: glue_anchor's Trainer side for one epoch, batches padded to 128."""
    import torch

    if os.environ.get(TRAINER_KEEP) == "1":  # --trainer-malloc keep: glibc as vegalm's Trainer sets it
        from vegalm.train.allocator import keep_freed_memory

        keep_freed_memory()

    sys.path.insert(0, str(HERE))
    from glue_anchor import hf_side

    torch.set_num_threads(threads)
    args = argparse.Namespace(task=task, seed=seed, model="minilm-l6", glue_dir=None, max_train_samples=n,
                              progress=False, epochs=1, pad_to_max_length=True)
    with tempfile.TemporaryDirectory() as work:
        r = hf_side(args, Path(work))
    return {"train_s": r["train_s"], "dev_score": r["dev_score"], "steps": r["steps"]}


def _run(cmd: list[str], threads: int, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error", **extra}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:4])} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return proc


def run_trainer(task, seed, n, threads, malloc: str) -> dict:
    cmd = [sys.executable, __file__, "--_trainer", task, str(seed), str(n or 0), str(threads)]
    return json.loads(_run(cmd, threads, **{TRAINER_KEEP: "1" if malloc == "keep" else "0"}).stdout.strip()
                      .splitlines()[-1])


def run_ours(task, seed, n, threads, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(Path(sys.executable).parent / "vegalm"), "finetune", "--task", task, "--model", "minilm-l6",
               "--out", out, "epochs=1", f"seed={seed}", "eval_test=false", "save_model=false", "progress=false",
               *([f"max_train_samples={n}"] if n else []), *extra]
        _run(cmd, threads)
        res = json.loads((Path(out) / "results.json").read_text())
    return {"train_s": res["timing"]["train_s"], "dev_score": res["dev_score"], "steps": res["train"]["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="96 train examples, 1 repeat")
    ap.add_argument("--tasks", default="rte,mrpc")
    ap.add_argument("--repeats", type=int, default=None, help="default 5 (full), 1 (--quick)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE", help="extra settings for our side")
    ap.add_argument("--trainer-malloc", choices=("default", "keep"), default="default",
                    help="the Trainer side's glibc malloc: as it starts (what run_glue users get), or keeping freed "
                         "memory as our side's Trainer does on a CPU (train/allocator.py)")
    ap.add_argument("--_trainer", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._trainer:
        task, seed, n, threads = args._trainer
        print(json.dumps(trainer_child(task, int(seed), int(n) or None, int(threads))))
        return
    n = 96 if args.quick else None  # 3 steps of 32: the quick mode times the fixed costs too
    repeats = args.repeats or (1 if args.quick else 5)
    summary = {"threads": args.threads, "repeats": repeats, "max_train_samples": n, "ours_settings": args.ours,
               "trainer_malloc": args.trainer_malloc}
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        pairs = []
        for i in range(repeats):
            order = ("trainer", "ours") if i % 2 == 0 else ("ours", "trainer")
            r = {}
            for side in order:
                r[side] = (run_trainer(task, args.seed, n, args.threads, args.trainer_malloc) if side == "trainer"
                           else run_ours(task, args.seed, n, args.threads, args.ours))
            pairs.append(r)
            print(f"{task} repeat {i + 1}: Trainer {r['trainer']['train_s']:.1f} s ({r['trainer']['steps']} steps, "
                  f"dev {r['trainer']['dev_score']:.2f}) | ours {r['ours']['train_s']:.1f} s "
                  f"({r['ours']['steps']} steps, dev {r['ours']['dev_score']:.2f})", flush=True)
        ratio = statistics.median(p["trainer"]["train_s"] / p["ours"]["train_s"] for p in pairs)
        per_step = statistics.median((p["trainer"]["train_s"] / p["trainer"]["steps"])
                                     / (p["ours"]["train_s"] / p["ours"]["steps"]) for p in pairs)
        summary.update({
            f"speedup_{task}": round(ratio, 3), f"speedup_per_step_{task}": round(per_step, 3),
            f"dev_{task}": round(statistics.median(p["ours"]["dev_score"] for p in pairs), 2),
            f"dev_trainer_{task}": round(statistics.median(p["trainer"]["dev_score"] for p in pairs), 2),
            f"train_s_{task}": {s: [p[s]["train_s"] for p in pairs] for s in ("trainer", "ours")},
        })  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
