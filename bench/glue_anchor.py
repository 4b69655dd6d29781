"""Anchor check: the same vanilla GLUE fine-tuning through transformers' Trainer and through vegalm's.

    python bench/glue_anchor.py --task rte --model minilm-l6 --seed 42           # full RTE: ~10-20 min per side
    python bench/glue_anchor.py --task rte --max-train-samples 64 --threads 1   # quick check: ~1.5 min in all

Recipe on both sides: the transformers `run_glue.py` defaults (`defaults=run_glue` in vegalm): lr 2e-5,
batch 32, 3 epochs, max length 128, linear decay, no warm-up, weight decay 0, Adam eps 1e-8, grad-norm
clip 1.0, fp32. Same train examples (the `max_train_samples` subset is vegalm's seed-0 sample), same
tokenizer, same seed, and `set_seed(seed)` before building the model on both sides, so the new head
starts identical. Both pad dynamically (run_glue.py's default pads to 128; padding is masked, so it only
changes speed).

Known, intended differences: HF's sampler keeps the last partial batch (ceil(n/32) steps per epoch),
ours drops it (floor); the data order and dropout masks come from different RNG streams. So the two dev
scores are draws from the same distribution, not equal numbers: on RTE (277 dev examples) seed-to-seed
spread is several points; compare over seeds before concluding anything. For a DeBERTa-v2 folder the
vegalm side uses our encoder (backend auto) and the HF side transformers' DebertaV2 classes.

Prints each side's dev metrics, train steps and wall time; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install

RUN_GLUE = dict(lr=2e-5, batch_size=32, epochs=3, max_length=128, weight_decay=0.0, adam_eps=1e-8)


def hf_side(args, work: Path) -> dict:
    """transformers Trainer on the vegalm-loaded examples."""
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from vegalm.data.glue import get_task, load_split
    from vegalm.finetune.metrics import compute_metrics, task_score
    from vegalm.finetune.runner import resolve_model_dir, train_subset

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
        per_device_eval_batch_size=64, num_train_epochs=RUN_GLUE["epochs"], lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=RUN_GLUE["weight_decay"], adam_epsilon=RUN_GLUE["adam_eps"], max_grad_norm=1.0,
        seed=args.seed, save_strategy="no", eval_strategy="no", report_to="none", logging_steps=50,
        disable_tqdm=not args.progress, use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
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
    from vegalm.finetune.runner import FinetuneConfig, run_finetune

    t0 = time.perf_counter()
    cfg = FinetuneConfig(task=args.task, model=args.model, out=str(work / "vegalm"), glue_dir=args.glue_dir,
                         defaults="run_glue", seed=args.seed, max_train_samples=args.max_train_samples,
                         eval_test=False, save_model=False, progress=args.progress, **RUN_GLUE)
    res = run_finetune(cfg)
    return {"dev": res["dev"], "dev_score": res["dev_score"], "steps": res["train"]["steps"],
            "train_s": res["timing"]["train_s"], "wall_s": round(time.perf_counter() - t0, 2),
            "backend": res["model"]["backend"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="rte")
    p.add_argument("--model", default="minilm-l6", help="model folder or minilm-l6")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-train-samples", type=int, default=None, help="train on a subset (quick check)")
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the machine's cores are shared)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vegalm.errors import VegaError

    work = Path(tempfile.mkdtemp(prefix="glue_anchor_"))  # fresh: vegalm's run cache must not skip training
    try:
        result = {"task": args.task, "model": args.model, "seed": args.seed,
                  "max_train_samples": args.max_train_samples, "recipe": RUN_GLUE}
        for name, fn in (("hf_trainer", hf_side), ("vegalm", vegalm_side)):
            r = fn(args, work)
            result[name] = r
            metrics = "; ".join(f"{s}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()) for s, m in r["dev"].items())
            print(f"{name:>10}: dev {metrics} | score {r['dev_score']:.2f} | {r['steps']} steps | "
                  f"train {r['train_s']:.1f} s | wall {r['wall_s']:.1f} s", flush=True)
        result["score_delta"] = round(result["vegalm"]["dev_score"] - result["hf_trainer"]["dev_score"], 3)
        result["train_time_ratio"] = round(result["vegalm"]["train_s"] / max(result["hf_trainer"]["train_s"], 1e-9), 3)
    except VegaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
