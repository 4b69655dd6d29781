"""GLUE metrics against values worked out by hand (not by calling sklearn/scipy again)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from vegalm.errors import VegaError
from vegalm.finetune.metrics import compute_metrics, glue_score, glue_summary, task_score


def confusion(gold, pred):
    tp = sum(g == 1 and p == 1 for g, p in zip(gold, pred))
    tn = sum(g == 0 and p == 0 for g, p in zip(gold, pred))
    fp = sum(g == 0 and p == 1 for g, p in zip(gold, pred))
    fn = sum(g == 1 and p == 0 for g, p in zip(gold, pred))
    return tp, tn, fp, fn


GOLD = [1, 1, 1, 1, 0, 0, 0, 1, 0, 0]
PRED = [1, 1, 0, 1, 1, 0, 0, 0, 0, 0]  # tp=3 tn=4 fp=1 fn=2


def test_binary_mcc_f1_accuracy_by_hand():
    tp, tn, fp, fn = confusion(GOLD, PRED)
    assert (tp, tn, fp, fn) == (3, 4, 1, 2)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # 10 / sqrt(600)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall)  # 2/3
    assert compute_metrics("cola", PRED, GOLD) == {"mcc": pytest.approx(100 * mcc)}
    assert compute_metrics("cola", PRED, GOLD)["mcc"] == pytest.approx(40.8248, abs=1e-4)
    m = compute_metrics("mrpc", PRED, GOLD)
    assert m == {"f1": pytest.approx(100 * f1), "accuracy": pytest.approx(70.0)}
    assert m["f1"] == pytest.approx(66.6667, abs=1e-4)
    assert list(compute_metrics("qqp", PRED, GOLD)) == ["f1", "accuracy"]
    for task in ("sst2", "qnli", "rte", "wnli", "mnli", "mnli_m", "mnli_mm"):
        assert compute_metrics(task, PRED, GOLD) == {"accuracy": pytest.approx(70.0)}


def test_multiclass_mcc_for_ax_by_hand():
    gold = [0, 0, 1, 1, 2, 2, 2]
    pred = [0, 1, 1, 1, 2, 0, 2]
    # Gorodkin: (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))
    s, c = len(gold), sum(g == p for g, p in zip(gold, pred))
    t = [gold.count(k) for k in range(3)]
    p = [pred.count(k) for k in range(3)]
    num = c * s - sum(a * b for a, b in zip(p, t))
    den = math.sqrt((s * s - sum(a * a for a in p)) * (s * s - sum(b * b for b in t)))
    assert num / den == pytest.approx(19 / 32)
    assert compute_metrics("ax", pred, gold) == {"mcc": pytest.approx(100 * 19 / 32)}


def test_stsb_pearson_spearman_by_hand():
    pred = [0.5, 1.0, 2.5, 4.0, 4.9]
    gold = [2.0, 1.0, 4.0, 3.0, 5.0]
    mx, my = sum(pred) / 5, sum(gold) / 5
    cov = sum((x - mx) * (y - my) for x, y in zip(pred, gold))
    pearson = cov / math.sqrt(sum((x - mx) ** 2 for x in pred) * sum((y - my) ** 2 for y in gold))
    # Ranks: pred 1..5, gold [2,1,4,3,5]; spearman = 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 24/120
    spearman = 1 - 6 * 4 / (5 * 24)
    m = compute_metrics("stsb", pred, gold)
    assert m == {"pearson": pytest.approx(100 * pearson), "spearman": pytest.approx(100 * spearman)}
    assert m["spearman"] == pytest.approx(80.0) and m["pearson"] == pytest.approx(82.159, abs=1e-3)
    col = np.array(pred).reshape(-1, 1)  # a regression head's (N, 1) output
    assert compute_metrics("STS-B", col, gold) == m
    assert compute_metrics("stsb", [2.5] * 5, gold) == {"pearson": 0.0, "spearman": 0.0}  # undefined -> 0


def test_logits_and_errors():
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5]])
    assert compute_metrics("sst2", logits, [1, 0, 0]) == {"accuracy": pytest.approx(200 / 3)}
    with pytest.raises(ValueError, match="does not match"):
        compute_metrics("rte", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="no examples"):
        compute_metrics("rte", [], [])
    with pytest.raises(VegaError, match="unknown GLUE task 'foo'"):
        compute_metrics("foo", [0], [0])


def test_task_score():
    assert task_score("mrpc", {"f1": 90.0, "accuracy": 86.0}) == 88.0
    assert task_score("stsb", {"pearson": 88.0, "spearman": 87.0}) == 87.5
    assert task_score("cola", {"mcc": 60.5}) == 60.5
    assert task_score("rte", 70.1) == 70.1
    with pytest.raises(VegaError, match="qqp: missing metric 'accuracy'"):
        task_score("qqp", {"f1": 70.0})


# GLUE human baselines as listed on the leaderboard (its Score column shows 87.1), and BERT-large (80.5).
HUMAN = {
    "cola": {"mcc": 66.4}, "sst2": {"accuracy": 97.8}, "mrpc": {"f1": 86.3, "accuracy": 80.8},
    "stsb": {"pearson": 92.7, "spearman": 92.6}, "qqp": {"f1": 59.5, "accuracy": 80.4},
    "mnli_m": {"accuracy": 92.0}, "mnli_mm": {"accuracy": 92.8}, "qnli": {"accuracy": 91.2},
    "rte": {"accuracy": 93.6}, "wnli": {"accuracy": 95.9},
}
BERT_LARGE = {
    "cola": {"mcc": 60.5}, "sst2": {"accuracy": 94.9}, "mrpc": {"f1": 89.3, "accuracy": 85.4},
    "stsb": {"pearson": 87.6, "spearman": 86.5}, "qqp": {"f1": 72.1, "accuracy": 89.3},
    "mnli_m": {"accuracy": 86.7}, "mnli_mm": {"accuracy": 85.9}, "qnli": {"accuracy": 92.7},
    "rte": {"accuracy": 70.1}, "wnli": {"accuracy": 65.1}, "ax": {"mcc": 39.6},
}


def test_glue_score_matches_leaderboard_rows():
    # 9 tasks; two-metric tasks averaged; MNLI = mean(m, mm):
    # 66.4 + 97.8 + 83.55 + 92.65 + 69.95 + 92.4 + 91.2 + 93.6 + 95.9 = 783.45
    assert glue_score(HUMAN) == pytest.approx(783.45 / 9)
    assert glue_score(HUMAN) == pytest.approx(87.1, abs=0.05 + 1e-9)  # leaderboard shows 1 decimal
    assert glue_score(BERT_LARGE) == pytest.approx(80.5, abs=0.05)  # AX present but not averaged
    without_ax = {k: v for k, v in BERT_LARGE.items() if k != "ax"}
    assert glue_score(without_ax) == glue_score(BERT_LARGE)
    # The alternative convention: MNLI-m and MNLI-mm as two of ten tasks.
    assert glue_score(HUMAN, mnli_as_two_tasks=True) == pytest.approx((783.45 - 92.4 + 92.0 + 92.8) / 10)
    s = glue_summary(BERT_LARGE)
    assert not s["partial"] and s["missing"] == [] and "AX" in s["note"]
    assert s["task_scores"]["mnli"] == pytest.approx(86.3) and s["task_scores"]["mrpc"] == pytest.approx(87.35)


def test_glue_score_partial(caplog):
    with caplog.at_level(logging.WARNING, logger="vegalm.finetune.metrics"):
        score = glue_score({"cola": {"mcc": 50.0}, "rte": {"accuracy": 70.0}, "mnli_m": {"accuracy": 80.0}})
    assert score == pytest.approx((50 + 70 + 80) / 3)
    assert "partial: averaged 3 of 9 tasks" in caplog.text and "MNLI from one split only" in caplog.text
    s = glue_summary({"cola": {"mcc": 50.0}})
    assert s["partial"] and "sst2" in s["missing"] and "mnli" in s["missing"]
    with pytest.raises(VegaError, match="'mnli_m' and 'mnli_mm'"):
        glue_score({"mnli": {"accuracy": 80.0}})
    with pytest.raises(VegaError, match="no GLUE task scores"):
        glue_score({"ax": {"mcc": 10.0}})
