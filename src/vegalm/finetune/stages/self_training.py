"""Self-training on the unlabeled test inputs: teacher test logits -> confident pseudo-labels -> student.

Only test *inputs* are used (GLUE gives no test labels; they are never read). The selection is confident-first
and class-balanced; docs/tricks.md ("Transductive fine-tuning") says why and what it bought.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from vegalm.data import glue as glue_data  # load_split looked up at call time (tests swap it)
from vegalm.data.glue import Example
from vegalm.errors import VegaError
from vegalm.finetune.stages import StageOutput, Teacher
from vegalm.io import write_if_changed

PSEUDO_FRACTION = 0.3  # share of each test split kept as pseudo-labels (split evenly over the classes)


def confidences(logits: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """(max softmax probability, argmax, number of classes) per row."""
    x = np.asarray(logits.detach().float().cpu() if isinstance(logits, torch.Tensor) else logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise VegaError(
            f"pseudo_label needs class logits [N, C>=2], got shape {x.shape}; regression (STS-B) has no "
            "confidence to select by"
        )
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p.max(1), p.argmax(1), x.shape[1]


def pseudo_label(logits: Any, examples: Sequence[Any], threshold: float | None = None,
                 top_fraction: float | None = None, balance: bool = True) -> list[Example]:
    """Confident unlabeled examples with their predicted class as label, most confident first.

    Exactly one of `threshold` (keep max-probability >= threshold) or `top_fraction` (keep that share
    of `examples`) must be given. With `balance`, each predicted class keeps k examples, its most
    confident ones, where k = the smallest class's candidate count (threshold), or
    min(floor(top_fraction * N / C), smallest class's count) (top_fraction); a class the model never
    predicts therefore empties the selection. Without `balance`, selection is by confidence alone.
    `examples` only need guid, index, text_a and text_b; their labels are never read.
    """
    if (threshold is None) == (top_fraction is None):
        raise VegaError("pseudo_label: give exactly one of threshold or top_fraction")
    conf, pred, c = confidences(logits)
    n = len(examples)
    if conf.shape[0] != n:
        raise VegaError(f"pseudo_label: {conf.shape[0]} logit rows for {n} examples")
    order = np.lexsort((np.arange(n), -conf))  # confidence descending, then input order
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise VegaError(f"pseudo_label: threshold={threshold}, expected a probability")
        cand = [i for i in order if conf[i] >= threshold]
        budget = n
    else:
        if not 0.0 < top_fraction <= 1.0:
            raise VegaError(f"pseudo_label: top_fraction={top_fraction}, expected 0 < f <= 1")
        budget = int(top_fraction * n)
        cand = list(order)
    if balance:
        per_class = {k: [i for i in cand if pred[i] == k] for k in range(c)}
        k = min(len(v) for v in per_class.values())
        if top_fraction is not None:
            k = min(k, budget // c)
        keep = set(i for v in per_class.values() for i in v[:k])
        chosen = [i for i in order if i in keep]
    else:
        chosen = cand[:budget]
    out = []
    for i in chosen:
        ex = examples[i]
        out.append(Example(ex.guid, ex.index, ex.text_a, ex.text_b, int(pred[i])))
    return out


def merge_train(train: Sequence[Example], pseudo: Sequence[Example]) -> list[Example]:
    """train + pseudo-labelled examples, each pseudo one re-indexed after the training rows.

    Training code keys per-example state (e.g. selfcal's stored predictions) by `index`, and test
    indices restart at 0, so pseudo examples get indices max(train index) + 1, ...; their guid still
    names the test row they came from. Raises if a guid appears twice.
    """
    guids = {ex.guid for ex in train}
    if len(guids) != len(train):
        raise VegaError("merge_train: duplicate guids in the training examples")
    start = max((ex.index for ex in train if ex.index is not None), default=-1) + 1
    out = list(train)
    for j, ex in enumerate(pseudo):
        if ex.guid in guids:
            raise VegaError(f"merge_train: pseudo example {ex.guid} is already in the training set")
        guids.add(ex.guid)
        out.append(Example(ex.guid, start + j, ex.text_a, ex.text_b, ex.label))
    return out


# ------------------------------------------------------------------------------ from a finished teacher run


def read_test_index(path: Path) -> list[tuple[str, int]]:
    """(split, index) per row of a run's test_predictions.tsv, in the order of test_logits.npy."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader)
        return [(row[0], int(row[1])) for row in reader]


def pseudo_labels_from_run(run_dir: Path, res: dict, task: str, glue_dir: str,
                           fraction: float, min_dev_accuracy: float = 0.0) -> tuple[list, dict]:
    """Confident, class-balanced pseudo-labels from a finished run's test logits: (Examples, info).

    The test rows are read with `load_split` (GLUE test files have no labels) and handed to
    `pseudo_label`, which reads guid, index and texts only. When the teacher's accuracy on the dev
    rows past the same cut is below `min_dev_accuracy` (percent), none are returned."""
    spec = glue_data.get_task(task)
    info: dict[str, Any] = {"fraction": fraction, "selected": 0, "per_class": [0] * spec.num_labels,
                            "test_rows": 0, "skipped": None}
    if spec.is_regression:
        info["skipped"] = "regression (STS-B): no confidence to select pseudo-labels by"
        return [], info
    rows = {s: r for s, r in (res.get("test_rows") or {}).items() if s in spec.test_splits}  # never AX
    if not rows:
        info["skipped"] = "the teacher run has no test predictions (missing test file or eval_test=false)"
        return [], info
    logits = np.load(run_dir / "test_logits.npy")
    index = read_test_index(run_dir / "test_predictions.tsv")
    chosen = []
    cut = [np.inf] * spec.num_labels  # per predicted class: the lowest confidence that was kept
    for split, (a, b) in rows.items():
        examples = glue_data.load_split(task, split, glue_dir)
        if [i for _, i in index[a:b]] != [ex.index for ex in examples]:
            raise VegaError(f"{run_dir / 'test_predictions.tsv'}: its {split} rows do not match "
                            f"{task}'s test file; delete {run_dir} to rerun the teacher")
        picked = pseudo_label(logits[a:b], examples, top_fraction=fraction, balance=True)
        conf, pred, _ = confidences(logits[a:b])
        kept = {ex.guid for ex in picked}
        for i, ex in enumerate(examples):
            if ex.guid in kept:
                cut[pred[i]] = min(cut[pred[i]], float(conf[i]))
        chosen += picked
        info["test_rows"] += b - a
    for ex in chosen:
        info["per_class"][ex.label] += 1
    info["selected"] = len(chosen)
    if not chosen:
        info["skipped"] = "balanced selection is empty (the teacher predicts only one class)"
    else:
        info.update(dev_accuracy_at_cut(run_dir, res, task, glue_dir, cut))
        acc = info["dev_accuracy_at_cut"]
        if min_dev_accuracy > 0 and (acc is None or acc < min_dev_accuracy):
            info["skipped"] = (f"the teacher's dev accuracy past the cut is under "
                               f"pseudo_min_dev_accuracy={min_dev_accuracy:g}%")  # the figure: dev_accuracy_at_cut
            info["below_bar"] = info["selected"]  # what would have been used; none is
            info["selected"], info["per_class"] = 0, [0] * spec.num_labels
            chosen = []
    return chosen, info


def dev_accuracy_at_cut(run_dir: Path, res: dict, task: str, glue_dir: str, cut: list[float]) -> dict:
    """How right the pseudo-labels probably are: the teacher's accuracy on the dev rows that clear the same
    per-class confidence cut as the kept test rows (dev labels are public; test labels are never read).
    A teacher near chance (MiniLM on RTE) keeps pseudo-labels that are not much better than chance."""
    conf, pred, _ = confidences(np.load(run_dir / "dev_logits.npy"))
    gold = np.full(len(pred), -1)
    for split, (a, b) in res["dev_rows"].items():
        gold[a:b] = [ex.label for ex in glue_data.load_split(task, split, glue_dir)]
    keep = np.array([c >= cut[k] for c, k in zip(conf, pred)])
    n = int(keep.sum())
    return {"dev_rows_at_cut": n, "dev_rows": len(pred),
            "dev_accuracy_at_cut": round(float((pred[keep] == gold[keep]).mean()) * 100, 2) if n else None}


def write_pseudo_jsonl(path: Path, examples: list) -> None:
    """The student's extra_train file: one JSON object per pseudo-labelled row."""
    lines = [json.dumps({"guid": ex.guid, "index": ex.index, "text_a": ex.text_a, "text_b": ex.text_b,
                         "label": ex.label}, ensure_ascii=False) for ex in examples]
    write_if_changed(path, "".join(line + "\n" for line in lines))


@dataclass
class SelfTraining:
    """The stage: a teacher run's confident test predictions as the student's extra training rows."""

    task: str
    glue_dir: str
    fraction: float = PSEUDO_FRACTION
    min_dev_accuracy: float = 0.0  # percent; a teacher below it past the cut gives no rows
    name: ClassVar[str] = "self_training"
    needs_teacher: ClassVar[bool] = True

    def run(self, teacher: Teacher | None) -> StageOutput:
        if teacher is None:
            raise VegaError("self-training: needs a finished teacher run")
        rows, info = pseudo_labels_from_run(teacher.run_dir, teacher.result, self.task, self.glue_dir,
                                            self.fraction, self.min_dev_accuracy)
        info["teacher_dir"] = str(teacher.run_dir)
        info["teacher_config_hash"] = teacher.result["config_hash"]
        info["teacher_dev_score"] = round(float(teacher.result["dev_score"]), 4)
        return StageOutput(rows=rows, info=info)


__all__ = ["PSEUDO_FRACTION", "SelfTraining", "confidences", "dev_accuracy_at_cut", "merge_train", "pseudo_label",
           "pseudo_labels_from_run", "read_test_index", "write_pseudo_jsonl"]
