"""WNLI treatment: Winograd candidate competition over the hypotheses of one premise.

    vegalm finetune --task wnli --model minilm-l6 --out runs/ft/wnli wnli_treatment=groups+train
    vegalm glue --model PATH --tasks rte,wnli --seeds 3 --out runs/glue wnli_treatment=groups+train
    python -m vegalm.experiments.wnli --model minilm-l6 --seeds 3 --out runs/wnli --results results/wnli

    from vegalm.finetune.wnli import GroupPrior, rank_predictions
    prior = GroupPrior.from_train(load_split("wnli", "train", glue_dir))
    preds = rank_predictions(dev_logits, dev_examples, prior, train=train_examples)

What WNLI is. Each premise is a Winograd schema sentence with an ambiguous pronoun; each hypothesis
copies (part of) the sentence with the pronoun replaced by ONE candidate referent; the label says
whether that candidate is the right one. Classifying every pair on its own, as GLUE fine-tuning does,
ignores that the hypotheses of one premise COMPETE: a pronoun has one referent, so of the two
hypotheses that substitute the two candidates, one is true. Counted on the real files: 242 of the 243
train premises with two hypotheses have exactly one entailed; premises with 3 / 4 hypotheses (two
pronouns or partial copies) have 1 / 2 entailed in 9 of 10 / 8 of 8 cases. The majority class
(not_entailment) is the floor: 56.3% of dev, 65.1% of test; plain fine-tuning of a small encoder lands on
or below it, because nothing in a single pair tells the candidates apart.

The treatment (`wnli_treatment`, a FinetuneConfig key; the logits saved by a run stay the model's own):
  none          argmax per pair (plain GLUE fine-tuning).
  groups        WSC-style candidate scoring inside the evaluated split: hypotheses with the same premise
                (whitespace-normalised) form a group of n; the k(n) with the highest model probability of
                entailment are predicted entailed, the others not. k(n) is read off the train split
                (`GroupPrior`: the median number of entailed hypotheses among train groups of size n;
                sizes never seen: round(n x the entailed share of train groups with n >= 2)). A premise
                with a single hypothesis has no competitor and keeps the model's argmax.
  groups+train  the same, but a group also holds the premise's TRAIN hypotheses, whose gold labels are
                known: they fill the k(n) slots first, the model ranks the rest. Test labels are never
                read (GLUE has none); train labels are the training data.
  majority      every row gets the train split's majority class (not_entailment): the floor itself, the
                safe leaderboard submission for a model that cannot rank candidates.

Read the numbers with care (docs/tricks.md, "WNLI"): 61 of the 64 dev premises also occur in train
(the dev set is built adversarially from the same schemas), but only 3 of the 45 test premises do. So
`groups+train` is strong on dev through train labels that test rows mostly cannot use, while on test every
premise has 2-9 hypotheses and `groups` does the work with the model's own ranking. The dev number of
`groups+train` is therefore NOT an estimate of its test accuracy; `results.json` reports, beside the
treated dev accuracy, the plain argmax one, the majority floor and how many dev rows were decided by train
labels, so the two can be told apart.

A test-like estimate, premise-disjoint 2-fold on train, is vegalm/experiments/wnli.py.
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
