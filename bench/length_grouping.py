"""Fine-tuning epoch time with random batches vs length-grouped batches (the vega default), same process.

    python bench/length_grouping.py                          # MiniLM-L6, RTE, 1 thread
    python bench/length_grouping.py --task stsb --steps 12 --repeats 5 --threads 2
    python bench/length_grouping.py --out results/length_grouping/minilm-l6-rte.json     # keep the record

Both arms batch the same epoch of the task's train set (the Trainer's seeded permutation, batch = the
task's vega batch size): `random` cuts that permutation into batches as they come, `grouped` first
reorders it with `length_grouped_permutation` (vegalm/finetune/tasks.py), as `group_by_length=true` does.
Every batch is padded to its longest member (the Collator), so the epoch's padded tokens are exact and
printed for both. Time is measured, not modelled: each repeat times `--steps` full training steps per arm
(forward, backward, AdamW step; fp32) after 2 warm-up steps, on batches drawn stratified by padded size
(one per stratum of equal count; an arm's epoch time is the sum of stratum size x timed step). The arms alternate which
goes first. Printed: the median over repeats of each arm's epoch estimate and the median of the per-repeat
ratios random/grouped. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install

WARMUP = 2  # untimed steps per arm and repeat (allocator and thread-pool warm-up)


def epoch_batches(lengths: list[int], batch: int, seed: int, grouped: bool) -> list[list[int]]:
    """One epoch's batches (tail dropped, as the Trainer's sampler does)."""
    from vegalm.finetune.tasks import GROUP_CHUNK, length_grouped_permutation

    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed))
    if grouped:
        perm = length_grouped_permutation(perm, lengths, batch, seed * 1_000_003, GROUP_CHUNK)
    order = perm.tolist()
    return [order[i : i + batch] for i in range(0, len(order) - len(order) % batch, batch)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="rte")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--steps", type=int, default=8, help="timed batches per arm and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="also write the JSON record here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats: must be >= 1")
    torch.set_num_threads(args.threads)

    from vegalm.config import load_config
    from vegalm.data.glue import get_task, load_split
    from vegalm.errors import VegaError
    from vegalm.finetune.runner import FinetuneConfig, _load_tokenizer, build_model, resolve
    from vegalm.finetune.tasks import Collator, GlueDataset

    try:
        cfg = load_config(FinetuneConfig, None, [f"task={args.task}", f"model={args.model}", "out=unused"]
                          + ([f"glue_dir={args.glue_dir}"] if args.glue_dir else []))
        r = resolve(cfg)
        tok = _load_tokenizer(r["tokenizer"])
        ds = GlueDataset.from_examples(load_split(r["task"], "train", r["glue_dir"]), tok, r["task"], r["max_length"])
        torch.manual_seed(args.seed)
        model, _ = build_model(r, get_task(r["task"]).num_labels)
    except VegaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    collate = Collator(tok.pad_token_id)
    lengths = ds.lengths
    arms = {name: epoch_batches(lengths, r["batch_size"], args.seed, name == "grouped") for name in ("random", "grouped")}
    padded = {name: sum(max(lengths[i] for i in b) * len(b) for b in bs) for name, bs in arms.items()}
    real = sum(lengths[i] for b in arms["random"] for i in b)

    def step(idx: list[int]) -> None:
        batch = collate([ds[i] for i in idx])
        batch.pop("index")
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Stratified draw: an arm's batches sorted by padded size and cut into `--steps` strata of (nearly) equal
    # count; one batch per stratum is timed and stands for its stratum. Unbiased, and far less noisy than a
    # plain random draw when batch sizes in tokens span 10x (as grouped batches do).
    strata = {name: [s.tolist() for s in np.array_split(np.argsort([max(lengths[i] for i in b) for b in bs]),
                                                      min(args.steps, len(bs)))] for name, bs in arms.items()}
    rng = np.random.default_rng(args.seed + 1)
    est: dict[str, list[float]] = {"random": [], "grouped": []}
    for rep in range(args.repeats):
        for name in (("random", "grouped") if rep % 2 == 0 else ("grouped", "random")):
            bs = arms[name]
            for j in rng.integers(len(bs), size=WARMUP).tolist():
                step(bs[j])
            total = 0.0
            for stratum in strata[name]:
                j = stratum[int(rng.integers(len(stratum)))]
                t0 = time.perf_counter()
                step(bs[j])
                total += (time.perf_counter() - t0) * len(stratum)
            est[name].append(total)
        print(f"repeat {rep}: epoch random {est['random'][-1]:.1f} s, grouped {est['grouped'][-1]:.1f} s", flush=True)
    ratios = [a / b for a, b in zip(est["random"], est["grouped"])]
    out = {
        "task": r["task"], "model": args.model, "threads": args.threads, "batch_size": r["batch_size"],
        "max_length": r["max_length"], "batches": len(arms["random"]), "steps": args.steps, "repeats": args.repeats,
        "padded_over_real": {k: round(v / real, 3) for k, v in padded.items()},
        "epoch_s_median": {k: round(statistics.median(v), 1) for k, v in est.items()},
        "speedup_median": round(statistics.median(ratios), 2),
    }
    print(f"| {out['task']} | {out['padded_over_real']['random']:.2f} | {out['padded_over_real']['grouped']:.2f} | "
          f"{out['epoch_s_median']['random']:.1f} | {out['epoch_s_median']['grouped']:.1f} | {out['speedup_median']:.2f}x |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
