"""One ablation run, a (combo, task, seed): its stages around the fine-tunes, and its JSON record."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vegalm.errors import VegaError
from vegalm.experiments.ablate.combos import SELF_TRAINING, TAPT, VANILLA, Combo
from vegalm.finetune.stages import Stage, Teacher
from vegalm.finetune.stages.self_training import SelfTraining, write_pseudo_jsonl
from vegalm.finetune.stages.tapt import Tapt

log = logging.getLogger(__name__)


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


def combo_stages(combo: Combo, task: str, seed: int, *, base: dict, out: Path, glue_dir: str, fraction: float,
                 tapt: dict | None = None, min_dev_accuracy: float = 0.0) -> list[Stage]:
    """The combo's stages, in the order they run: TAPT before the teacher, self-training after it."""
    make = {
        TAPT: lambda: Tapt(task, base["model"], str(out / TAPT / task / f"seed{seed}"), glue_dir, seed,
                           bool(base.get("progress", (base.get("train") or {}).get("progress", True))), tapt or {}),
        SELF_TRAINING: lambda: SelfTraining(task, glue_dir, fraction, min_dev_accuracy),
    }
    return [make[name]() for name in combo.stages]


def run_one(combo: Combo, task: str, seed: int, *, base: dict, trick_args: dict, out: Path, glue_dir: str,
            fraction: float, tapt: dict | None = None, cached_only: bool = False,
            min_dev_accuracy: float = 0.0) -> tuple[dict, int]:
    """Run (or read back) one (combo, task, seed); returns (its record, number of runs actually trained).
    With `cached_only`, a missing run raises runner.NotCachedError instead of training."""
    from functools import partial

    from vegalm.finetune.run import run_finetune

    run_finetune = partial(run_finetune, cached_only=cached_only)

    run_dir = out / combo.name / task / f"seed{seed}"
    stages = combo_stages(combo, task, seed, base=base, out=out, glue_dir=glue_dir, fraction=fraction, tapt=tapt,
                          min_dev_accuracy=min_dev_accuracy)
    parts: dict[str, dict] = {}
    pseudo_info = None
    for stage in (s for s in stages if not s.needs_teacher):  # TAPT: a new encoder to fine-tune from
        got = stage.run(None)
        parts[stage.name] = got.info
        base = {**base, "model": got.model}
    after = [s for s in stages if s.needs_teacher]
    if not after:
        final, final_dir = run_finetune(_run_config(base, trick_args, combo, task, seed, run_dir)), run_dir
        parts["run"] = final
    else:
        # the teacher: this combo without self-training; for `transductive` alone that is the vanilla run
        shared = not combo.tricks and not combo.tapt
        teacher_dir = out / VANILLA / task / f"seed{seed}" if shared else run_dir / "teacher"
        teacher = run_finetune(_run_config(base, trick_args, combo, task, seed, teacher_dir))
        parts["teacher"] = teacher
        final, final_dir = teacher, teacher_dir
        for stage in after:  # self-training: the teacher's pseudo-labels, then the student
            got = stage.run(Teacher(teacher_dir, teacher))
            pseudo_info = got.info
            if got.rows:
                pseudo_path = run_dir / "pseudo.jsonl"
                write_pseudo_jsonl(pseudo_path, got.rows)
                final = run_finetune(_run_config(base, trick_args, combo, task, seed, run_dir, extra=pseudo_path))
                final_dir = run_dir
                parts["student"] = final
            else:  # nothing to add: training again on the same data would only be a reseeded teacher
                log.warning("%s %s seed %d: no pseudo-labels (%s); reporting the teacher's run",
                            combo.name, task, seed, pseudo_info["skipped"])
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
