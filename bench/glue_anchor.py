"""Anchor check: the same vanilla GLUE fine-tuning through transformers' Trainer and through vegalm's.

    python bench/glue_anchor.py --task rte --model minilm-l6 --seed 42           # full RTE: ~10-20 min per side
    python bench/glue_anchor.py --task rte --max-train-samples 64 --threads 1   # quick check: ~1.5 min in all
    python bench/glue_anchor.py --task rte,mrpc,stsb,cola --seed 42,43 --out results/anchor   # the sweep
    python bench/glue_anchor.py --summary results/anchor                          # table from the JSON files

With `--out DIR` each (task, seed) writes DIR/<task>-seed<S>.json and a rerun skips the files that
exist, so the sweep (~45 min per seed on 2 cores) can stop and continue; commit the small JSON files.

Recipe on both sides: the transformers `run_glue.py` defaults (`defaults=run_glue` in vegalm): lr 2e-5,
batch 32, 3 epochs, max length 128, linear decay, no warm-up, weight decay 0, Adam eps 1e-8, grad-norm
clip 1.0, fp32. Same train examples (the `max_train_samples` subset is vegalm's seed-0 sample), same
tokenizer, same seed, and `set_seed(seed)` before building the model on both sides, so the new head
starts identical. Both pad dynamically (run_glue.py's default pads to 128; padding is masked, so it only
changes speed).

Both sides shuffle each epoch with `torch.randperm` seeded by seed + epoch (Accelerate's SeedableRandomSampler
under the Trainer, vegalm's ResumableBatchSampler), so the batches hold the same examples in the same order.
Known, intended differences: HF's sampler keeps the last partial batch (ceil(n/32) steps per epoch), ours
drops it (floor); dropout masks come from different RNG streams. So the two dev scores are draws from the
same distribution, not equal numbers: on RTE (277 dev examples) seed-to-seed
spread is several points; compare over seeds before concluding anything. For a DeBERTa-v2 folder the
vegalm side uses our encoder (backend auto) and the HF side transformers' DebertaV2 classes.

Prints each side's dev metrics, train steps and wall time; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install

# The issue's reference run of transformers' Trainer (MiniLM-L6, run_glue defaults, seed 42, dev, 2 cores):
# task score in points (MRPC = mean of F1 82.4 / acc 72.6, STS-B = mean of Pearson 80.5 / Spearman 82.3) and
# wall seconds of the whole run. Shown beside our own measurements; never used in place of them.
ISSUE_TRAINER = {"rte": (52.3, 593), "mrpc": (77.5, 563), "stsb": (81.4, 730), "cola": (14.0, 343)}
RUN_GLUE = dict(lr=2e-5, batch_size=32, epochs=3, max_length=128, weight_decay=0.0, adam_eps=1e-8)


def hf_side(args, work: Path) -> dict:
    """transformers Trainer on the vegalm-loaded examples."""
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from vegalm.data.glue import get_task, load_split
    from vegalm.finetune.metrics import compute_metrics, task_score
    from vegalm.data.glue import train_subset
    from vegalm.finetune.models import resolve_model_dir

    t0 = time.perf_counter()
    spec = get_task(args.task)
    path = resolve_model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(str(path))

    def encode(examples):
        a = [e.text_a for e in examples]
        b = [e.text_b for e in examples] if spec.is_pair else None
        enc = tok(a, b, truncation=True, max_length=RUN_GLUE["max_length"])
        rows = [{k: enc[k][i] for k in enc} for i in range(len(examples))]
        for r, e in zip(rows, examples):
            r["labels"] = float(e.label) if spec.is_regression else int(e.label)
        return rows

    train = encode(train_subset(load_split(spec.name, "train", args.glue_dir), args.max_train_samples))
    devs = {s: load_split(spec.name, s, args.glue_dir) for s in spec.dev_splits}
    set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=spec.num_labels,
        problem_type="regression" if spec.is_regression else "single_label_classification")
    targs = TrainingArguments(
        output_dir=str(work / "hf"), learning_rate=RUN_GLUE["lr"], per_device_train_batch_size=RUN_GLUE["batch_size"],
        per_device_eval_batch_size=64, num_train_epochs=getattr(args, "epochs", None) or RUN_GLUE["epochs"], lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=RUN_GLUE["weight_decay"], adam_epsilon=RUN_GLUE["adam_eps"], max_grad_norm=1.0,
        seed=args.seed, save_strategy="no", eval_strategy="no", report_to="none", logging_steps=50,
        disable_tqdm=not args.progress, use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(
        tok, padding="max_length" if getattr(args, "pad_to_max_length", False) else True,  # run_glue.py pads to 128
        max_length=RUN_GLUE["max_length"]))
    t1 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t1
    dev, scores = {}, []
    for split, examples in devs.items():
        logits = trainer.predict(encode(examples)).predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        preds = logits[:, 0] if spec.is_regression else np.argmax(logits, -1)
        key = {"dev_matched": "mnli_m", "dev_mismatched": "mnli_mm"}.get(split, spec.name)
        dev[split] = compute_metrics(key, preds, [e.label for e in examples])
        scores.append(task_score(key, dev[split]))
    return {"dev": dev, "dev_score": float(np.mean(scores)), "steps": int(out.global_step),
            "train_s": round(train_s, 2), "wall_s": round(time.perf_counter() - t0, 2)}


def vegalm_side(args, work: Path) -> dict:
    from vegalm.finetune.config import FinetuneConfig
    from vegalm.finetune.run import run_finetune

    t0 = time.perf_counter()
    cfg = FinetuneConfig.of(task=args.task, model=args.model, out=str(work / "vegalm"), glue_dir=args.glue_dir,
                         defaults="run_glue", seed=args.seed, max_train_samples=args.max_train_samples,
                         eval_test=False, save_model=False, progress=args.progress, **RUN_GLUE,
                         mixed_precision="no", unpad=False)  # the Trainer's fp32 padded passes: a recipe check
    res = run_finetune(cfg)
    return {"dev": res["dev"], "dev_score": res["dev_score"], "steps": res["train"]["steps"],
            "train_s": res["timing"]["train_s"], "wall_s": round(time.perf_counter() - t0, 2),
            "backend": res["model"]["backend"]}


SIDES = {"hf_trainer": hf_side, "vegalm": vegalm_side}


class TrainTokens:
    """Counts padded tokens through the model in training mode (batch x padded length at the embeddings'
    output), via a global forward hook, so speed can be compared per token: the two sides may draw different
    batch orders, and dynamic padding makes an epoch's padded-token count depend on the order."""

    def __init__(self):
        self.n = 0

    def __enter__(self):
        self.n = 0
        self._h = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def _hook(self, module, args, output):
        if module.training and type(module).__name__.endswith("Embeddings") and torch.is_tensor(output) and output.dim() == 3:
            self.n += output.shape[0] * output.shape[1]

    def __exit__(self, *exc):
        self._h.remove()


