"""GLUE leaderboard metrics (scikit-learn / scipy), in points (x100), and the leaderboard average.

    from vegalm.finetune.metrics import compute_metrics, task_score, glue_score
    m = compute_metrics("mrpc", preds, labels)        # {"f1": 89.1, "accuracy": 85.0}
    task_score("mrpc", m)                              # 87.05: mean of the two
    glue_score({"cola": {...}, "mnli_m": {...}, "mnli_mm": {...}, ...})

Task keys: cola, sst2, mrpc, stsb, qqp, mnli (or mnli_m / mnli_mm, one per MNLI dev/test split), qnli,
rte, wnli, ax. Predictions are label ids (floats for STS-B); a 2-D array of logits is reduced with argmax.
A correlation that is undefined (constant predictions or labels) counts as 0, as sklearn does for MCC, so
a collapsed model scores 0 instead of turning the average into NaN.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vegalm.errors import VegaError

log = logging.getLogger(__name__)

# The leaderboard's metrics per task, in the order it lists them.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "qqp": ("f1", "accuracy"),
    "mnli": ("accuracy",),
    "mnli_m": ("accuracy",),
    "mnli_mm": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "ax": ("mcc",),
}
# The nine tasks the leaderboard Score averages (AX is diagnostic and not averaged).
SCORE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")


def _task_key(task: str) -> str:
    key = str(task).lower().replace("-", "_")
    key = {"sst_2": "sst2", "sts_b": "stsb"}.get(key, key)
    if key not in TASK_METRICS:
        raise VegaError(f"unknown GLUE task {task!r} for metrics (known: {', '.join(TASK_METRICS)})")
    return key


def _as_array(x: Any, regression: bool) -> np.ndarray:
    arr = np.asarray(x, dtype=float if regression else None)
    if regression:
        return arr.reshape(len(arr), -1)[:, 0] if arr.ndim == 2 else arr
    if arr.ndim == 2:  # logits -> ids
        arr = arr.argmax(axis=-1)
    return arr.astype(np.int64)


def _corr(fn, a: np.ndarray, b: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input and returns NaN
        r = float(fn(a, b)[0])
    return 0.0 if math.isnan(r) else r


def compute_metrics(task: str, predictions: Sequence | np.ndarray, labels: Sequence | np.ndarray) -> dict[str, float]:
    """Leaderboard metrics for one task, in points (x100)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    key = _task_key(task)
    regression = key == "stsb"
    preds, gold = _as_array(predictions, regression), _as_array(labels, regression)
    if preds.shape != gold.shape or preds.ndim != 1:
        raise ValueError(f"{key}: predictions shape {preds.shape} does not match labels shape {gold.shape}")
    if len(gold) == 0:
        raise ValueError(f"{key}: no examples to score")
    out: dict[str, float] = {}
    for name in TASK_METRICS[key]:
        if name == "accuracy":
            value = accuracy_score(gold, preds)
        elif name == "f1":  # positive class is label id 1 ("1" = paraphrase / duplicate)
            value = f1_score(gold, preds, pos_label=1, average="binary", zero_division=0)
        elif name == "mcc":  # multi-class (Gorodkin's R_K) for AX
            value = matthews_corrcoef(gold, preds)
        elif name == "pearson":
            value = _corr(pearsonr, preds, gold)
        else:
            value = _corr(spearmanr, preds, gold)
        out[name] = 100.0 * float(value)
    return out


def task_score(task: str, metrics: Mapping[str, float] | float) -> float:
    """The one number the leaderboard averages for a task: the mean of its metrics (MRPC, QQP, STS-B have two)."""
    key = _task_key(task)
    if isinstance(metrics, (int, float)):
        return float(metrics)
    names = TASK_METRICS[key]
    missing = [n for n in names if n not in metrics]
    if missing:
        raise VegaError(f"{key}: missing metric {missing[0]!r} (got {', '.join(metrics) or 'none'})")
    return float(sum(float(metrics[n]) for n in names) / len(names))


def glue_summary(per_task: Mapping[str, Mapping[str, float] | float], *, mnli_as_two_tasks: bool = False) -> dict:
    """`glue_score` with its working: {"score", "task_scores", "missing", "partial", "note"}."""
    scores: dict[str, float] = {}
    for task, metrics in per_task.items():
        key = _task_key(task)
        if key == "mnli":
            raise VegaError("glue_score: give MNLI as 'mnli_m' and 'mnli_mm' (the two dev/test splits)")
        scores[key] = task_score(key, metrics)
    notes = []
    if "ax" in scores:
        notes.append("AX is diagnostic and not averaged")
    used: dict[str, float] = {k: v for k, v in scores.items() if k in SCORE_TASKS}
    mnli = [scores[k] for k in ("mnli_m", "mnli_mm") if k in scores]
    if mnli_as_two_tasks:
        used |= {k: scores[k] for k in ("mnli_m", "mnli_mm") if k in scores}
        expected = [t for t in SCORE_TASKS if t != "mnli"] + ["mnli_m", "mnli_mm"]
    else:
        if mnli:
            used["mnli"] = sum(mnli) / len(mnli)
        if len(mnli) == 1:
            notes.append("MNLI from one split only")
        expected = list(SCORE_TASKS)
    missing = [t for t in expected if t not in used]
    if not used:
        raise VegaError("glue_score: no GLUE task scores to average")
    score = sum(used.values()) / len(used)
    if missing:
        notes.insert(0, f"partial: averaged {len(used)} of {len(expected)} tasks (missing {', '.join(missing)})")
    return {
        "score": score,
        "task_scores": used,
        "missing": missing,
        "partial": bool(missing) or len(mnli) == 1,
        "note": "; ".join(notes),
    }


def glue_score(per_task: Mapping[str, Mapping[str, float] | float], *, mnli_as_two_tasks: bool = False) -> float:
    """The GLUE leaderboard "Score": an unweighted mean of per-task scores.

    Rule (it reproduces published leaderboard rows, e.g. the human baseline's 87.1 and BERT-large's 80.5;
    counting MNLI-m and MNLI-mm as two tasks would give 87.6 and 81.1):
      * nine tasks: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI;
      * a two-metric task (MRPC F1/acc, QQP F1/acc, STS-B Pearson/Spearman) counts as the mean of its two;
      * MNLI counts once, as the mean of MNLI-m and MNLI-mm (keys "mnli_m", "mnli_mm");
      * AX is diagnostic and is NOT included.
    `mnli_as_two_tasks=True` instead counts MNLI-m and MNLI-mm as two separate tasks (ten in all), as some
    papers' "Avg" columns do; it does not reproduce the leaderboard Score.

    `per_task` maps task key -> metrics dict from `compute_metrics` (or an already-reduced task score).
    With only some tasks present the mean is over the present ones; a warning is logged and
    `glue_summary(...)["note"]` says which tasks were missing.
    """
    summary = glue_summary(per_task, mnli_as_two_tasks=mnli_as_two_tasks)
    if summary["note"]:
        log.warning("glue_score %.2f: %s", summary["score"], summary["note"])
    return summary["score"]
