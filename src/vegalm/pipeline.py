"""`vegalm run`: the whole Vega recipe end to end, then a report. `make demo` runs it on recipes/tiny.yaml.

examples:
    vegalm run --recipe recipes/tiny.yaml --out runs/demo          # the CPU demo (README: its measured wall time)
    vegalm run --recipe recipes/smoke.yaml --out runs/smoke        # CI: the same path in a few minutes
    vegalm run --recipe recipes/tiny.yaml --out runs/demo --jobs 1 # one thing at a time, in this process

Stages (each skipped when finished with the same settings and inputs, so an interrupted run resumes; one
made with other settings stops the run, naming them, unless --retrain):
  1. tokenizer on the corpus                       -> OUT/tokenizer
  2. phase-1 RTD (GDES)                             -> OUT/rtd/phase1
  3. phase-2 RTD + SimCSE                           -> OUT/rtd/phase2, export OUT/rtd/discriminator
  (the recipe's `baseline`: an MLM-only model of the same size at equal compute -> OUT/mlm)
  4. fine-tune + evaluate on the local GLUE tasks   -> OUT/glue/rtd, OUT/glue/mlm (+ submission.zip)
  5. report                                         -> OUT/report.md, OUT/report.html, OUT/*.png
The tokenizer and the packed segments are shared by both models, so they see the same data. With --jobs 2
(the default on 2+ cores) the two pretrainings run side by side in worker processes, and the GLUE runs of a
model start in the same pool once it is exported; the results are the same files as with --jobs 1.
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from vegalm.errors import VegaError

log = logging.getLogger(__name__)

CURVES = [("mlm_loss", "generator / MLM loss"), ("rtd_loss", "discriminator RTD loss"), ("cl_loss", "SimCSE loss")]


def _stage(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def load_models(recipe: str | Path, overrides: list[str] | None, with_baseline: bool = True) -> dict[str, RecipeConfig]:
    """The recipe and its MLM baseline, both loaded and checked (before any heavy work)."""
    from vegalm.config import load_config
    from vegalm.pretrain.run import RecipeConfig

    cfg = load_config(RecipeConfig, recipe, overrides)
    models = {"rtd": cfg}
    if with_baseline and cfg.baseline:
        models["mlm"] = load_config(RecipeConfig, cfg.baseline, overrides)  # resolved against the recipe file
    return models


def run_pipeline(recipe: str | Path, out: str | Path, overrides: list[str] | None = None,
                 with_baseline: bool = True, retrain: bool = False, jobs: int = 1) -> dict[str, Any]:  # fmt: skip
    from vegalm.outdir import lock_dir

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise VegaError(f"jobs: expected a whole number >= 1, got {jobs!r}")
    models = load_models(recipe, overrides, with_baseline)
    with lock_dir(out):
        return _run_pipeline(models, Path(out), retrain, jobs)


def _run_pipeline(models: dict[str, RecipeConfig], out: Path, retrain: bool, jobs: int) -> dict[str, Any]:
    t0 = time.time()
    cfg = models["rtd"]
    if jobs > 1 and len(models) > 1:
        pre, glue = _side_by_side(models, out, retrain, jobs)
    else:
        pre, glue = _in_turn(models, out, retrain)
    _stage("report")
    report = write_report(out, cfg, pre, glue, time.time() - t0)
    print(f"report: {report['html']}\n        {report['md']}")
    return {"pretrain": pre, "glue": glue, "report": report, "wall_s": time.time() - t0}


def _in_turn(models: dict[str, RecipeConfig], out: Path, retrain: bool) -> tuple[dict, dict]:
    """One model after the other in this process: pretraining, then the GLUE runs."""
    from vegalm.experiments.glue import run_glue

    pre: dict[str, dict] = {}
    for name, rc in models.items():
        _stage(f"pretraining {name} ({rc.name}): {'RTD + SimCSE' if rc.phase2 else rc.phase1.objective.kind}")
        pre[name] = _pretrain(rc, out, name, retrain)  # the first model trains the tokenizer, the second reuses it
    g = models["rtd"].glue
    glue: dict[str, dict] = {}
    for name, res in pre.items():
        _stage(f"GLUE fine-tuning of {name}: {', '.join(g.tasks)} x {g.seeds} seed(s)")
        glue[name] = run_glue(res["model_path"], g.tasks, g.seeds, out / "glue" / name, **g.settings)
    return pre, glue


def _pretrain(rc: RecipeConfig, out: Path, name: str, retrain: bool) -> dict:
    """Pretrain model `name` into OUT/name on the shared tokenizer and packed segments (a worker's job too)."""
    from vegalm.pretrain.run import run_pretrain

    return run_pretrain(rc, out / name, data_dir=out / "data", tokenizer_dir=out / "tokenizer", retrain=retrain)


def _quiet(rc: RecipeConfig) -> RecipeConfig:
    """`rc` without per-step progress bars (unkeyed: the stages stay the same); workers report to the parent's."""
    phases = {p: replace(ph, train=replace(ph.train, progress=False))
              for p in ("phase1", "phase2") if (ph := getattr(rc, p)) is not None}  # fmt: skip
    return replace(rc, **phases)


def _steps_done(out: Path, models: dict[str, RecipeConfig]) -> int:
    """Optimizer steps finished so far over every model and phase (from done.json, else the last logged step)."""
    n = 0
    for name in models:
        for phase in ("phase1", "phase2"):
            pdir = out / name / phase
            done = pdir / "done.json"
            rows = [] if done.is_file() else _read_metrics(pdir / "metrics.jsonl")
            n += json.loads(done.read_text()).get("step", 0) if done.is_file() else (rows[-1]["step"] if rows else 0)
    return n


def _side_by_side(models: dict[str, RecipeConfig], out: Path, retrain: bool, jobs: int) -> tuple[dict, dict]:
    """Every model's pretraining at once, one worker process each (vegalm.workers), and each GLUE run in the same
    pool as soon as its model is exported; the idle worker of the shorter pretraining starts fine-tuning. The
    sweeps are then read back by `run_glue` (cached runs), so the results are those of `_in_turn`."""
    import concurrent.futures as cf

    from tqdm.auto import tqdm

    from vegalm.experiments.glue import plan_glue, run_glue
    from vegalm.finetune.run import run_finetune
    from vegalm.pretrain.run import prepare_data
    from vegalm.workers import supervised_pool, threads_per_worker

    _stage("tokenizer and packed segments (shared by both models)")
    prepare_data(models["rtd"], out / "rtd", out / "data", out / "tokenizer", retrain)
    g = models["rtd"].glue
    threads = threads_per_worker(jobs) or f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    n_glue = len(models) * len(g.tasks) * g.seeds
    _stage(f"pretraining {' and '.join(models)} side by side, then {n_glue} GLUE runs ({', '.join(g.tasks)} x "
           f"{g.seeds} seed(s) each), in {jobs} worker processes ({threads} thread(s) each)")  # fmt: skip
    total = sum(ph.train.max_steps for rc in models.values() for ph in (rc.phase1, rc.phase2) if ph is not None)
    steps = tqdm(total=total, desc="pretraining", unit="step", position=0)
    runs = tqdm(total=n_glue, desc="glue runs", unit="run", position=1)
    pre: dict[str, dict] = {}
    todo: dict = {}

    def report() -> None:  # after a stop: what each worker ended with
        for fut, (name, run) in todo.items():
            err = fut.exception() if fut.done() and not fut.cancelled() else None
            log.info("%s %s: %s", name, "pretraining" if run is None else run, err or "stopped")

    try:
        with supervised_pool(jobs, logging.getLogger().getEffectiveLevel(), on_stop=report) as (pool, check):
            todo.update({pool.submit(_pretrain, _quiet(rc), out, name, retrain): (name, None)
                         for name, rc in models.items()})
            while todo:
                finished, _ = cf.wait(todo, timeout=1, return_when=cf.FIRST_COMPLETED)
                steps.update(_steps_done(out, models) - steps.n)
                check()
                for fut in finished:
                    name, run = todo.pop(fut)
                    res = fut.result()  # a failed job stops the others (supervised_pool) and raises here
                    if run is None:  # a model is exported: queue its fine-tuning runs
                        pre[name] = res
                        plan = plan_glue(res["model_path"], g.tasks, g.seeds, out / "glue" / name,
                                         **{**g.settings, "progress": False})  # fmt: skip
                        todo.update({pool.submit(run_finetune, c): (name, key) for key, c in plan["runs"].items()})
                    else:
                        runs.update(1)
                        runs.set_postfix_str(f"{name} {run[0]} seed {run[1]}: {res['dev_score']:.2f}")
    finally:
        steps.close()
        runs.close()
    glue = {name: run_glue(pre[name]["model_path"], g.tasks, g.seeds, out / "glue" / name,
                           **{**g.settings, "progress": False})  # all cached: the same runs, no new bar
            for name in models}  # fmt: skip
    return {name: pre[name] for name in models}, glue


# ----------------------------------------------------------------------------------------------- report
def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _draw_curve(ax, runs: dict[str, Path], key: str) -> bool:
    """Plot metric `key` of every model's phases on one axis (phase 2 continues phase 1's steps)."""
    drawn = False
    for name, root in runs.items():
        offset = 0
        for phase in ("phase1", "phase2"):
            rows = [r for r in _read_metrics(root / phase / "metrics.jsonl") if r.get(key) is not None]
            if rows:
                ax.plot([offset + r["step"] for r in rows], [r[key] for r in rows], label=f"{name} {phase}")
                drawn = True
            done = root / phase / "done.json"
            if done.is_file():
                offset += json.loads(done.read_text()).get("step", 0)
    return drawn


def _plot_curves(out: Path, runs: dict[str, Path]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for key, title in CURVES:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        if not _draw_curve(ax, runs, key):
            plt.close(fig)
            continue
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"curve_{key}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def _summary_figure(out: Path, runs: dict[str, Path], glue: dict) -> str | None:
    """One PNG with the three loss curves and the GLUE dev bars of both models (the report at a glance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, (key, title) in zip(axes.flat, CURVES):
        _draw_curve(ax, runs, key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        if ax.lines:
            ax.legend(fontsize=7)
    ax = axes.flat[3]
    tasks = sorted({t for g in glue.values() for t in g.get("per_task", {})})
    width = 0.8 / max(len(glue), 1)
    for i, (name, g) in enumerate(glue.items()):
        vals = [g.get("per_task", {}).get(t, {}).get("median") or 0.0 for t in tasks]
        ax.bar(np.arange(len(tasks)) + i * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(tasks)) + width * (len(glue) - 1) / 2, tasks, fontsize=8)
    ax.set_title("GLUE dev (task score, median over seeds)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)
    plt.close(fig)
    return "report.png"


def _last(root: Path, phase: str, key: str):
    rows = [r for r in _read_metrics(root / phase / "metrics.jsonl") if r.get(key) is not None]
    return rows[-1][key] if rows else None


def _mean_tps(root: Path, phase: str):
    rows = [r["tokens_per_s"] for r in _read_metrics(root / phase / "metrics.jsonl") if r.get("tokens_per_s")]
    return sum(rows) / len(rows) if rows else None


def _fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def write_report(out: Path, cfg: RecipeConfig, pre: dict, glue: dict, wall_s: float) -> dict[str, str]:
    roots = {name: out / name for name in pre}
    curves = _plot_curves(out, roots)
    overview = _summary_figure(out, roots, glue)
    lines = [f"# vegalm run: {cfg.name}", "",
             f"Wall time of this invocation: {wall_s / 60:.1f} min (stages already complete are skipped, so a "
             f"resumed run shows only the remaining work). Output folder: `{out}`.", ""]  # fmt: skip
    lines += [f"![overview]({overview})", ""]
    from vegalm.pretrain.summary import plot_health, report_lines, write_summary  # OUT/summary.json (issue 18)

    lines += report_lines(write_summary(out, pre, glue, wall_s), plot_health(out, roots))
    lines += ["## Pretraining", "", "| model | phase | steps | final loss | disc. accuracy | gen. accuracy | tokens/s |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, root in roots.items():
        for phase in ("phase1", "phase2"):
            if not (root / phase / "metrics.jsonl").is_file():
                continue
            step = _last(root, phase, "step")
            lines.append(
                f"| {name} | {phase} | {step} | {_fmt(_last(root, phase, 'loss'), '.3f')} | "
                f"{_fmt(_last(root, phase, 'disc_acc'), '.3f')} | {_fmt(_last(root, phase, 'gen_acc'), '.3f')} | "
                f"{_fmt(_mean_tps(root, phase), '.0f')} |"
            )
    lines += [""] + [f"![{c}]({c})" for c in curves] + [""]
    lines += ["## GLUE dev (local tasks)", ""]
    tasks = sorted({t for g in glue.values() for t in g.get("per_task", {})})
    header = "| model | " + " | ".join(tasks) + " | average |"
    lines += [header, "|" + "---|" * (len(tasks) + 2)]
    avgs = {}
    for name, g in glue.items():
        per = g.get("per_task", {})
        vals = [per.get(t, {}).get("median") for t in tasks]
        avg = g.get("glue", {}).get("median", {}).get("score")
        avgs[name] = avg
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in vals) + f" | {_fmt(avg)} |")
    lines.append("")
    if "rtd" in avgs and "mlm" in avgs and None not in (avgs["rtd"], avgs["mlm"]):
        d = avgs["rtd"] - avgs["mlm"]
        verdict = "beats" if d > 0 else "does not beat"
        lines += [f"RTD + SimCSE {verdict} the MLM-only baseline at equal pretraining compute: "
                  f"{avgs['rtd']:.1f} vs {avgs['mlm']:.1f} ({d:+.1f} points, {len(tasks)}-task dev average, "
                  "median over seeds). At this toy scale the difference is within seed noise unless it is "
                  "several points; see the per-task spread in the GLUE results.", ""]  # fmt: skip
    for name, g in glue.items():
        z = (g.get("submission") or {}).get("path")
        if z:
            lines.append(f"Submission zip ({name}): `{z}` (tasks not run hold documented placeholders)")
    lines.append("")
    md = "\n".join(lines)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.html").write_text(_md_to_html(md, cfg.name), encoding="utf-8")
    return {"md": str(out / "report.md"), "html": str(out / "report.html")}


def _md_to_html(md: str, title: str) -> str:
    """A small Markdown subset (headings, tables, images, paragraphs) rendered to one HTML page."""
    body, table = [], []

    def flush_table():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-"}]
            cells = [[html.escape(c.strip()) for c in r.strip("|").split("|")] for r in rows]
            out = ["<table>", "<tr>" + "".join(f"<th>{c}</th>" for c in cells[0]) + "</tr>"]
            out += ["<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:]]
            body.append("\n".join(out + ["</table>"]))
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1 : line.rindex(")")]
            body.append(f'<img src="{html.escape(src)}" alt="{html.escape(src)}">')
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}img{max-width:48%}")  # fmt: skip
    return f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{style}</style>\n" + "\n".join(body)


def register(sub, formatter) -> None:
    p = sub.add_parser(
        "run",
        help="the whole recipe: tokenizer, RTD, RTD+SimCSE, GLUE, report (what `make demo` runs)",
        description=__doc__,
        formatter_class=formatter,
    )
    p.add_argument("--recipe", default="recipes/tiny.yaml", help="YAML recipe (recipes/*.yaml)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--no-baseline", action="store_true", help="skip the MLM-only baseline comparison")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes: the RTD and MLM pretraining run side by side, then the GLUE runs share "
                        "them; each gets cores // jobs threads (1: everything in turn, in this process)")
    p.add_argument("--retrain", action="store_true",
                   help="rebuild finished stages made with other settings (and every stage after them)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, dotted names")
    p.set_defaults(func=lambda a: _run(a))


def _run(args) -> int:
    if not Path(args.recipe).is_file():
        raise VegaError(f"recipe not found: {args.recipe}")
    models = load_models(args.recipe, args.overrides, not args.no_baseline)
    steps = ", ".join(f"{n} {p}: {getattr(rc, p).train.max_steps} steps" for n, rc in models.items()
                      for p in ("phase1", "phase2") if getattr(rc, p) is not None)  # fmt: skip
    print(f"vegalm run: recipe {args.recipe} -> {args.out}\n  {steps}; GLUE {', '.join(models['rtd'].glue.tasks)} "
          f"x {models['rtd'].glue.seeds} seed(s); finished stages are skipped", flush=True)  # fmt: skip
    run_pipeline(args.recipe, args.out, args.overrides, with_baseline=not args.no_baseline, retrain=args.retrain,
                 jobs=args.jobs)
    return 0