def run_one(args, task: str, seed: int, sides: list[str], result: dict | None = None) -> dict:
    """The requested sides on one (task, seed), added to `result`; prints one line per side."""
    args = argparse.Namespace(**{**vars(args), "task": task, "seed": seed})
    work = Path(tempfile.mkdtemp(prefix="glue_anchor_"))  # fresh: vegalm's run cache must not skip training
    result = dict(result or {"task": task, "model": args.model, "seed": seed, "max_train_samples":
                             args.max_train_samples, "recipe": RUN_GLUE})
    result.setdefault("threads", {})
    try:
        for name in sides:
            with TrainTokens() as tokens:
                r = SIDES[name](args, work)
            r["train_padded_tokens"] = tokens.n
            r["ms_per_1k_tokens"] = round(1e6 * r["train_s"] / max(tokens.n, 1), 2)
            r["threads"] = args.threads
            r["concurrent_load"] = args.note  # e.g. "another job ran beside it": its time is not a clean measurement
            result[name] = r
            metrics = "; ".join(f"{s}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()) for s, m in r["dev"].items())
            print(f"{task} seed {seed} {name:>10}: dev {metrics} | score {r['dev_score']:.2f} | {r['steps']} steps | "
                  f"train {r['train_s']:.1f} s | wall {r['wall_s']:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.pop("threads", None)
    if "vegalm" in result and "hf_trainer" in result:
        result["score_delta"] = round(result["vegalm"]["dev_score"] - result["hf_trainer"]["dev_score"], 3)
        clean = not result["vegalm"].get("concurrent_load") and not result["hf_trainer"].get("concurrent_load")
        ratio = result["vegalm"]["train_s"] / max(result["hf_trainer"]["train_s"], 1e-9)
        result["train_time_ratio"] = round(ratio, 3) if clean else None
    return result


def _run_isolated(args, task: str, seed: int, side: str) -> dict:
    """One side of one (task, seed) in a fresh Python process (this script with --sides SIDE); its record."""
    from vegalm.errors import VegaError

    cmd = [sys.executable, str(Path(__file__).resolve()), "--task", task, "--seed", str(seed), "--sides", side,
           "--model", args.model, "--threads", str(args.threads), "--no-progress"]
    for flag, value in (("--max-train-samples", args.max_train_samples), ("--glue-dir", args.glue_dir),
                        ("--note", args.note)):
        if value is not None:
            cmd += [flag, str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise VegaError(f"{side} run failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    lines = proc.stdout.strip().splitlines()
    mine = [line for line in lines if line.startswith(f"{task} seed {seed} ")]  # run_one's line (not HF's prints)
    print(mine[0] if mine else f"{side}: no summary line", flush=True)
    return json.loads(lines[-1])[side]


def speed_check(args, task: str, seed: int) -> int:
    """Both sides `args.repeats` times, alternating which goes first (Trainer, vegalm; vegalm, Trainer; ...), each
    run in a fresh process, as a user runs `run_glue.py` or `vegalm finetune`. (Both trainers in one process share
    Accelerate's global state, the allocator and the thread pools; measured that way on MRPC-512 our side took
    69-71 s against 64-68 s in fresh processes, and the ratio read 1.065 instead of 1.002.) Prints per-side
    median training seconds, padded tokens, and the medians of the paired vegalm/Trainer ratios (per run, per
    step, per padded token)."""
    from vegalm.errors import VegaError

    pairs = []
    try:
        for i in range(args.repeats):
            order = list(SIDES) if i % 2 == 0 else list(SIDES)[::-1]  # who goes first alternates too
            r = {side: _run_isolated(args, task, seed, side) for side in order}
            pairs.append(r)
            print(f"repeat {i + 1}/{args.repeats}: train s Trainer {r['hf_trainer']['train_s']:.1f}, "
                  f"vegalm {r['vegalm']['train_s']:.1f}", flush=True)
    except VegaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    med = {side: float(np.median([r[side]["train_s"] for r in pairs])) for side in SIDES}
    ratios = [r["vegalm"]["train_s"] / r["hf_trainer"]["train_s"] for r in pairs]
    out = {"task": task, "seed": seed, "max_train_samples": args.max_train_samples, "threads": args.threads,
           "repeats": args.repeats, "steps": {side: pairs[0][side]["steps"] for side in SIDES},
           "train_s_median": {k: round(v, 2) for k, v in med.items()},
           "train_s_all": {side: [r[side]["train_s"] for r in pairs] for side in SIDES},
           "ratio_median": round(float(np.median(ratios)), 3),
           "ratio_per_step_median": round(float(np.median([
               (r["vegalm"]["train_s"] / r["vegalm"]["steps"]) / (r["hf_trainer"]["train_s"] / r["hf_trainer"]["steps"])
               for r in pairs])), 3),
           "padded_tokens": {side: pairs[0][side]["train_padded_tokens"] for side in SIDES},
           "ratio_per_token_median": round(float(np.median([
               r["vegalm"]["ms_per_1k_tokens"] / r["hf_trainer"]["ms_per_1k_tokens"] for r in pairs])), 3)}
    print(json.dumps(out))
    return 0


def summary(folder: Path) -> dict:
    """Markdown table from DIR/*.json: per task and side, mean ± std over seeds, seconds per epoch (median of
    the runs measured without other jobs beside them) and the vegalm / Trainer training-time ratio."""
    runs = [json.loads(f.read_text()) for f in sorted(folder.glob("*-seed*.json"))]
    if not runs:
        raise SystemExit(f"error: no <task>-seed<S>.json files in {folder}")
    print("| task | Trainer, issue (seed 42; wall s) | Trainer dev (seeds) | vegalm dev (seeds) | Trainer s/epoch "
          "| vegalm s/epoch | time ratio |")
    print("|---|---|---|---|---|---|---|")
    out = {}

    def fmt(x):
        return "–" if x is None else f"{x:.1f}"

    for task in dict.fromkeys(r["task"] for r in runs):
        rs = [r for r in runs if r["task"] == task]
        row: dict = {}
        for side in ("hf_trainer", "vegalm"):
            have = [r for r in rs if side in r]
            sc = np.array([r[side]["dev_score"] for r in have])
            ep = [r[side]["train_s"] / r["recipe"]["epochs"] for r in have if not r[side].get("concurrent_load")]
            row[side] = {"seeds": [r["seed"] for r in have], "scores": [round(float(x), 2) for x in sc],
                         "mean": round(float(sc.mean()), 2) if len(sc) else None,
                         "std": round(float(sc.std(ddof=1)), 2) if len(sc) > 1 else None,
                         "s_per_epoch": round(float(np.median(ep)), 1) if ep else None}
        ratios = [r["train_time_ratio"] for r in rs if r.get("train_time_ratio") is not None]
        row["time_ratio"] = round(float(np.median(ratios)), 3) if ratios else None
        out[task] = row
        cells = []
        for side in ("hf_trainer", "vegalm"):
            e = row[side]
            std = f" ± {e['std']:.2f}" if e["std"] is not None else ""
            cells.append(f"{e['mean']:.2f}{std} ({', '.join(f'{x:.1f}' for x in e['scores'])}; seeds "
                         f"{','.join(map(str, e['seeds']))})" if e["scores"] else "–")
        ratio = "–" if row["time_ratio"] is None else f"{row['time_ratio']:.2f}"
        ref = f"{ISSUE_TRAINER[task][0]:.1f} ({ISSUE_TRAINER[task][1]} s)" if task in ISSUE_TRAINER else "–"
        print(f"| {task} | {ref} | {cells[0]} | {cells[1]} | {fmt(row['hf_trainer']['s_per_epoch'])} | "
              f"{fmt(row['vegalm']['s_per_epoch'])} | {ratio} |")
    avg = {}
    for side in ("hf_trainer", "vegalm"):
        means = [out[t][side]["mean"] for t in out]
        avg[side] = round(float(np.mean(means)), 2) if None not in means else None
    ref = [ISSUE_TRAINER[t][0] for t in out if t in ISSUE_TRAINER]
    ref_avg = f"{np.mean(ref):.2f}" if len(ref) == len(out) else "–"
    print(f"| average | {ref_avg} | {fmt(avg['hf_trainer'])} | {fmt(avg['vegalm'])} | | | |")
    return {"tasks": out, "avg": avg}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="rte", help="a task or a comma list (rte,mrpc,stsb,cola)")
    p.add_argument("--model", default="minilm-l6", help="model folder or minilm-l6")
    p.add_argument("--seed", default="42", help="a seed or a comma list (42,43)")
    p.add_argument("--out", default=None, help="write DIR/<task>-seed<S>.json per run; sides already there are skipped")
    p.add_argument("--sides", default="hf_trainer,vegalm", help="which sides to run (hf_trainer, vegalm)")
    p.add_argument("--repeats", type=int, default=1,
                   help="speed check: run both sides N times, alternating, and report medians (no --out)")
    p.add_argument("--note", default=None,
                   help="say that other jobs ran beside this one: recorded, and its times leave the speed ratio")
    p.add_argument("--summary", default=None, metavar="DIR", help="print the table from DIR/*.json and exit")
    p.add_argument("--max-train-samples", type=int, default=None, help="train on a subset (quick check)")
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the machine's cores are shared)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.summary:
        print(json.dumps(summary(Path(args.summary))))
        return 0
    torch.set_num_threads(args.threads)
    from vegalm.errors import VegaError

    sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    if not sides or set(sides) - set(SIDES):
        p.error(f"--sides: expected a comma list of {', '.join(SIDES)}, got {args.sides!r}")
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    seeds = [int(x) for x in str(args.seed).split(",") if x.strip()]
    if args.repeats > 1:
        if args.out or len(tasks) != 1 or len(seeds) != 1 or len(sides) != 2:
            p.error("--repeats: one task, one seed, both sides, no --out")
        return speed_check(args, tasks[0], seeds[0])
    results = []
    try:
        for seed in seeds:  # seed-major: a stopped sweep already has every task at the first seeds
            for task in tasks:
                dest = Path(args.out) / f"{task}-seed{seed}.json" if args.out else None
                old = json.loads(dest.read_text()) if dest is not None and dest.exists() else None
                todo = [s for s in sides if old is None or s not in old]
                if not todo:
                    print(f"{task} seed {seed}: cached in {dest}", flush=True)
                    results.append(old)
                    continue
                r = run_one(args, task, seed, todo, old)
                if dest is not None:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_suffix(".tmp")
                    tmp.write_text(json.dumps(r, indent=1) + "\n")
                    tmp.replace(dest)  # atomic: a killed sweep never leaves half a file
                results.append(r)
    except VegaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(results[0] if len(results) == 1 else results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
