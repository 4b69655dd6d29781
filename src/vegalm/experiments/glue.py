"""The GLUE sweep (`vegalm glue`): tasks x seeds with `run_finetune`, statistics over seeds, seed ensembles,
the report and the leaderboard zip. docs/glue.md is the manual.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from vegalm.config import ConfigError, from_dict
from vegalm.data.glue import TASKS, get_task, load_split, resolve_glue_dir, split_path
from vegalm.errors import VegaError
from vegalm.experiments.report import SPREAD_KEYS, md_row, md_rule, pyplot, save_figure, seed_stats
from vegalm.experiments.submission import write_submission
from vegalm.finetune.config import FinetuneConfig, flat_settings
from vegalm.finetune.ensemble import ensemble_logits
from vegalm.finetune.metrics import TASK_METRICS, compute_metrics, glue_summary, task_score
from vegalm.finetune.predict import class_predictions
from vegalm.finetune.run import run_finetune
from vegalm.finetune.stages.self_training import read_test_index
from vegalm.io import atomic_write_text

log = logging.getLogger(__name__)

SET_BY_SWEEP = ("task", "model", "out", "seed")
AVERAGING_RULE = (
    "GLUE score = unweighted mean of the task scores of the tasks run; a task score is the mean of the "
    "task's leaderboard metrics (MRPC: F1 and accuracy, STS-B: Pearson and Spearman, CoLA: MCC, others: "
    "accuracy); MNLI counts once, as the mean of MNLI-m and MNLI-mm accuracy; AX is not averaged. "
    "Per task, 'median' is the median over seeds of that task score (MNLI: the medians of m and mm, "
    "then their mean)."
)


def parse_tasks(tasks: str | list[str]) -> list[str]:
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        key = get_task(name).name
        if key == "ax":
            raise ConfigError("tasks: AX is predicted by the MNLI run; list mnli instead")
        if key not in out:
            out.append(key)
    if not out:
        raise ConfigError("tasks: no task given (e.g. --tasks rte,mrpc)")
    return out


def parse_seeds(seeds: int | str | list[int]) -> list[int]:
    """3 -> [0, 1, 2]; "3" -> [0, 1, 2]; "1,5" or [1, 5] -> [1, 5]."""
    if isinstance(seeds, str):
        try:
            seeds = [int(s) for s in seeds.split(",") if s.strip()] if "," in seeds else int(seeds)
        except ValueError:
            raise ConfigError(f"seeds: expected a count (3) or a list (1,5,9), got {seeds!r}") from None
    if isinstance(seeds, bool):
        raise ConfigError(f"seeds: expected a count or a list of integers, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"seeds: expected a count >= 1, got {seeds} (a list names seeds: 0, is seed 0 alone, "
                              "0,1,2 the first three)")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"seeds: expected distinct integers, got {seeds!r}")
    return out


def _split_scores(task: str, res: dict) -> dict[str, float]:
    """{"mnli_m": ..., "mnli_mm": ...} for MNLI, {task: score} otherwise (one run)."""
    keys = res["dev_metric_keys"]
    return {keys[s]: task_score(keys[s], m) for s, m in res["dev"].items()}


def _ensemble(task: str, runs: dict[int, dict], glue_dir: str) -> dict[str, Any]:
    """Mean of the seeds' logits: dev metrics and score, and the averaged test logits."""
    spec = TASKS[task]
    first = next(iter(runs.values()))
    arrays = [np.load(Path(r["out"]) / "dev_logits.npy") for r in runs.values()]
    if len({a.shape for a in arrays}) != 1:
        raise VegaError(f"{task}: the seeds' dev_logits.npy differ in shape ({sorted({a.shape for a in arrays})}); "
                        "were the runs made with different data?")
    dev = ensemble_logits(arrays)
    metrics, scores = {}, {}
    for split, (a, b) in first["dev_rows"].items():
        examples = load_split(task, split, glue_dir)
        preds = class_predictions(spec, split, dev[a:b], first.get("config", {}), glue_dir, examples)
        labels = [ex.label for ex in examples]
        key = first["dev_metric_keys"][split]
        metrics[split] = compute_metrics(key, preds, labels)
        scores[key] = task_score(key, metrics[split])
    test = None
    if first.get("test_rows"):
        test = ensemble_logits([np.load(Path(r["out"]) / "test_logits.npy") for r in runs.values()])
    return {"dev": metrics, "split_scores": scores, "dev_score": float(np.mean(list(scores.values()))),
            "test_logits": test}


def _submission_preds(task: str, run_out: Path, test_rows: dict, logits: np.ndarray, config: dict,
                      glue_dir: str) -> dict[str, tuple]:
    """{stem: (indices, predictions)} for write_submission from a run's test rows and (maybe averaged) logits;
    WNLI predictions follow the run's `wnli_treatment`."""
    index = read_test_index(run_out / "test_predictions.tsv")
    out = {}
    for split, (a, b) in test_rows.items():
        spec = TASKS["ax"] if split == "ax" else TASKS[task]
        fname = spec.submission_files["test" if split == "ax" else split]
        preds = class_predictions(spec, split, logits[a:b], config, glue_dir).tolist()
        out[Path(fname).stem] = ([i for _, i in index[a:b]], preds)
    return out


