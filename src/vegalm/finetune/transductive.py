"""Transductive fine-tuning: use the unlabeled test *inputs* (never test labels, which GLUE does not give).

(b) Self-training with pseudo-labels:

    from vegalm.finetune.transductive import pseudo_label, merge_train, task_texts
    test = load_split("rte", "test", glue_dir)                       # Examples with label None
    pseudo = pseudo_label(test_logits, test, top_fraction=0.3)       # confident 30%, class-balanced
    train2 = merge_train(train, pseudo)                              # then fine-tune again on train2

`pseudo_label` reads each example's guid, index and texts only: never `.label`. Selection is
confident-first (softmax max probability, ties broken by input order) and, by default, class-balanced:
every predicted class contributes the same number of examples, its most confident ones, so the
model's majority class does not swamp the pseudo-labelled set (self-training's usual failure mode).

(a) Task-adaptive continued RTD pretraining (written with the RTD generator, elsewhere) takes its text
from `task_texts(task, glue_dir)`: every text field of the task's train, dev and test files present
under glue_dir, deduplicated in first-seen order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vegalm.data.glue import Example, get_task, load_task, task_texts  # task_texts: re-exported
from vegalm.errors import VegaError


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
