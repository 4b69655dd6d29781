"""Trick ablation: what each fine-tuning trick buys over our best vanilla recipe, over tasks x seeds.

    vegalm ablate --model minilm-l6 --tasks rte,mrpc,stsb,cola --seeds 3 \\
        --tricks vanilla,adv,selfcal,transductive,all --out runs/ablate
    vegalm ablate --summary results/ablation/minilm-l6        # the table again, from committed JSON only
    vegalm ablate --model minilm-l6 --seeds 3 --jobs 12 --out runs/ablate      # 12 runs at once (one GPU)
    vegalm ablate --model minilm-l6 --seeds 3 --jobs 2 --out runs/ablate grad_accum=4   # CPU: less padding,
                                                                   # same gradients (finetune/tasks.py)

    from vegalm.finetune.ablate import run_ablation, load_records, summarize
    s = run_ablation("minilm-l6", "rte,stsb", seeds=3, combos="vanilla,adv", out="runs/ablate")
    s["avg"]["adv"] - s["avg"]["vanilla"]

Combos (`--tricks`, comma-separated; parts of one combo may be joined with `+`, e.g. `adv+ema`):
  vanilla       FinetuneConfig with `defaults=vega` (our per-task recipe) and no tricks.
  adv, selfcal  tricks=[adv] / tricks=[selfcal]; any other TRICKS name (smart, freelb, r3f, sift, ema)
                is accepted as a single-trick combo. `trick_args.NAME.key=value` reaches every combo
                that has trick NAME.
  transductive  self-training on the task's test INPUTS (variant (b) of docs/tricks.md): the teacher is
                the combo without `transductive` (for `transductive` alone: the vanilla run itself,
                shared with the vanilla combo), its test logits select confident, class-balanced
                pseudo-labels (`transductive.pseudo_label`, top `pseudo_fraction` = 30% of each test
                split by default), and a fresh fine-tune from the pretrained model trains on
                train + pseudo-labels (FinetuneConfig.extra_train). Test labels are never read: GLUE
                gives none, and the test rows are handed to `pseudo_label`, which reads texts only.
                STS-B (regression) has no confidence to select by, so it gets NO pseudo-labels: its
                transductive result is the teacher's (for `transductive`: exactly vanilla's), said so
                in the record. MNLI's AX rows (a diagnostic set) are never pseudo-labelled.
                Each record also keeps the teacher's dev accuracy on the dev rows past the same
                confidence cut (`dev_accuracy_at_cut`: how right such pseudo-labels probably are) and,
                with `pseudo_min_dev_accuracy` > 0 (off by default), the student is skipped, and the row
                reports the teacher, when that accuracy is below the bar.
  tapt          variant (a): task-adaptive continued RTD on the task's train+dev+test text
                (pretrain/tapt.py, its TaptConfig defaults, seeded with the run seed, cached in
                out/tapt/<task>/seed<k>/), then the combo's fine-tuning starts from that discriminator.
                Only for our own pretrained encoders (it needs the RTD generator); MiniLM-L6 has none,
                so the MiniLM sweep leaves it out. Combine freely: all+tapt, tapt+adv. Its wall time
                counts in the combo's cost.
  all           adv + selfcal + transductive. EMA is left out: it is not one of the Vega v1 tricks, and
                its default 0.999 decay averages over ~1000 updates, about the whole length of an RTE
                or MRPC run (770 / 1140 steps with the vega defaults), so it would fold under-trained
                early weights into the evaluated model; measure it on its own (`ema`, `all+ema`).

Every (combo, task, seed) is a `run_finetune` run, cached in out/<combo>/<task>/seed<k>/ (a transductive
teacher in .../seed<k>/teacher/ unless shared with vanilla, its pseudo-labels in .../seed<k>/pseudo.jsonl),
so an interrupted sweep continues where it stopped. Runs go seed-major (every task and combo for seed 0
first), so a stopped sweep still has a complete one-seed table. `--jobs N` runs N jobs at once in worker
processes (`plan_jobs`: combos that share folders stay in one job; longest first within a seed): a small
model leaves a big GPU mostly idle, and several runs side by side use more of it (not yet timed on a
GPU). Cache keys hash the model and data by content (finetune/runner.py), so out/ carried to another
machine is reused there. Each finished run also writes a small JSON record to
<results-dir>/<model-tag>/<combo>__<task>__seed<k>.json (dev metrics, task score, wall time, calibration,
config hash, device, pseudo-label counts); those files are meant to be committed, and `--summary`
rebuilds the table from them alone.

Report (printed, and written to out/ablation.md, out/ablation.json, out/ablation.png): per task and combo
the mean ± std (sample, ddof 1) and median of the dev task score over seeds; the task average (a two-metric
task counts as the mean of its two, MNLI as the mean of m and mm, as GLUE does); each combo's change vs
vanilla, per task and on average, and the tasks where a combo's mean is below vanilla's by more than
vanilla's seed std on that task; wall time relative to vanilla over the same (task, seed) runs (a
transductive run counts its teacher and its student, even when the teacher is shared with vanilla);
for classification tasks, ECE (15 bins, in %) and NLL on dev before and after post-hoc temperature
scaling, the 2-fold cross-fitted "after" numbers being the headline (calibration.py); and, for
MiniLM-L6, the comparison with the plain transformers-Trainer anchor (ANCHOR). The last stdout line
is one JSON object: {"tasks": [...], "seeds": N, "avg": {combo: task-average dev score}}.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vegalm.config import ConfigError
from vegalm.errors import VegaError

log = logging.getLogger(__name__)

DEFAULT_COMBOS = "vanilla,adv,selfcal,transductive,all"
VANILLA, TRANSDUCTIVE, ALL, TAPT = "vanilla", "transductive", "all", "tapt"
ALL_TRICKS = ("adv", "selfcal")  # + transductive; see the module docstring for why not ema
COMBO_ORDER = (VANILLA, "adv", "selfcal", TRANSDUCTIVE, ALL)  # report order; others follow, sorted
SET_BY_ABLATION = ("task", "model", "out", "seed", "tricks", "extra_train")
WORSE_TOL = 0.005  # points: below the table's 2-decimal resolution, a rounding difference is not a loss
PSEUDO_FRACTION = 0.3  # share of each test split kept as pseudo-labels (split evenly over the classes)
# Task order of the report: the GLUE leaderboard's.
TASK_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
# The plain transformers-Trainer anchor on MiniLM-L6: run_glue defaults, seed 42, dev, task scores in points
# (MRPC = mean of F1 82.4 / acc 72.6, STS-B = mean of Pearson 80.5 / Spearman 82.3); 4-task average 56.3.
ANCHOR = {"rte": 52.3, "mrpc": 77.5, "stsb": 81.4, "cola": 14.0}
ANCHOR_MODEL = "minilm-l6"
ANCHOR_NOTE = "transformers Trainer, MiniLM-L6, run_glue defaults, seed 42, dev"


# ------------------------------------------------------------------------------------------- combos


@dataclass(frozen=True)
class Combo:
    name: str
    tricks: tuple[str, ...]
    transductive: bool
    tapt: bool = False  # task-adaptive RTD first (transductive (a)); our own encoders only


def _trick_registry() -> list[str]:
    from vegalm.finetune.tricks import TRICKS

    return list(TRICKS)


def valid_combo_names() -> list[str]:
    return [VANILLA, TRANSDUCTIVE, ALL, TAPT] + [t for t in _trick_registry() if t not in (VANILLA, TRANSDUCTIVE, ALL)]


def parse_combos(text: str | list[str]) -> list[Combo]:
    """'vanilla,adv,all' -> Combos; a part joined with '+' adds to the same combo ('adv+ema')."""
    names = text.split(",") if isinstance(text, str) else list(text)
    registry = _trick_registry()
    out: list[Combo] = []
    for raw in (n.strip() for n in names):
        if not raw or raw in (c.name for c in out):
            continue
        tricks: list[str] = []
        transductive = tapt = False
        parts = raw.split("+")
        for part in parts:
            if part == VANILLA and len(parts) == 1:
                continue
            if part == TRANSDUCTIVE:
                transductive = True
            elif part == TAPT:
                tapt = True
            elif part == ALL:
                transductive = True
                tricks += [t for t in ALL_TRICKS if t not in tricks]
            elif part in registry:
                if part not in tricks:
                    tricks.append(part)
            else:
                raise ConfigError(f"tricks: unknown combo {raw!r} (valid: {', '.join(valid_combo_names())}; "
                                  "join parts with '+', e.g. adv+ema)")
        out.append(Combo(raw, tuple(tricks), transductive, tapt))
    if not out:
        raise ConfigError(f"tricks: no combo given (e.g. --tricks {DEFAULT_COMBOS})")
    return out


def model_tag(model: str) -> str:
    """A folder name for a model: the alias itself, else the last two path parts ('runs/pt/discriminator'
    -> 'pt-discriminator'; a Hub id 'org/name' -> 'org-name')."""
    text = str(model).rstrip("/")
    parts = [p for p in Path(text).parts if p not in ("/", ".", "..")][-2:]
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts) or text).strip("-.")
    if not tag:
        raise ConfigError(f"model-tag: cannot derive a tag from model {model!r}; pass --model-tag")
    return tag


def _record_name(combo: str, task: str, seed: int) -> str:
    return f"{combo}__{task}__seed{seed}.json"


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


# ------------------------------------------------------------------------------------------ sweep


# Per-step cost of a trick relative to a vanilla step (results/trick_cost/minilm-l6-mrpc.json, CPU), used
# only to start the longest jobs first when they run in parallel; unlisted tricks count 1.
STEP_COST = {"adv": 2.65, "sift": 2.65, "smart": 3.08, "freelb": 3.46, "r3f": 2.11, "ema": 1.09}


def _share_key(combo: Combo, task: str, seed: int) -> tuple:
    """Combos that write the same folders must run one after the other, in one job: `transductive` alone
    reuses the vanilla run as its teacher, and every tapt combo of a (task, seed) shares out/tapt/<task>/seed<k>."""
    if combo.tapt:
        return (TAPT, task, seed)
    if not combo.tricks:
        return (VANILLA, task, seed)
    return (combo.name, task, seed)


def _job_cost(combo: Combo, task_size: float) -> float:
    """Rough relative wall time: task size x per-step cost x (2 when a student trains after its teacher)."""
    step = 1.0
    for t in combo.tricks:
        step *= STEP_COST.get(t, 1.0)
    return task_size * step * (2 if combo.transductive else 1) * (2 if combo.tapt else 1)


def plan_jobs(combos: list[Combo], tasks: list[str], seeds: list[int],
              task_size: dict[str, float]) -> list[list[tuple[Combo, str, int]]]:
    """The sweep as jobs for parallel workers: each job is a list of (combo, task, seed) to run in order
    (combos sharing folders together, vanilla first), ordered seed-major (a sweep stopped early still has
    whole seeds) and, within a seed, longest first (so the long runs do not start last)."""
    groups: dict[tuple, list] = {}
    for seed in seeds:
        for task in tasks:
            for combo in combos:
                groups.setdefault(_share_key(combo, task, seed), []).append((combo, task, seed))
    jobs = list(groups.values())
    jobs.sort(key=lambda j: (seeds.index(j[0][2]), -sum(_job_cost(c, task_size[t]) for c, t, _ in j)))
    return jobs


def _task_size(task: str, glue_dir: str, base: dict) -> float:
    """Training tokens per run, roughly: train rows x epochs x max length (the per-task defaults)."""
    from vegalm.data.glue import split_path
    from vegalm.finetune.tasks import task_defaults

    d = task_defaults(task, base.get("defaults", "vega"))
    with open(split_path(task, "train", glue_dir), "rb") as f:
        rows = sum(1 for _ in f) - 1
    return rows * float(base.get("epochs") or d.epochs) * int(base.get("max_length") or d.max_length)


def _run_and_record(combo: Combo, task: str, seed: int, ctx: dict) -> tuple[dict | None, int]:
    """One (combo, task, seed): run it (or read it back) and write its JSON record. With
    ctx["cached_only"], a run that is not cached gives (None, 0) and no record."""
    from vegalm.finetune.runner import NotCachedError

    try:
        rec, n = run_one(combo, task, seed, base=ctx["base"], trick_args=ctx["trick_args"], out=ctx["out"],
                         glue_dir=ctx["glue_dir"], fraction=ctx["fraction"], tapt=ctx["tapt"],
                         cached_only=ctx["cached_only"], min_dev_accuracy=ctx["min_dev_accuracy"])
    except NotCachedError as e:
        log.warning("%s %s seed %d: skipped, %s", combo.name, task, seed, e)
        return None, 0
    rec = {**rec, **ctx["common"]}
    _write_if_changed(ctx["rec_dir"] / _record_name(combo.name, rec["task"], seed),
                      json.dumps(rec, indent=1, sort_keys=True) + "\n")
    return rec, n


def _run_job(job: list[tuple[Combo, str, int]], ctx: dict, threads: int | None) -> list[tuple[dict, int]]:
    """A parallel worker's job (a fresh spawned process): its runs in order, each record written as it ends."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if threads:
        import torch

        torch.set_num_threads(threads)
    return [_run_and_record(combo, task, seed, ctx) for combo, task, seed in job]


