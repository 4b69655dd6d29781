"""WNLI treatment: Winograd candidate competition over the hypotheses of one premise (`wnli_treatment`).

The hypotheses of one premise compete (a pronoun has one referent), so the k(n) most likely entailed of a
group of n are predicted entailed; k(n) is read off train. A prediction rule on a run's logits, used by
predict.py; the saved logits stay the model's own. docs/glue.md ("WNLI") has the treatments and the numbers.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vegalm.errors import VegaError

TREATMENTS = ("none", "groups", "groups+train", "majority")
ENTAILED = 1  # WNLI label ids: 0 = not_entailment, 1 = entailment


def premise_key(text: str) -> str:
    return " ".join(text.split())


@dataclass
class GroupPrior:
    """How many hypotheses of a premise are entailed, by group size, learned from labelled groups."""

    k_by_size: dict[int, int] = field(default_factory=dict)
    share: float = 0.5  # entailed share over groups of size >= 2: the fallback for unseen sizes

    @classmethod
    def from_train(cls, train: Sequence[Any]) -> "GroupPrior":
        groups: dict[str, list[int]] = defaultdict(list)
        for ex in train:
            if ex.label is None:
                raise VegaError(f"{ex.guid}: GroupPrior needs labelled (train) examples")
            groups[premise_key(ex.text_a)].append(int(ex.label))
        by_size: dict[int, list[int]] = defaultdict(list)
        for labels in groups.values():
            if len(labels) >= 2:
                by_size[len(labels)].append(sum(labels))
        total = sum(n * len(v) for n, v in by_size.items())
        share = sum(sum(v) for v in by_size.values()) / total if total else 0.5
        # median, halves rounded up (sizes 5 in WNLI train: 1, 1, 2, 2 -> 2)
        k = {n: int(math.floor(statistics.median(v) + 0.5)) for n, v in by_size.items()}
        return cls(k, share)

    def k(self, n: int) -> int:
        return self.k_by_size.get(n, int(math.floor(n * self.share + 0.5)))


def _entail_prob(logits: Any) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise VegaError(f"WNLI logits must be [N, 2], got shape {x.shape}")
    p = np.exp(x - x.max(1, keepdims=True))
    return p[:, ENTAILED] / p.sum(1)


def rank_predictions(logits: Any, examples: Sequence[Any], prior: GroupPrior, train: Sequence[Any] | None = None
                     ) -> tuple[np.ndarray, dict[str, int]]:
    """Label ids per row under candidate competition, and counts {"ranked", "by_train", "argmax"} of how
    rows were decided. With `train`, a group also holds that premise's train hypotheses (gold labels).
    Only texts of `examples` are read, never their labels."""
    prob = _entail_prob(logits)
    if len(prob) != len(examples):
        raise VegaError(f"WNLI ranking: {len(prob)} logit rows for {len(examples)} examples")
    known: dict[str, list[int]] = defaultdict(list)
    for ex in train or ():
        known[premise_key(ex.text_a)].append(int(ex.label))
    rows: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        rows[premise_key(ex.text_a)].append(i)
    pred = (prob > 0.5).astype(np.int64)  # argmax of two logits
    counts = {"ranked": 0, "by_train": 0, "argmax": 0}
    for key, idx in rows.items():
        gold = known.get(key, [])
        n = len(idx) + len(gold)
        if n == 1:
            counts["argmax"] += 1
            continue
        left = max(0, prior.k(n) - sum(gold))
        order = sorted(idx, key=lambda i: (-prob[i], i))  # most likely entailed first, ties by row
        for r, i in enumerate(order):
            pred[i] = ENTAILED if r < left else 1 - ENTAILED
        counts["by_train" if gold else "ranked"] += len(idx)
    return pred, counts


def apply_treatment(treatment: str, logits: Any, examples: Sequence[Any], train: Sequence[Any]
                    ) -> tuple[np.ndarray, dict[str, int]]:
    """Predictions for `treatment` (see TREATMENTS); `train` gives the prior, the labels and the majority."""
    if treatment not in TREATMENTS:
        raise VegaError(f"wnli_treatment: expected one of {', '.join(TREATMENTS)}, got {treatment!r}")
    if treatment == "none":
        return np.asarray(logits).argmax(-1), {"ranked": 0, "by_train": 0, "argmax": len(examples)}
    if treatment == "majority":
        label = int(np.bincount([int(ex.label) for ex in train], minlength=2).argmax())
        return np.full(len(examples), label, dtype=np.int64), {"ranked": 0, "by_train": 0, "argmax": 0}
    prior = GroupPrior.from_train(train)
    return rank_predictions(logits, examples, prior, train=train if treatment == "groups+train" else None)


__all__ = ["TREATMENTS", "GroupPrior", "apply_treatment", "premise_key", "rank_predictions"]
