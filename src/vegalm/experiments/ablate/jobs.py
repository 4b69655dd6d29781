"""The ablation sweep: job planning, the worker-process pool, and `run_ablation` (runs, records, report)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vegalm.config import ConfigError
from vegalm.errors import VegaError
from vegalm.experiments.ablate.combos import (DEFAULT_COMBOS, SET_BY_ABLATION, TAPT, VANILLA, Combo, _record_name,
                                              parse_combos)
from vegalm.experiments.ablate.runs import run_one
from vegalm.experiments.ablate.summary import ANCHOR_MODEL, summarize, write_report
from vegalm.finetune.naming import model_tag
from vegalm.finetune.stages.self_training import PSEUDO_FRACTION
from vegalm.io import write_if_changed
from vegalm.workers import supervised_pool

log = logging.getLogger(__name__)


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
    from vegalm.finetune.run import NotCachedError

    try:
        rec, n = run_one(combo, task, seed, base=ctx["base"], trick_args=ctx["trick_args"], out=ctx["out"],
                         glue_dir=ctx["glue_dir"], fraction=ctx["fraction"], tapt=ctx["tapt"],
                         cached_only=ctx["cached_only"], min_dev_accuracy=ctx["min_dev_accuracy"])
    except NotCachedError as e:
        log.warning("%s %s seed %d: skipped, %s", combo.name, task, seed, e)
        return None, 0
    rec = {**rec, **ctx["common"]}
    write_if_changed(ctx["rec_dir"] / _record_name(combo.name, rec["task"], seed),
                      json.dumps(rec, indent=1, sort_keys=True) + "\n")
    return rec, n


def _run_job(job: list[tuple[Combo, str, int]], ctx: dict) -> list[tuple[dict, int]]:
    """A parallel worker's job (in a vegalm.workers process): its runs in order, each record written as it ends."""
    return [_run_and_record(combo, task, seed, ctx) for combo, task, seed in job]


def _run_parallel(jobs: list, ctx: dict, n_workers: int, bar) -> tuple[list[dict], int, list[str]]:
    """Run `jobs` in `n_workers` spawned processes: (records, runs trained, failed jobs). A failed job
    does not stop the others. SIGINT / SIGTERM to this process stop the workers too (`supervised_pool`) and
    raise WorkersInterrupted; the records of the runs that ended are written already, and the same command
    continues with the rest."""
    import concurrent.futures as cf

    records: list[dict] = []
    trained = 0
    failed: list[str] = []
    with supervised_pool(n_workers) as (pool, check):
        todo = {pool.submit(_run_job, job, ctx): job for job in jobs}
        while todo:
            finished, _ = cf.wait(todo, timeout=1, return_when=cf.FIRST_COMPLETED)
            check()
            for fut in finished:
                job = todo.pop(fut)
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
    return records, trained, failed


def run_ablation(model: str, tasks: str | list[str] = "rte,mrpc,stsb,cola", seeds: int | str | list[int] = 3,
                 combos: str | list[str] = DEFAULT_COMBOS, out: str | Path = "runs/ablate", *,
                 results_dir: str | Path = "results/ablation", tag: str | None = None,
                 pseudo_fraction: float = PSEUDO_FRACTION, pseudo_min_dev_accuracy: float = 0.0, jobs: int = 1,
                 cached_only: bool = False, plan: dict[str, str] | None = None, **overrides: Any) -> dict[str, Any]:
    """Run every seed x task x combo (cached runs are read back), write the records and the report.

    `cached_only` trains nothing: finished runs are read back and their records rewritten (say, after a
    vegalm update added a field), and the runs not in the cache are listed in the summary's "not_cached".
    `plan` ({file, sha256} of a `--plan` file, experiments/ablate/plan.py) is written into every record.

    `overrides` are FinetuneConfig fields for every run (`save_model` defaults to False); `progress=False`
    also hides the sweep's bar. `jobs` > 1 runs that many jobs at once in spawned worker processes (see
    `plan_jobs`; on a CPU each gets cores // jobs threads unless OMP_NUM_THREADS is set): small models
    leave a big GPU mostly idle, and several runs side by side use more of it. Returns `summarize(records)`."""
    from tqdm.auto import tqdm

    from vegalm.config import from_dict
    from vegalm.data.glue import resolve_glue_dir, split_path
    from vegalm.experiments.glue import parse_seeds, parse_tasks
    from vegalm.finetune.config import UNHASHED, FinetuneConfig, flat_settings, resolve
    from vegalm.finetune.models import minilm_path, resolve_model_dir
    from vegalm.finetune.run import NotCachedError

    combo_list = parse_combos(combos)
    task_list, seed_list = parse_tasks(tasks), parse_seeds(seeds)
    overrides = flat_settings(overrides)  # train.seed= is seed=: refused alike
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
              "anchor_model": ANCHOR_MODEL if is_anchor_model else None, **({"plan": plan} if plan else {})}

    ctx = {"base": base, "trick_args": trick_args, "out": out, "glue_dir": glue_dir, "fraction": pseudo_fraction,
           "tapt": tapt, "rec_dir": rec_dir, "common": common, "cached_only": cached_only,
           "min_dev_accuracy": pseudo_min_dev_accuracy}
    records: list[dict] = []
    trained = 0
    failed: list[str] = []
    total = len(seed_list) * len(task_list) * len(combo_list)
    bar = tqdm(total=total, desc="ablation runs", unit="run", disable=not probe.train.progress)
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

def _same_dir(path: Path, other) -> bool:
    try:
        return path.resolve() == Path(other()).resolve()
    except VegaError:
        return False