def _run_parallel(jobs: list, ctx: dict, n_workers: int, bar) -> tuple[list[dict], int, list[str]]:
    """Run `jobs` in `n_workers` spawned processes: (records, runs trained, failed jobs). A failed job
    does not stop the others."""
    import concurrent.futures as cf
    import multiprocessing as mp

    # CPU: split the cores between workers, unless the user pinned threads (OMP_NUM_THREADS)
    threads = None if os.environ.get("OMP_NUM_THREADS") else max(1, (os.cpu_count() or 1) // n_workers)
    records: list[dict] = []
    trained = 0
    failed: list[str] = []
    pool = cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=mp.get_context("spawn"))
    try:
        futures = {pool.submit(_run_job, job, ctx, threads): job for job in jobs}
        for fut in cf.as_completed(futures):
            job = futures[fut]
            try:
                done = fut.result()
            except Exception as e:  # noqa: BLE001 - one failed job must not lose the others' runs
                names = ", ".join(f"{c.name} {t} seed {s}" for c, t, s in job)
                log.error("ablation job [%s] failed: %s: %s", names, type(e).__name__, e)
                failed.append(f"[{names}]: {type(e).__name__}: {e}")
                bar.update(len(job))
                continue
            for rec, n in done:
                if rec is not None:
                    records.append(rec)
                trained += n
            bar.update(len(job))
            bar.set_postfix_str(f"done: {job[-1][0].name} {job[-1][1]} seed {job[-1][2]}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return records, trained, failed


def run_ablation(model: str, tasks: str | list[str] = "rte,mrpc,stsb,cola", seeds: int | str | list[int] = 3,
                 combos: str | list[str] = DEFAULT_COMBOS, out: str | Path = "runs/ablate", *,
                 results_dir: str | Path = "results/ablation", tag: str | None = None,
                 pseudo_fraction: float = PSEUDO_FRACTION, pseudo_min_dev_accuracy: float = 0.0, jobs: int = 1,
                 cached_only: bool = False, **overrides: Any) -> dict[str, Any]:
    """Run every seed x task x combo (cached runs are read back), write the records and the report.

    `cached_only` trains nothing: finished runs are read back and their records rewritten (say, after a
    vegalm update added a field), and the runs not in the cache are listed in the summary's "not_cached".

    `overrides` are FinetuneConfig fields for every run (`save_model` defaults to False); `progress=False`
    also hides the sweep's bar. `jobs` > 1 runs that many jobs at once in spawned worker processes (see
    `plan_jobs`; on a CPU each gets cores // jobs threads unless OMP_NUM_THREADS is set): small models
    leave a big GPU mostly idle, and several runs side by side use more of it. Returns `summarize(records)`."""
    from tqdm.auto import tqdm

    from vegalm.config import from_dict
    from vegalm.data.glue import resolve_glue_dir, split_path
    from vegalm.finetune.glue_runner import parse_seeds, parse_tasks
    from vegalm.finetune.runner import (UNHASHED, FinetuneConfig, NotCachedError, minilm_path, resolve,
                                        resolve_model_dir)

    combo_list = parse_combos(combos)
    task_list, seed_list = parse_tasks(tasks), parse_seeds(seeds)
    taken = [k for k in SET_BY_ABLATION if k in overrides]
    if taken:
        raise ConfigError(f"{taken[0]}: set by the ablation (use --model/--tasks/--seeds/--tricks/--out)")
    if not 0.0 < pseudo_fraction <= 1.0:
        raise ConfigError(f"pseudo-fraction: expected 0 < f <= 1, got {pseudo_fraction}")
    if not 0.0 <= pseudo_min_dev_accuracy <= 100.0:
        raise ConfigError(f"pseudo-min-dev-accuracy: expected a percentage in [0, 100], got {pseudo_min_dev_accuracy}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs: expected a whole number >= 1, got {jobs!r}")
    trick_args = dict(overrides.pop("trick_args", None) or {})
    tapt = dict(overrides.pop("tapt", None) or {})  # TaptConfig keys for the tapt combos: tapt.train.epochs=3
    used = {t for c in combo_list for t in c.tricks}
    stray = sorted(set(trick_args) - used)
    if stray:
        raise ConfigError(f"trick_args.{stray[0]}: trick {stray[0]!r} is in none of the combos "
                          f"({', '.join(c.name for c in combo_list)})")
    base = {"defaults": "vega", "save_model": False, **overrides, "model": model}
    probe = from_dict(FinetuneConfig, {**base, "task": task_list[0], "out": str(out),
                                       "tricks": sorted(used), "trick_args": trick_args})
    resolve(probe)  # a bad key, value or trick argument fails here, before any training
    glue_dir = str(resolve_glue_dir(probe.glue_dir))
    for task in task_list:
        if not split_path(task, "train", glue_dir).is_file():
            raise VegaError(f"{task}: no training file {split_path(task, 'train', glue_dir)}; drop it from --tasks")
    model_dir = resolve_model_dir(model)
    if cached_only and any(c.tapt for c in combo_list):
        raise ConfigError("--cached-only: the tapt combos are not covered (their pretraining has its own cache)")
    if any(c.tapt for c in combo_list):
        from vegalm.pretrain.tapt import TaptConfig, resolve_pair

        resolve_pair(model)  # no RTD generator (e.g. MiniLM-L6): fail before any training
        taken = sorted(set(tapt) & {"task", "model", "out", "glue_dir"})
        if taken:
            raise ConfigError(f"tapt.{taken[0]}: set by the ablation")
        from_dict(TaptConfig, {**tapt, "task": task_list[0], "model": model, "out": str(out)}).check()
    elif tapt:
        raise ConfigError("tapt.*: settings given but no combo uses tapt")
    tag = tag or model_tag(model)
    rec_dir = Path(results_dir) / tag
    out = Path(out)
    # what the records say about the settings: only keys that change results (not progress, save_model, ...)
    settings = {k: v for k, v in overrides.items() if k not in UNHASHED}
    if trick_args:
        settings["trick_args"] = trick_args
    if tapt:
        settings["tapt"] = tapt
    is_anchor_model = model == ANCHOR_MODEL or _same_dir(model_dir, minilm_path)
    common = {"model": model, "model_tag": tag, "overrides": settings, "pseudo_fraction": pseudo_fraction,
              **({"pseudo_min_dev_accuracy": pseudo_min_dev_accuracy} if pseudo_min_dev_accuracy else {}),
              "anchor_model": ANCHOR_MODEL if is_anchor_model else None}

    ctx = {"base": base, "trick_args": trick_args, "out": out, "glue_dir": glue_dir, "fraction": pseudo_fraction,
           "tapt": tapt, "rec_dir": rec_dir, "common": common, "cached_only": cached_only,
           "min_dev_accuracy": pseudo_min_dev_accuracy}
    records: list[dict] = []
    trained = 0
    failed: list[str] = []
    total = len(seed_list) * len(task_list) * len(combo_list)
    bar = tqdm(total=total, desc="ablation runs", unit="run", disable=not probe.progress)
    try:
        if jobs > 1:
            sizes = {t: _task_size(t, glue_dir, base) for t in task_list}
            plan = plan_jobs(combo_list, task_list, seed_list, sizes)
            ctx["base"] = {**base, "progress": False}  # one bar, the sweep's: workers' bars would interleave
            records, trained, failed = _run_parallel(plan, ctx, min(jobs, len(plan)), bar)
            order = {(c.name, t, s): i for i, (s, t, c) in enumerate(
                (s, t, c) for s in seed_list for t in task_list for c in combo_list)}
            records.sort(key=lambda r: order[(r["combo"], r["task"], int(r["seed"]))])
        else:
            for seed in seed_list:
                for task in task_list:
                    for combo in combo_list:
                        bar.set_postfix_str(f"{combo.name} {task} seed {seed}")
                        rec, n = _run_and_record(combo, task, seed, ctx)
                        trained += n
                        if rec is not None:
                            records.append(rec)
                        bar.update(1)
    finally:
        bar.close()
    failures = (f"ablation: {len(failed)} job(s) failed; a rerun retries only what is missing: "
                + "; ".join(failed))
    if failed and not records:
        raise VegaError(failures)
    if not records:  # cached_only and nothing cached
        raise NotCachedError(f"ablation --cached-only: none of the {total} runs is cached under {out}")
    summary = summarize(records)
    summary["trained_runs"] = trained
    summary["records_dir"] = str(rec_dir)
    have = {(r["combo"], r["task"], int(r["seed"])) for r in records}
    summary["not_cached"] = [f"{c.name} {t} seed {s}" for s in seed_list for t in task_list for c in combo_list
                             if (c.name, t, s) not in have] if cached_only else []
    write_report(summary, out)
    if failed:
        raise VegaError(failures + f" (the report in {out} covers the runs that finished)")
    return summary


def write_report(summary: dict, out: str | Path) -> None:
    """out/ablation.md (the printed table), out/ablation.json (every number) and out/ablation.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_if_changed(out / "ablation.md", render_markdown(summary))
    _write_if_changed(out / "ablation.json", json.dumps(summary, indent=1, default=str) + "\n")
    plot_ablation(summary, out / "ablation.png")


def _same_dir(path: Path, other) -> bool:
    try:
        return path.resolve() == Path(other()).resolve()
    except VegaError:
        return False


# ---------------------------------------------------------------------------------------- summary


def load_records(path: str | Path) -> list[dict]:
    """The ablation records under results/ablation/<model-tag>/ (or results/ablation with one tag)."""
    root = Path(path)
    if not root.is_dir():
        raise VegaError(f"summary: no such folder {root}")
    files = sorted(root.glob("*__*__seed*.json"))
    if not files:
        tags = sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob("*__*__seed*.json")))
        if len(tags) > 1:
            raise ConfigError(f"summary: {root} holds several model tags ({', '.join(tags)}); give one, "
                              f"e.g. --summary {root / tags[0]}")
        if tags:
            files = sorted((root / tags[0]).glob("*__*__seed*.json"))
    if not files:
        raise VegaError(f"summary: no ablation records (<combo>__<task>__seed<k>.json) under {root}")
    records = []
    for f in files:
        try:
            rec = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise VegaError(f"{f}:{e.lineno}: invalid JSON ({e.msg})") from None
        missing = [k for k in ("combo", "task", "seed", "dev_score") if k not in rec]
        if missing:
            raise VegaError(f"{f}: not an ablation record (missing {missing[0]!r})")
        records.append(rec)
    return records


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(statistics.fmean(values)), "median": float(statistics.median(values)),
            "std": float(statistics.stdev(values)) if len(values) > 1 else 0.0, "n": len(values)}


def _combo_key(name: str) -> tuple:
    return (COMBO_ORDER.index(name), "") if name in COMBO_ORDER else (len(COMBO_ORDER), name)


def _task_key(name: str) -> tuple:
    return (TASK_ORDER.index(name), "") if name in TASK_ORDER else (len(TASK_ORDER), name)


def summarize(records: list[dict]) -> dict[str, Any]:
    """Aggregate records into the report's numbers (see the module docstring)."""
    if not records:
        raise VegaError("summary: no records")
    tasks = sorted({r["task"] for r in records}, key=_task_key)
    combos = sorted({r["combo"] for r in records}, key=_combo_key)
    seeds = sorted({int(r["seed"]) for r in records})
    by = {(r["combo"], r["task"], int(r["seed"])): r for r in records}
    cells: dict[str, dict[str, dict]] = {c: {} for c in combos}
    for (c, t, s), r in sorted(by.items()):
        cells[c].setdefault(t, {"scores": {}})["scores"][str(s)] = r["dev_score"]
    for c in combos:
        for t, cell in cells[c].items():
            cell.update(_stats(list(cell["scores"].values())))
    avg = {c: (float(np.mean([cells[c][t]["mean"] for t in tasks])) if set(cells[c]) >= set(tasks) else None)
           for c in combos}
    van = cells.get(VANILLA, {})
    delta, task_delta, task_delta_n, worse, wall = {}, {}, {}, {}, {}
    for c in combos:
        # paired: over the seeds that both the combo and vanilla have, so a partial sweep (say, a trick on
        # seed 0 only) is not compared with vanilla's mean over other seeds; a full sweep pairs every seed
        task_delta[c], task_delta_n[c] = {}, {}
        for t in tasks:
            common = sorted(set(cells[c].get(t, {}).get("scores", {})) & set(van.get(t, {}).get("scores", {})))
            if common:
                task_delta[c][t] = float(np.mean([cells[c][t]["scores"][k] - van[t]["scores"][k] for k in common]))
                task_delta_n[c][t] = len(common)
        worse[c] = [t for t, d in task_delta[c].items() if c != VANILLA and d < -van[t]["std"] - WORSE_TOL]
        delta[c] = (float(np.mean([task_delta[c][t] for t in tasks]))
                    if avg.get(VANILLA) is not None and avg[c] is not None and set(task_delta[c]) >= set(tasks)
                    else None)
        pairs = [(t, s) for (cc, t, s) in by if cc == c]
        own = sum(by[(c, t, s)]["wall_s"] for t, s in pairs if "wall_s" in by[(c, t, s)])
        ref_pairs = [(t, s) for t, s in pairs if (VANILLA, t, s) in by]
        ref = sum(by[(VANILLA, t, s)].get("wall_s", 0.0) for t, s in ref_pairs)
        mine = sum(by[(c, t, s)].get("wall_s", 0.0) for t, s in ref_pairs)
        wall[c] = {"total_s": round(own, 1), "per_run_s": round(own / len(pairs), 1) if pairs else None,
                   "vs_vanilla": round(mine / ref, 3) if ref > 0 else None}
    calib: dict[str, dict[str, dict]] = {}
    for c in combos:
        for t in tasks:
            reps = [by[(c, t, s)]["calibration"] for s in seeds
                    if (c, t, s) in by and by[(c, t, s)].get("calibration")]
            if reps:
                calib.setdefault(c, {})[t] = {k: float(np.mean([r[k] for r in reps])) for k in reps[0]
                                              if all(k in r for r in reps)} | {"n": len(reps)}
    pseudo: dict[str, dict[str, dict]] = {}
    for (c, t, s), r in sorted(by.items()):
        if r.get("pseudo"):
            p = pseudo.setdefault(c, {}).setdefault(t, {"selected": [], "test_rows": 0, "skipped": set(),
                                                         "dev_accuracy_at_cut": [], "teacher": [], "student": []})
            p["selected"].append(r["pseudo"]["selected"])
            p["test_rows"] = r["pseudo"]["test_rows"]
            if r["pseudo"].get("skipped"):
                p["skipped"].add(r["pseudo"]["skipped"])
            if r["pseudo"].get("dev_accuracy_at_cut") is not None:  # records from before it have none
                p["dev_accuracy_at_cut"].append(r["pseudo"]["dev_accuracy_at_cut"])
            if r["pseudo"].get("teacher_dev_score") is not None and r["pseudo"]["selected"]:
                p["teacher"].append(r["pseudo"]["teacher_dev_score"])
                p["student"].append(r["dev_score"])
    for per_task in pseudo.values():
        for p in per_task.values():
            p["skipped"] = sorted(p["skipped"])
    models = sorted({str(r.get("model")) for r in records})
    from vegalm.finetune.runner import UNHASHED

    # settings that change results; a record from before a key joined UNHASHED (glue_dir: data are hashed
    # by content now) may still list it
    overrides = sorted({json.dumps({k: v for k, v in r.get("overrides", {}).items() if k not in UNHASHED},
                                   sort_keys=True) for r in records})
    summary = {
        "models": models,
        "model_tags": sorted({str(r.get("model_tag")) for r in records}),
        "tasks": tasks,
        "combos": combos,
        "seeds": seeds,
        "cells": cells,
        "avg": avg,
        "delta_vs_vanilla": delta,
        "task_delta_vs_vanilla": task_delta,
        "task_delta_seeds": task_delta_n,
        "worse_than_vanilla_std": worse,
        "wall": wall,
        "calibration": calib,
        "pseudo": pseudo,
        "overrides": [json.loads(o) for o in overrides],
        "devices": _devices(records),
        "anchor": _anchor(records, cells, tasks, combos),
    }
    return summary


def _devices(records: list[dict]) -> dict[str, int]:
    """{device name: number of records}; records without one (hand-written, very old) are not counted."""
    names = ["cpu" if r.get("device") == "cpu" else (r.get("device_name") or r.get("device")) for r in records]
    return {d: names.count(d) for d in sorted({n for n in names if n})}


def _anchor(records: list[dict], cells: dict, tasks: list[str], combos: list[str]) -> dict | None:
    if not any(r.get("anchor_model") == ANCHOR_MODEL for r in records):
        return None
    common = [t for t in tasks if t in ANCHOR]
    if not common:
        return None
    ref = float(np.mean([ANCHOR[t] for t in common]))
    vs = {c: float(np.mean([cells[c][t]["mean"] for t in common])) - ref for c in combos
          if all(t in cells[c] for t in common)}
    return {"note": ANCHOR_NOTE, "tasks": common, "scores": {t: ANCHOR[t] for t in common}, "avg": ref,
            "delta": vs}


def summary_line(summary: dict) -> str:
    """The machine-readable last line: {"tasks": [...], "seeds": N, "avg": {combo: points}}."""
    avg = {c: (round(v, 2) if v is not None else None) for c, v in summary["avg"].items()}
    return json.dumps({"tasks": summary["tasks"], "seeds": len(summary["seeds"]), "avg": avg})


def _fmt(x: float | None, signed: bool = False, nd: int = 2) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def verdict_lines(summary: dict) -> list[str]:
    """'all vs vanilla', 'all vs anchor' and the per-task regression check, as plain lines."""
    lines = []
    d = summary["delta_vs_vanilla"]
    head = ALL if ALL in summary["combos"] else None
    for c in summary["combos"]:
        if c == VANILLA or d.get(c) is None:
            continue
        if head is None or c == head:
            lines.append(f"{c} vs vanilla: {_fmt(d[c], True)} points (task average over "
                         f"{', '.join(summary['tasks'])})")
    anchor = summary.get("anchor")
    if anchor:
        for c in ([head] if head else []) + ([VANILLA] if VANILLA in summary["combos"] else []):
            if c in anchor["delta"]:
                lines.append(f"{c} vs anchor: {_fmt(anchor['delta'][c], True)} points (over "
                             f"{', '.join(anchor['tasks'])}; anchor average {anchor['avg']:.2f}: {anchor['note']})")
    if VANILLA in summary["combos"]:
        for c in summary["combos"]:
            if c == VANILLA or (head and c != head):
                continue
            bad = summary["worse_than_vanilla_std"].get(c, [])
            td, tn, van = summary["task_delta_vs_vanilla"][c], summary["task_delta_seeds"][c], summary["cells"][VANILLA]
            # the same paired change as the per-task table (not the difference of unpaired means)
            mark = {t: (f" [{tn[t]}]" if tn[t] < len(summary["seeds"]) else "") for t in bad}
            lines.append(f"{c}: tasks worse than vanilla by more than vanilla's seed std: " + (", ".join(
                f"{t} ({td[t]:+.2f}{mark[t]}, std {van[t]['std']:.2f})" for t in bad) or "none"))
    return lines


def render_markdown(summary: dict) -> str:
    tasks, combos = summary["tasks"], summary["combos"]
    cells, wall = summary["cells"], summary["wall"]
    seeds = summary["seeds"]
    lines = [f"# Trick ablation: {', '.join(summary['model_tags'])}", "",
             f"Model: {', '.join(summary['models'])}. Seeds: {', '.join(map(str, seeds))}. Dev task scores in "
             "points; a cell is mean ± std (median) over seeds, n < seeds marked [n]. A two-metric task counts "
             "as the mean of its two metrics, MNLI as the mean of m and mm (the GLUE rule).", ""]
    if len(summary["overrides"]) > 1:
        lines += ["**Warning: the records were made with different settings:** "
                  + "; ".join(json.dumps(o) for o in summary["overrides"]), ""]
    elif summary["overrides"] and summary["overrides"][0]:
        lines += ["Settings on top of the vega defaults: " + json.dumps(summary["overrides"][0]), ""]
    devices = summary.get("devices") or {}
    if len(devices) > 1:  # the same config gave MRPC 85.3 on a CPU and 82.3 on an H100 (BENCHMARKS.md)
        lines += ["**Warning: the records come from different devices** ("
                  + ", ".join(f"{d}: {n} runs" for d, n in devices.items())
                  + "); one config can score differently on another device, beyond seed noise.", ""]
    elif devices:
        lines += [f"Device: {next(iter(devices))}.", ""]
    lines += ["| combo | " + " | ".join(tasks) + " | avg | Δ avg vs vanilla | wall vs vanilla | s/run |",
              "|---|" + "---|" * (len(tasks) + 4)]
    for c in combos:
        row = [c]
        for t in tasks:
            e = cells[c].get(t)
            if e is None:
                row.append("—")
                continue
            n = f" [{e['n']}]" if e["n"] < len(seeds) else ""
            row.append(f"{e['mean']:.2f} ± {e['std']:.2f} ({e['median']:.2f}){n}")
        w = wall[c]
        ratio = f"×{w['vs_vanilla']:.2f}" if w["vs_vanilla"] is not None else "n/a"
        row += [_fmt(summary["avg"][c]), "—" if c == VANILLA else _fmt(summary["delta_vs_vanilla"][c], True),
                ratio, _fmt(w["per_run_s"], nd=0)]
        lines.append("| " + " | ".join(row) + " |")
    if VANILLA in combos and len(combos) > 1:
        lines += ["", "Change vs vanilla per task (mean over the seeds both have, [n] when fewer than all; "
                  "* = below vanilla by more than vanilla's seed std on that task):", "",
                  "| combo | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for c in combos:
            if c == VANILLA:
                continue
            td, tn = summary["task_delta_vs_vanilla"][c], summary["task_delta_seeds"][c]
            bad = summary["worse_than_vanilla_std"][c]
            lines.append("| " + " | ".join([c] + [(_fmt(td[t], True) + ("*" if t in bad else "")
                                                    + (f" [{tn[t]}]" if tn[t] < len(summary["seeds"]) else ""))
                                                   if t in td else "—" for t in tasks]) + " |")
    calib = summary["calibration"]
    if calib:
        lines += ["", "Calibration on dev (classification tasks; mean over seeds). ECE in % (15 bins), NLL in "
                  "nats; 'after' = post-hoc temperature scaling, cross-fitted (T fitted on one half of dev, "
                  "scored on the other, then swapped): the honest number. In-sample 'after' in brackets.", "",
                  "| combo | task | ECE before | ECE after | NLL before | NLL after | T |",
                  "|---|---|---|---|---|---|---|"]
        for c in combos:
            for t, m in calib.get(c, {}).items():
                ece_cf = m.get("ece_after_crossfit", m["ece_after"])
                nll_cf = m.get("nll_after_crossfit", m["nll_after"])
                lines.append(f"| {c} | {t} | {100 * m['ece_before']:.2f} | {100 * ece_cf:.2f} "
                             f"[{100 * m['ece_after']:.2f}] | {m['nll_before']:.4f} | {nll_cf:.4f} "
                             f"[{m['nll_after']:.4f}] | {m['temperature']:.2f} |")
    if summary["pseudo"]:
        lines += ["", "Transductive pseudo-labels (test inputs only; confident, class-balanced):", ""]
        for c, per_task in summary["pseudo"].items():
            for t, p in per_task.items():
                sel = p["selected"]
                note = f" ({'; '.join(p['skipped'])})" if p["skipped"] else ""
                acc = p.get("dev_accuracy_at_cut") or []
                # how right such pseudo-labels are: the teacher on the dev rows past the same cut
                more = f"; teacher's dev accuracy past the same cut {np.mean(acc):.1f}%" if acc else ""
                if max(sel) == 0:
                    lines.append(f"- {c} / {t}: no pseudo-labels{note}{more}; the row reports the teacher's run")
                else:
                    span = f"{min(sel)}–{max(sel)}" if min(sel) != max(sel) else f"{sel[0]}"
                    if p.get("teacher"):  # what the student run adds to its own teacher, same seeds
                        n = len(p["teacher"])
                        more += (f"; teacher {np.mean(p['teacher']):.2f} -> student {np.mean(p['student']):.2f} "
                                 f"({np.mean(p['student']) - np.mean(p['teacher']):+.2f}, {n} seed{'s' * (n > 1)})")
                    lines.append(f"- {c} / {t}: {span} of {p['test_rows']} test rows, per seed{more}{note}")
    lines += ["", "Verdict:", ""] + [f"- {v}" for v in verdict_lines(summary)]
    if not any(TAPT in c.split("+") for c in summary["combos"]):
        lines += ["", "Not in this table: task-adaptive RTD pretraining (transductive variant (a), combo `tapt`); it "
                  "needs an encoder with an RTD generator (our own pretrained ones), so a transformers backbone "
                  "such as MiniLM-L6 cannot run it.", ""]
    else:
        lines.append("")
    return "\n".join(lines)


def plot_ablation(summary: dict, path: Path) -> None:
    """Grouped bars: per task (and the average), one bar per combo = mean over seeds, error bar = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, combos, cells = summary["tasks"], summary["combos"], summary["cells"]
    groups = tasks + ["avg"]
    width = 0.8 / len(combos)
    fig, ax = plt.subplots(figsize=(1.1 * len(groups) * max(1.0, len(combos) / 3) + 2.5, 3.8))
    x = np.arange(len(groups))
    for i, c in enumerate(combos):
        means = [cells[c][t]["mean"] if t in cells[c] else np.nan for t in tasks] + [
            summary["avg"][c] if summary["avg"][c] is not None else np.nan]
        stds = [cells[c][t]["std"] if t in cells[c] else 0.0 for t in tasks] + [0.0]
        ax.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=stds, capsize=2, label=c)
    anchor = summary.get("anchor")
    if anchor:
        pts = [(i, anchor["scores"][t]) for i, t in enumerate(tasks) if t in anchor["scores"]]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="_", s=400, color="black", zorder=4,
                   label="HF anchor")
    ax.set_xticks(x, groups)
    ax.set_ylabel("dev task score (points)")
    ax.set_title(f"Trick ablation ({', '.join(summary['model_tags'])}, {len(summary['seeds'])} seed(s))")
    ax.legend(fontsize=7, ncol=min(len(combos) + 1, 4), loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def print_report(summary: dict) -> None:
    """The table, the verdict lines, and the JSON line last."""
    print(render_markdown(summary))
    print(summary_line(summary), flush=True)


__all__ = [
    "ALL_TRICKS",
    "ANCHOR",
    "Combo",
    "load_records",
    "model_tag",
    "parse_combos",
    "plot_ablation",
    "print_report",
    "pseudo_labels_from_run",
    "render_markdown",
    "run_ablation",
    "run_one",
    "summarize",
    "summary_line",
    "valid_combo_names",
]
