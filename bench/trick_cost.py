"""Per-step cost of each fine-tuning trick relative to vanilla, same batches, one process.

    python bench/trick_cost.py                                   # MiniLM-L6, MRPC, vanilla,adv,selfcal,adv+selfcal
    python bench/trick_cost.py --combos vanilla,smart,freelb,r3f,sift,ema --steps 20
    python bench/trick_cost.py --out results/trick_cost/minilm-l6-mrpc.json   # keep the record (commit it)
    python bench/trick_cost.py --repeats 3 mixed_precision=bf16 lr=1e-4      # rounds; settings for every combo

Each combo is one `vegalm finetune` run (vega per-task defaults, `mixed_precision=auto`: bf16 where the hardware
computes it, else fp32; the record's `mixed_precision` says which; the default trick arguments) of `--steps`
optimizer steps on the same seed, so every combo sees the same batches.
The Trainer logs the elapsed time every 10 steps; a combo's step time is (elapsed at the last step - elapsed at
step 10) / (steps - 10), which leaves out the first steps (allocator and thread-pool warm-up). With
`--repeats N` the combos run N rounds, in order within each; a combo's ratio is the median over rounds of its
step time over vanilla's in the same round (`s_per_step` is the median step time). `transductive` costs what
vanilla costs per step; its price is a second run on train + pseudo-labels plus one pass over the test inputs,
so it is not a combo here (`vegalm ablate` reports whole-run wall time for it). The last stdout line is one
JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install

LOG_EVERY = 10  # the fine-tuning runner logs every 10 optimizer steps
RESERVED = ("max_steps", "epochs", "log_every", "tricks", "seed", "out")  # what the timing relies on


def step_seconds(metrics_file: Path, steps: int) -> float:
    """Seconds per optimizer step between the step-10 log line and the last one."""
    rows = {r["step"]: r for r in map(json.loads, metrics_file.read_text().splitlines())}
    return (rows[steps]["elapsed"] - rows[LOG_EVERY]["elapsed"]) / (steps - LOG_EVERY)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="mrpc")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--combos", default="vanilla,adv,selfcal,adv+selfcal",
                   help="ablation combos without transductive (see `vegalm ablate --help`)")
    p.add_argument("--steps", type=int, default=15, help=f"optimizer steps per combo (> {LOG_EVERY})")
    p.add_argument("--batch-size", type=int, default=None, help="default: the task's vega default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default=None, help="also write the JSON record here")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the combos (median over rounds)")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="fine-tuning settings for every combo, as on "
                   "the `vegalm finetune` command line (e.g. mixed_precision=bf16)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats: must be at least 1")
    if taken := [kv for kv in args.settings if kv.split("=", 1)[0].split(".")[-1] in RESERVED]:
        p.error(f"{taken[0]}: set by the bench itself ({', '.join(RESERVED)}; --steps, --seed, --combos)")
    if args.steps <= LOG_EVERY:
        p.error(f"--steps: must be more than {LOG_EVERY} (the first {LOG_EVERY} steps are warm-up)")
    torch.set_num_threads(args.threads)

    from vegalm.config import apply_overrides, from_dict
    from vegalm.errors import VegaError
    from vegalm.experiments.ablate import parse_combos
    from vegalm.finetune.config import FinetuneConfig
    from vegalm.finetune.run import run_finetune

    try:
        combos = parse_combos(args.combos)
    except VegaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if any(c.transductive or c.tapt for c in combos):
        p.error("--combos: transductive / tapt are whole extra runs, not a per-step cost (see the docstring)")
    work = Path(tempfile.mkdtemp(prefix="trick_cost_"))
    rounds: list[dict[str, float]] = []
    precision: dict[str, str] = {}
    try:
        common = dict(task=args.task, model=args.model, glue_dir=args.glue_dir, seed=args.seed, max_steps=args.steps,
                      batch_size=args.batch_size, eval_test=False, save_model=False, progress=False)
        # every combo's whole config, checked (from_dict) before any run; `out` is set per round
        configs = {c.name: from_dict(FinetuneConfig, apply_overrides({**common, "out": "-", "tricks": list(c.tricks)},
                                                                     args.settings)) for c in combos}
        for r in range(args.repeats):
            rounds.append({})
            for name, cfg in configs.items():
                out = work / f"{name}-{r}"
                res = run_finetune(dataclasses.replace(cfg, out=str(out)))
                precision[name] = res["config"]["mixed_precision"]  # as resolved (auto -> bf16 or no)
                rounds[-1][name] = step_seconds(out / "metrics.jsonl", args.steps)
                shutil.rmtree(out, ignore_errors=True)
                print(f"round {r + 1}/{args.repeats} {name:>14}: {rounds[-1][name]:.3f} s/step", flush=True)
    except VegaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    times = {c.name: statistics.median(rd[c.name] for rd in rounds) for c in combos}
    base = "vanilla" in times
    ratios = {c.name: statistics.median(rd[c.name] / rd["vanilla"] for rd in rounds) for c in combos} if base else {}
    record = {"task": args.task, "model": args.model, "steps": args.steps, "measured_steps": args.steps - LOG_EVERY,
              "threads": args.threads, "seed": args.seed, "repeats": args.repeats, "settings": args.settings,
              "mixed_precision": precision,
              "s_per_step": {k: round(v, 4) for k, v in times.items()},
              "ratio_vs_vanilla": {k: round(v, 3) for k, v in ratios.items()} if base else None}
    if base:
        print("| combo | s/step | × vanilla |\n|---|---|---|")
        for k, v in times.items():
            print(f"| {k} | {v:.3f} | {ratios[k]:.2f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
