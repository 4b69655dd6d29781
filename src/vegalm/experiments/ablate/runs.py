"""One ablation run, a (combo, task, seed): TAPT, teacher, pseudo-labels, student, and its JSON record."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from vegalm.errors import VegaError
from vegalm.experiments.ablate.combos import TAPT, VANILLA, Combo

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------ pseudo-labels


def _read_test_index(path: Path) -> list[tuple[str, int]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader)
        return [(row[0], int(row[1])) for row in reader]


def pseudo_labels_from_run(run_dir: Path, res: dict, task: str, glue_dir: str,
                           fraction: float, min_dev_accuracy: float = 0.0) -> tuple[list, dict]:
    """Confident, class-balanced pseudo-labels from a finished run's test logits: (Examples, info).

    The test rows are read with `load_split` (GLUE test files have no labels) and handed to
    `transductive.pseudo_label`, which reads guid, index and texts only. When the teacher's accuracy
    on the dev rows past the same cut is below `min_dev_accuracy` (percent), none are returned."""
    from vegalm.data.glue import get_task, load_split
    from vegalm.finetune.transductive import confidences, pseudo_label

    spec = get_task(task)
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
    index = _read_test_index(run_dir / "test_predictions.tsv")
    chosen = []
    cut = [np.inf] * spec.num_labels  # per predicted class: the lowest confidence that was kept
    for split, (a, b) in rows.items():
        examples = load_split(task, split, glue_dir)
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
    from vegalm.data.glue import load_split
    from vegalm.finetune.transductive import confidences

    conf, pred, _ = confidences(np.load(run_dir / "dev_logits.npy"))
    gold = np.full(len(pred), -1)
    for split, (a, b) in res["dev_rows"].items():
        gold[a:b] = [ex.label for ex in load_split(task, split, glue_dir)]
    keep = np.array([c >= cut[k] for c, k in zip(conf, pred)])
    n = int(keep.sum())
    return {"dev_rows_at_cut": n, "dev_rows": len(pred),
            "dev_accuracy_at_cut": round(float((pred[keep] == gold[keep]).mean()) * 100, 2) if n else None}


def _write_if_changed(path: Path, text: str) -> None:
    """Rewrite only on a change, so the file (and the cache key hashed from it) stays put on a rerun."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_pseudo_jsonl(path: Path, examples: list) -> None:
    lines = [json.dumps({"guid": ex.guid, "index": ex.index, "text_a": ex.text_a, "text_b": ex.text_b,
                         "label": ex.label}, ensure_ascii=False) for ex in examples]
    _write_if_changed(path, "".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------------------- one run


def calibration_numbers(run_dir: Path, res: dict, task: str, glue_dir: str) -> dict | None:
    """ECE / NLL before and after temperature scaling on the run's dev logits (all dev splits pooled)."""
    from vegalm.data.glue import get_task, load_split
    from vegalm.finetune.calibration import calibration_report

    if get_task(task).is_regression:
        return None
    logits = np.load(run_dir / "dev_logits.npy")
    labels = np.zeros(len(logits), dtype=np.int64)
    for split, (a, b) in res["dev_rows"].items():
        gold = [ex.label for ex in load_split(task, split, glue_dir)]
        if len(gold) != b - a:
            raise VegaError(f"{run_dir}: {b - a} dev rows for {split}, but the dev file has {len(gold)}")
        labels[a:b] = gold
    rep = calibration_report(logits, labels, seed=0)  # seed 0: the same dev halves for every combo
    keys = ("ece_before", "ece_after", "ece_after_crossfit", "nll_before", "nll_after", "nll_after_crossfit",
            "temperature")
    return {k: round(float(rep[k]), 5) for k in keys if k in rep}


def _split_scores(res: dict) -> dict[str, float]:
    from vegalm.finetune.metrics import task_score

    keys = res["dev_metric_keys"]
    return {keys[s]: round(task_score(keys[s], m), 4) for s, m in res["dev"].items()}


def _run_config(base: dict, trick_args: dict, combo: Combo, task: str, seed: int, out: Path,
                extra: Path | None = None) -> dict:
    cfg = {**base, "task": task, "seed": seed, "out": str(out), "tricks": list(combo.tricks),
           "trick_args": {k: v for k, v in trick_args.items() if k in combo.tricks}}
    if extra is not None:
        cfg["extra_train"] = str(extra)
    return cfg


def run_one(combo: Combo, task: str, seed: int, *, base: dict, trick_args: dict, out: Path, glue_dir: str,
            fraction: float, tapt: dict | None = None, cached_only: bool = False,
            min_dev_accuracy: float = 0.0) -> tuple[dict, int]:
    """Run (or read back) one (combo, task, seed); returns (its record, number of runs actually trained).
    With `cached_only`, a missing run raises runner.NotCachedError instead of training."""
    from functools import partial

    from vegalm.finetune.runner import run_finetune

    run_finetune = partial(run_finetune, cached_only=cached_only)

    run_dir = out / combo.name / task / f"seed{seed}"
    parts: dict[str, dict] = {}
    pseudo_info = None
    if combo.tapt:
        from vegalm.config import deep_merge
        from vegalm.pretrain.tapt import run_tapt

        fixed = {"task": task, "model": base["model"], "out": str(out / TAPT / task / f"seed{seed}"),
                 "glue_dir": glue_dir, "train": {"seed": seed, "progress": bool(base.get("progress", True))}}
        t = run_tapt(deep_merge(tapt or {}, fixed))
        parts["tapt"] = {"timing": {"wall_s": t["wall_s"]}, "cached": t["cached"], "train": {"steps": t["train"]["step"]}}
        base = {**base, "model": t["model_path"]}
    if not combo.transductive:
        final, final_dir = run_finetune(_run_config(base, trick_args, combo, task, seed, run_dir)), run_dir
        parts["run"] = final
    else:
        # the teacher: this combo without transductive; for `transductive` alone that is the vanilla run
        shared = not combo.tricks and not combo.tapt
        teacher_dir = out / VANILLA / task / f"seed{seed}" if shared else run_dir / "teacher"
        teacher = run_finetune(_run_config(base, trick_args, combo, task, seed, teacher_dir))
        parts["teacher"] = teacher
        chosen, pseudo_info = pseudo_labels_from_run(teacher_dir, teacher, task, glue_dir, fraction,
                                                     min_dev_accuracy)
        pseudo_info["teacher_dir"] = str(teacher_dir)
        pseudo_info["teacher_config_hash"] = teacher["config_hash"]
        pseudo_info["teacher_dev_score"] = round(float(teacher["dev_score"]), 4)
        if chosen:
            pseudo_path = run_dir / "pseudo.jsonl"
            write_pseudo_jsonl(pseudo_path, chosen)
            final = run_finetune(_run_config(base, trick_args, combo, task, seed, run_dir, extra=pseudo_path))
            final_dir = run_dir
            parts["student"] = final
        else:  # nothing to add: training again on the same data would only be a reseeded teacher
            log.warning("%s %s seed %d: no pseudo-labels (%s); reporting the teacher's run",
                        combo.name, task, seed, pseudo_info["skipped"])
            final, final_dir = teacher, teacher_dir
    trained = sum(not p["cached"] for p in parts.values())
    record = {
        "combo": combo.name,
        "task": final["task"],
        "seed": seed,
        "tricks": list(combo.tricks),
        "transductive": combo.transductive,
        "tapt": combo.tapt,
        "dev": final["dev"],
        "split_scores": _split_scores(final),
        "dev_score": round(float(final["dev_score"]), 4),
        "wall_s": round(sum(p["timing"]["wall_s"] for p in parts.values()), 2),
        "wall_parts_s": {k: p["timing"]["wall_s"] for k, p in parts.items()},
        "train_steps": {k: p["train"]["steps"] for k, p in parts.items()},
        "num_train_examples": final["num_train_examples"],
        "calibration": calibration_numbers(final_dir, final, final["task"], glue_dir),
        "pseudo": pseudo_info,
        "config_hash": final["config_hash"],
        "run_dir": str(final_dir),
        "device": final.get("device"),
        "device_name": final.get("device_name"),
        "created": final.get("created"),
    }
    return record, trained