def plan_glue(model: str, tasks: str | list[str], seeds: int | str | list[int] = 3, out: str | Path = "runs/glue",
              *, skip_missing: bool = False, **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """The sweep's runs, checked before any training: {"tasks", "seeds", "skipped", "overrides", "glue_dir",
    "progress", "runs": {(task, seed): FinetuneConfig}}. `vegalm run --jobs 2` trains these configs in worker
    processes; `run_glue` then reads them back (a run's cache key is its config)."""
    task_list, seed_list = parse_tasks(tasks), parse_seeds(seeds)
    overrides = flat_settings(overrides)  # train.seed= is seed=: refused alike
    taken = [k for k in SET_BY_SWEEP if k in overrides]
    if taken:
        raise ConfigError(f"{taken[0]}: set by the sweep (use the model/tasks/seeds/out arguments)")
    base = {"save_model": False, **overrides}
    probe = from_dict(FinetuneConfig, {**base, "task": task_list[0], "model": model, "out": str(out)})
    probe.check()  # fail on a bad key before any training
    glue_dir = str(resolve_glue_dir(probe.glue_dir))
    skipped = {}
    for task in list(task_list):
        train = split_path(task, "train", glue_dir)
        if not train.is_file():
            if not skip_missing:
                raise VegaError(f"{task}: no training file {train}; drop it from --tasks or pass --skip-missing")
            skipped[task] = f"no training file {train}"
            task_list.remove(task)
            log.warning("%s skipped: no training file %s", task, train)
    if not task_list:
        raise VegaError(f"no task has training data under {glue_dir}")
    runs = {(task, seed): from_dict(FinetuneConfig, {**base, "task": task, "model": model,
                                                     "out": str(Path(out) / task / f"seed{seed}"), "seed": seed})
            for task in task_list for seed in seed_list}  # fmt: skip
    return {"tasks": task_list, "seeds": seed_list, "skipped": skipped, "overrides": overrides,
            "glue_dir": glue_dir, "progress": probe.train.progress, "runs": runs}  # fmt: skip


def run_glue(
    model: str,
    tasks: str | list[str],
    seeds: int | str | list[int] = 3,
    out: str | Path = "runs/glue",
    *,
    ensemble: bool = False,
    skip_missing: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Run every task x seed (cached runs are read back), aggregate, write the report and submission.

    `overrides` are FinetuneConfig fields for every run; `progress=False` also hides the sweep's bar."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    plan = plan_glue(model, tasks, seeds, out, skip_missing=skip_missing, **overrides)
    task_list, seed_list, skipped, overrides = plan["tasks"], plan["seeds"], plan["skipped"], plan["overrides"]
    glue_dir, out = plan["glue_dir"], Path(out)
    runs: dict[str, dict[int, dict]] = {t: {} for t in task_list}
    bar = tqdm(total=len(plan["runs"]), desc="glue runs", unit="run", disable=not plan["progress"])
    try:
        for (task, seed), cfg in plan["runs"].items():
            bar.set_postfix_str(f"{task} seed {seed}")
            res = run_finetune(cfg)
            runs[task][seed] = {**res, "out": cfg.out}
            bar.update(1)
            note = " (cached)" if res["cached"] else ""
            bar.set_postfix_str(f"{task} seed {seed}: {res['dev_score']:.2f}{note}")
    finally:
        bar.close()

    per_task: dict[str, dict] = {}
    sub_preds: dict[str, tuple] = {}
    for task, by_seed in runs.items():
        scores = {s: r["dev_score"] for s, r in by_seed.items()}
        best = max(scores, key=lambda s: (scores[s], -seed_list.index(s)))
        split_keys = list(_split_scores(task, by_seed[best]))
        entry: dict[str, Any] = {
            "metrics": list(TASK_METRICS[task]),
            "scores": {str(s): v for s, v in scores.items()},
            **seed_stats(list(scores.values()), SPREAD_KEYS),
            "split_stats": {k: seed_stats([_split_scores(task, r)[k] for r in by_seed.values()], SPREAD_KEYS)
                            for k in split_keys},
            "best_seed": best,
            "best_score": scores[best],
            "best_split_scores": _split_scores(task, by_seed[best]),
            "cached_runs": sum(bool(r["cached"]) for r in by_seed.values()),
        }
        source, logits, ref = "best seed", None, by_seed[best]
        if ensemble:
            ens = _ensemble(task, by_seed, glue_dir)
            entry["ensemble"] = {k: ens[k] for k in ("dev", "split_scores", "dev_score")}
            source, logits = "ensemble", ens["test_logits"]
        if ref.get("test_rows"):
            if logits is None:
                logits = np.load(Path(ref["out"]) / "test_logits.npy")
            sub_preds.update(_submission_preds(task, Path(ref["out"]), ref["test_rows"], logits, ref.get("config", {}),
                                               glue_dir))
            entry["test_from"] = source if source == "ensemble" else f"seed {best}"
        per_task[task] = entry

    glue = {
        "median": glue_summary({k: v["median"] for e in per_task.values() for k, v in e["split_stats"].items()}),
        "mean": glue_summary({k: v["mean"] for e in per_task.values() for k, v in e["split_stats"].items()}),
        "best_seed": glue_summary({k: v for e in per_task.values() for k, v in e["best_split_scores"].items()}),
    }
    if ensemble:
        glue["ensemble"] = glue_summary(
            {k: v for e in per_task.values() for k, v in e["ensemble"]["split_scores"].items()})

    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught:  # placeholder notices go into the report instead
        warnings.simplefilter("always")
        manifest = write_submission(sub_preds, out / "submission.zip", glue_dir)
    placeholders = [str(w.message) for w in caught]
    result = {
        "model": model,
        "tasks": task_list,
        "seeds": seed_list,
        "ensemble": ensemble,
        "overrides": overrides,
        "skipped": skipped,
        "per_task": per_task,
        "glue": glue,
        "averaging_rule": AVERAGING_RULE,
        "runs": {t: {str(s): _run_summary(r) for s, r in by_seed.items()} for t, by_seed in runs.items()},
        "submission": {"path": str(out / "submission.zip"), "manifest": manifest, "placeholders": placeholders},
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    atomic_write_text(out / "results.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(out / "results.md", render_markdown(result))
    plot_results(result, out / "results.png")
    return result


def _run_summary(res: dict) -> dict:
    return {k: res[k] for k in ("dev_score", "dev", "out", "cached")} | {"wall_s": res["timing"]["wall_s"]}


def render_markdown(result: dict) -> str:
    """results.md: per-task table, GLUE score lines and the averaging rule."""
    seeds = result["seeds"]
    ens = result["ensemble"]
    lines = [
        f"# GLUE dev results: {result['model']}",
        "",
        f"Seeds: {', '.join(map(str, seeds))}. Overrides: "
        + (", ".join(f"{k}={v}" for k, v in result["overrides"].items()) or "none") + ".",
        "",
        md_row(["task", "metric", "median", "mean ± std", "best (seed)", *(["ensemble"] if ens else []), "test from"]),
        md_rule(6 + ens),
    ]
    for task, e in result["per_task"].items():
        cells = [task, "/".join(e["metrics"]), f"{e['median']:.2f}", f"{e['mean']:.2f} ± {e['std']:.2f}",
                 f"{e['best_score']:.2f} ({e['best_seed']})"]
        cells += [f"{e['ensemble']['dev_score']:.2f}"] if ens else []
        lines.append(md_row(cells + [e.get("test_from", "not predicted")]))
        if len(e["split_stats"]) > 1:  # MNLI: m and mm
            for k, st in e["split_stats"].items():
                sub = [f"&nbsp;&nbsp;{k}", "accuracy", f"{st['median']:.2f}",
                       f"{st['mean']:.2f} ± {st['std']:.2f}", ""]
                lines.append(md_row(sub + ([""] if ens else []) + [""]))
    lines.append("")
    for name, g in result["glue"].items():
        note = f" ({g['note']})" if g["note"] else ""
        lines.append(f"- **GLUE score, {name.replace('_', ' ')}**: {g['score']:.2f} over {len(g['task_scores'])} "
                     f"task(s){note}")
    lines += ["", f"Averaging rule: {result['averaging_rule']} The headline number is the median row; the best-seed "
              "row selects on dev and is optimistic.", ""]
    if result["skipped"]:
        lines += ["Skipped: " + "; ".join(f"{t} ({why})" for t, why in result["skipped"].items()), ""]
    manifest = result["submission"]["manifest"]
    model_files = [f for f, how in manifest.items() if how == "model"]
    lines += [f"Submission: `{Path(result['submission']['path']).name}`, {len(manifest)} files; from the model: "
              f"{', '.join(model_files) or 'none'}; the others are placeholders (not model predictions).", ""]
    return "\n".join(lines)


def plot_results(result: dict, path: Path) -> None:
    """Bar chart of the per-task median dev score, error bars = std over seeds, dots = seeds, x = ensemble."""
    plt = pyplot()
    tasks = list(result["per_task"])
    e = result["per_task"]
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2.5, 3.6))
    x = np.arange(len(tasks))
    ax.bar(x, [e[t]["median"] for t in tasks], yerr=[e[t]["std"] for t in tasks], color="#4c72b0", capsize=4,
           label=f"median of {len(result['seeds'])} seed(s)")
    for i, t in enumerate(tasks):
        vals = list(e[t]["scores"].values())
        ax.scatter([i] * len(vals), vals, color="black", s=10, zorder=3)
    if result["ensemble"]:
        ax.scatter(x, [e[t]["ensemble"]["dev_score"] for t in tasks], marker="x", color="#dd8452", s=50, zorder=4,
                   label="ensemble")
    ax.set_xticks(x, tasks)
    ax.set_ylabel("dev task score")
    g = result["glue"]["median"]
    ax.set_title(f"GLUE dev (median): {g['score']:.2f} over {len(g['task_scores'])} task(s)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
