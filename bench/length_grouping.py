"""Fine-tuning epoch time: random batches vs length-sorted micro-batches vs length-grouped batches.

    python bench/length_grouping.py                          # MiniLM-L6, RTE, 1 thread, micro-batches of 4
    python bench/length_grouping.py --task stsb --steps 12 --repeats 5 --threads 2 --micro 2
    python bench/length_grouping.py --out results/length_grouping/minilm-l6-rte.json     # keep the record

All arms train on the same epoch of the task's train set (the Trainer's seeded permutation; batch = the
task's vega batch size), one AdamW step per batch, fp32:
  random   the permutation cut into batches as they come (grad_accum=1, the default);
  micro    the same batches, each sorted by length and cut into `--micro` micro-batches whose gradients
           are accumulated (`grad_accum=k`, train.sampler.sort_within_batches): the same examples per step;
  grouped  the permutation reordered by `length_grouped_permutation` (`group_by_length=true`): other
           batches, of similar lengths.
Every (micro-)batch is padded to its longest member (the Collator), so the padded tokens are exact and
printed per arm. Time is measured, not modelled: each repeat times `--steps` whole steps per arm (after 2
warm-up steps) on steps drawn stratified by padded size (one per stratum of equal count; an arm's epoch
time is the sum of stratum size x timed step). The arms rotate which goes first. Printed: the median over
repeats of each arm's epoch estimate and the median of the per-repeat ratios random / arm. The last
stdout line is one JSON object.
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


ARMS = ("random", "micro", "grouped")


def epoch_steps(lengths: list[int], batch: int, seed: int, arm: str, micro: int = 4) -> list[list[list[int]]]:
    """One epoch as steps, each a list of micro-batches of dataset indices (tail dropped, as the sampler does)."""
    from vegalm.train.sampler import GROUP_CHUNK, length_grouped_permutation, sort_within_batches

    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed))
    k = 1
    if arm == "grouped":
        perm = length_grouped_permutation(perm, lengths, batch, seed * 1_000_003, GROUP_CHUNK)
    elif arm == "micro":
        perm, k = sort_within_batches(perm, lengths, batch), micro
    order = perm.tolist()
    size = batch // k
    return [[order[i + j * size : i + (j + 1) * size] for j in range(k)]
            for i in range(0, len(order) - len(order) % batch, batch)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="rte")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--steps", type=int, default=8, help="timed batches per arm and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--micro", type=int, default=4, help="micro-batches per batch in the `micro` arm")
    p.add_argument("--out", default=None, help="also write the JSON record here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.micro < 1:
        p.error("--steps, --repeats and --micro: must be >= 1")
    torch.set_num_threads(args.threads)

    from vegalm.config import load_config
    from vegalm.data.glue import get_task, load_split
    from vegalm.errors import VegaError
    from vegalm.data.tokenizer import load_tokenizer as _load_tokenizer
    from vegalm.finetune.config import FinetuneConfig, resolve
    from vegalm.finetune.models import build_model
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
    if r["batch_size"] % args.micro:
        p.error(f"--micro: {args.micro} does not divide the batch size {r['batch_size']}")
    arms = {arm: epoch_steps(lengths, r["batch_size"], args.seed, arm, args.micro) for arm in ARMS}

    def padded_tokens(st: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in mb) * len(mb) for mb in st)

    padded = {arm: sum(padded_tokens(st) for st in steps) for arm, steps in arms.items()}
    real = sum(lengths[i] for st in arms["random"] for mb in st for i in mb)

    def step(st: list[list[int]]) -> None:
        for mb in st:
            batch = collate([ds[i] for i in mb])
            batch.pop("index")
            (model(**batch).loss / len(st)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Stratified draw: an arm's steps sorted by padded size and cut into `--steps` strata of (nearly) equal
    # count; one step per stratum is timed and stands for its stratum. Unbiased, and far less noisy than a
    # plain random draw when step sizes in tokens span 10x (as grouped batches do).
    strata = {arm: [x.tolist() for x in np.array_split(np.argsort([padded_tokens(st) for st in steps]),
                                                      min(args.steps, len(steps)))] for arm, steps in arms.items()}
    rng = np.random.default_rng(args.seed + 1)
    est: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for rep in range(args.repeats):
        for arm in ARMS[rep % 3:] + ARMS[:rep % 3]:
            steps = arms[arm]
            for j in rng.integers(len(steps), size=WARMUP).tolist():
                step(steps[j])
            total = 0.0
            for stratum in strata[arm]:
                j = stratum[int(rng.integers(len(stratum)))]
                t0 = time.perf_counter()
                step(steps[j])
                total += (time.perf_counter() - t0) * len(stratum)
            est[arm].append(total)
        print(f"repeat {rep}: epoch " + ", ".join(f"{a} {est[a][-1]:.1f} s" for a in ARMS), flush=True)
    out = {
        "task": r["task"], "model": args.model, "threads": args.threads, "batch_size": r["batch_size"],
        "micro": args.micro, "max_length": r["max_length"], "batches": len(arms["random"]), "steps": args.steps,
        "repeats": args.repeats,
        "padded_over_real": {a: round(v / real, 3) for a, v in padded.items()},
        "epoch_s_median": {a: round(statistics.median(v), 1) for a, v in est.items()},
        "speedup_median": {a: round(statistics.median(x / y for x, y in zip(est["random"], est[a])), 2) for a in ARMS},
    }
    pr, es, sp = out["padded_over_real"], out["epoch_s_median"], out["speedup_median"]
    print(f"| {out['task']} | " + " | ".join(f"{pr[a]:.2f}" for a in ARMS) + " | "
          + " | ".join(f"{es[a]:.1f}" for a in ARMS) + f" | {sp['micro']:.2f}x | {sp['grouped']:.2f}x |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
