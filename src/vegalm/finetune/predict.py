"""Evaluation of a fine-tuned model: logits of each split, the task's metric key, predicted labels (argmax, or
a WNLI decision rule), dev metrics, and the WNLI report written into results.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vegalm.data.glue import TaskSpec, load_split
from vegalm.finetune.metrics import compute_metrics, task_score
from vegalm.finetune.models import forward_inputs
from vegalm.finetune.tasks import Collator, GlueDataset
from vegalm.finetune.stages.wnli import TREATMENTS as WNLI_TREATMENTS
from vegalm.finetune.stages.wnli import apply_treatment


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: GlueDataset, collate: Collator, batch_size: int,
                   device: torch.device, bf16: bool = False, progress: bool = False, desc: str = "eval") -> np.ndarray:
    """float32 logits [len(dataset), C] in dataset order (batches are formed longest-first for speed)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    keys = forward_inputs(model)
    lengths = dataset.lengths
    order = sorted(range(len(dataset)), key=lambda i: -lengths[i])
    out: np.ndarray | None = None
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(device.type, enabled=False)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        batch = collate([dataset[i] for i in idx])
        with amp:
            logits = model(**{k: batch[k].to(device) for k in keys if k in batch}).logits
        logits = logits.float().cpu().numpy()
        if out is None:
            out = np.zeros((len(dataset), logits.shape[-1]), dtype=np.float32)
        out[idx] = logits
    model.train(was_training)
    return out if out is not None else np.zeros((0, 1), dtype=np.float32)


def metric_key(spec: TaskSpec, split: str) -> str:
    if spec.name != "mnli":
        return spec.name
    return {"dev_matched": "mnli_m", "dev_mismatched": "mnli_mm"}[split]


def class_predictions(spec: TaskSpec, split: str, logits: np.ndarray, config: dict, glue_dir: str,
                      examples: list | None = None) -> np.ndarray:
    """Predicted label ids (classification) or scores (regression) of one split, as the run's config says:
    argmax, except WNLI under `wnli_treatment` (groups, groups+train, majority: finetune/stages/wnli.py)."""
    if spec.is_regression:
        return logits[:, 0]
    treatment = config.get("wnli_treatment", "none")
    if spec.name != "wnli" or treatment == "none" or split == "train":
        return logits.argmax(-1)
    examples = examples if examples is not None else load_split(spec.name, split, glue_dir)
    return apply_treatment(treatment, logits, examples, load_split(spec.name, "train", glue_dir))[0]


def wnli_report(resolved: dict, dev_ex: dict, dev_logits: dict, test_ex: dict, test_logits: dict) -> dict:
    """What the WNLI treatment did: dev accuracy with plain argmax and the majority floor beside the
    treated one, and how many rows each rule decided (finetune/stages/wnli.py explains why dev != test here)."""
    train = load_split("wnli", "train", resolved["glue_dir"])
    majority = int(np.bincount([ex.label for ex in train], minlength=2).argmax())
    treatment = resolved.get("wnli_treatment", "none")
    rep: dict[str, Any] = {"treatment": treatment}
    for name, examples, logits in (("dev", dev_ex, dev_logits), ("test", test_ex, test_logits)):
        for split, ex in examples.items():
            preds, counts = apply_treatment(treatment, logits[split], ex, train)
            entry = {"decided": counts, "entailed_share": round(float(np.mean(preds == 1)), 4) if len(preds) else None}
            if name == "dev":
                gold = np.array([e.label for e in ex])
                every = {t: round(100 * float(np.mean(apply_treatment(t, logits[split], ex, train)[0] == gold)), 2)
                         for t in WNLI_TREATMENTS}  # free: the logits are the same, only the decision rule differs
                entry.update(accuracy=round(100 * float(np.mean(preds == gold)), 2), accuracy_argmax=every["none"],
                             accuracy_by_treatment=every, majority_floor=round(100 * float(np.mean(gold == majority)), 2))
            rep[split] = entry
    return rep


@dataclass
class Evaluation:
    """Logits, predictions and metrics of every dev and test split of one run."""

    dev_ds: dict[str, GlueDataset]
    test_ds: dict[str, GlueDataset]
    dev_logits: dict[str, np.ndarray]
    test_logits: dict[str, np.ndarray]
    dev_preds: dict[str, np.ndarray]
    test_preds: dict[str, np.ndarray] | None  # None for regression: the TSV writes the scores
    dev_metrics: dict[str, dict[str, float]]
    dev_score: float
    wnli: dict | None = None


def evaluate_splits(model: nn.Module, spec: TaskSpec, resolved: dict, collate: Collator, cfg: Any,
                    device: torch.device, dev_ex: dict, dev_ds: dict, test_ex: dict, test_ds: dict) -> Evaluation:
    """Predict every dev and test split with `model`, then score the dev splits (mean of the task scores)."""
    bf16, glue_dir = resolved["mixed_precision"] == "bf16", resolved["glue_dir"]

    def run(ds: GlueDataset, desc: str) -> np.ndarray:
        return predict_logits(model, ds, collate, cfg.eval_batch_size, device, bf16, cfg.train.progress, desc)

    dev_logits = {s: run(ds, f"{spec.name} {s}") for s, ds in dev_ds.items()}
    test_logits = {s: run(ds, f"{spec.name} {s}") for s, ds in test_ds.items()}
    dev_metrics, dev_preds = {}, {}
    for s, ds in dev_ds.items():
        dev_preds[s] = class_predictions(spec, s, dev_logits[s], resolved, glue_dir, dev_ex[s])
        dev_metrics[s] = compute_metrics(metric_key(spec, s), dev_preds[s], [f["labels"] for f in ds.features])
    test_preds = {s: class_predictions(spec, s, test_logits[s], resolved, glue_dir, test_ex[s])
                  for s in test_ds} if not spec.is_regression else None
    dev_score = float(np.mean([task_score(metric_key(spec, s), m) for s, m in dev_metrics.items()]))
    wnli = wnli_report(resolved, dev_ex, dev_logits, test_ex, test_logits) if spec.name == "wnli" else None
    return Evaluation(dev_ds, test_ds, dev_logits, test_logits, dev_preds, test_preds, dev_metrics, dev_score, wnli)

