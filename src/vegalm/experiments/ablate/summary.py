"""The ablation report: statistics over seeds, the MiniLM anchor, verdict lines, Markdown and the plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vegalm.config import ConfigError
from vegalm.errors import VegaError
from vegalm.experiments.ablate.combos import ALL, TAPT, TRANSDUCTIVE, VANILLA
from vegalm.experiments.report import md_row, md_rule, pyplot, save_figure, seed_stats
from vegalm.finetune.config import UNHASHED
from vegalm.io import write_if_changed

COMBO_ORDER = (VANILLA, "adv", "selfcal", TRANSDUCTIVE, ALL)  # report order; others follow, sorted
WORSE_TOL = 0.005  # points: below the table's 2-decimal resolution, a rounding difference is not a loss
# Task order of the report: the GLUE leaderboard's.
TASK_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
# The plain transformers-Trainer anchor on MiniLM-L6: run_glue defaults, seed 42, dev, task scores in points
# (MRPC = mean of F1 82.4 / acc 72.6, STS-B = mean of Pearson 80.5 / Spearman 82.3); 4-task average 56.3.
ANCHOR = {"rte": 52.3, "mrpc": 77.5, "stsb": 81.4, "cola": 14.0}
ANCHOR_MODEL = "minilm-l6"
ANCHOR_NOTE = "transformers Trainer, MiniLM-L6, run_glue defaults, seed 42, dev"

def write_report(summary: dict, out: str | Path) -> None:
    """out/ablation.md (the printed table), out/ablation.json (every number) and out/ablation.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_if_changed(out / "ablation.md", render_markdown(summary))
    write_if_changed(out / "ablation.json", json.dumps(summary, indent=1, default=str) + "\n")
    plot_ablation(summary, out / "ablation.png")


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


def _combo_key(name: str) -> tuple:
    return (COMBO_ORDER.index(name), "") if name in COMBO_ORDER else (len(COMBO_ORDER), name)


def _task_key(name: str) -> tuple:
    return (TASK_ORDER.index(name), "") if name in TASK_ORDER else (len(TASK_ORDER), name)


def summarize(records: list[dict]) -> dict[str, Any]:
    """Aggregate records into the report's numbers (docs/ablation.md, "Caching, records and the report")."""
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
            cell.update(seed_stats(list(cell["scores"].values())))
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
    paired = {c: paired_deltas(cells, c, tasks) for c in combos if c != VANILLA and VANILLA in cells}
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
        "paired_vs_vanilla": paired,
        "task_delta_vs_vanilla": task_delta,
        "task_delta_seeds": task_delta_n,
        "worse_than_vanilla_std": worse,
        "wall": wall,
        "calibration": calib,
        "pseudo": pseudo,
        "overrides": [json.loads(o) for o in overrides],
        "devices": _devices(records),
        "plans": _plans(records),
        "anchor": _anchor(records, cells, tasks, combos),
    }
    return summary


def paired_deltas(cells: dict, combo: str, tasks: list[str]) -> dict[str, Any]:
    """Per seed, the combo's task average minus vanilla's on the same seed (seeds with every task in both), their
    mean, and a one-sided 95% lower bound, mean - t(0.95, n-1) * sd / sqrt(n) (Student t over the n seeds;
    None with fewer than 2 seeds): `combo` beats vanilla at the 5% level when the bound is above 0."""
    from scipy.stats import t as student_t

    van = cells[VANILLA]
    mine = cells.get(combo, {})
    seeds = sorted(set.intersection(*(set(mine.get(t, {}).get("scores", {})) & set(van.get(t, {}).get("scores", {}))
                                       for t in tasks)), key=int) if tasks else []
    per_seed = {k: float(np.mean([mine[t]["scores"][k] - van[t]["scores"][k] for t in tasks])) for k in seeds}
    d = np.array(list(per_seed.values()))
    out: dict[str, Any] = {"per_seed": per_seed, "n": len(d), "mean": float(d.mean()) if len(d) else None,
                           "sd": float(d.std(ddof=1)) if len(d) > 1 else None, "lower_95": None}
    if len(d) > 1:
        out["lower_95"] = float(d.mean() - student_t.ppf(0.95, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return out


def _devices(records: list[dict]) -> dict[str, int]:
    """{device name: number of records}; records without one (hand-written, very old) are not counted."""
    names = ["cpu" if r.get("device") == "cpu" else (r.get("device_name") or r.get("device")) for r in records]
    return {d: names.count(d) for d in sorted({n for n in names if n})}


def _plans(records: list[dict]) -> dict[str, int]:
    """{"<file> <sha256>": number of records} of `--plan` sweeps, plus "none" for records made without a plan."""
    names = [f"{r['plan']['file']} {r['plan']['sha256']}" if r.get("plan") else "none" for r in records]
    return {n: names.count(n) for n in sorted(set(names))}


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
    """The machine-readable last line: {"tasks": [...], "seeds": N, "seed_list": [...], "avg": {combo: points},
    "paired": {combo: {"per_seed": {seed: delta}, "mean": ..., "lower_95": ...}} (paired: vs vanilla),
    "plan_sha256": the --plan file's digest when every record carries that one, else null}."""
    def r2(v):
        return round(v, 2) if v is not None else None

    avg = {c: r2(v) for c, v in summary["avg"].items()}
    paired = {c: {"per_seed": {k: r2(v) for k, v in p["per_seed"].items()}, "mean": r2(p["mean"]),
                  "lower_95": r2(p["lower_95"])} for c, p in summary.get("paired_vs_vanilla", {}).items()}
    plans = [k.split(" ")[1] for k in summary.get("plans", {}) if k != "none"]
    one_plan = plans[0] if len(plans) == 1 and "none" not in summary.get("plans", {}) else None
    return json.dumps({"tasks": summary["tasks"], "seeds": len(summary["seeds"]), "seed_list": summary["seeds"],
                       "avg": avg, "paired": paired, "plan_sha256": one_plan})


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
            p = summary.get("paired_vs_vanilla", {}).get(c)
            bound = (f"; paired over seeds {', '.join(p['per_seed'])}: one-sided 95% lower bound "
                     f"{_fmt(p['lower_95'], True)}" if p and p["lower_95"] is not None else "")
            lines.append(f"{c} vs vanilla: {_fmt(d[c], True)} points (task average over "
                         f"{', '.join(summary['tasks'])}{bound})")
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
    plans = summary.get("plans") or {}
    if len(plans) == 1 and "none" not in plans:
        lines += [f"Pre-registered: every record comes from the plan {next(iter(plans))} (sha256).", ""]
    elif any(k != "none" for k in plans):
        lines += ["**Warning: the records do not all come from one plan** ("
                  + ", ".join(f"{k}: {n} runs" for k, n in plans.items()) + ").", ""]
    lines += [md_row(["combo", *tasks, "avg", "Δ avg vs vanilla", "wall vs vanilla", "s/run"]), md_rule(len(tasks) + 5)]
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
        lines.append(md_row(row))
    if VANILLA in combos and len(combos) > 1:
        lines += ["", "Change vs vanilla per task (mean over the seeds both have, [n] when fewer than all; "
                  "* = below vanilla by more than vanilla's seed std on that task):", "",
                  md_row(["combo", *tasks]), md_rule(len(tasks) + 1)]
        for c in combos:
            if c == VANILLA:
                continue
            td, tn = summary["task_delta_vs_vanilla"][c], summary["task_delta_seeds"][c]
            bad = summary["worse_than_vanilla_std"][c]
            lines.append(md_row([c] + [(_fmt(td[t], True) + ("*" if t in bad else "")
                                                    + (f" [{tn[t]}]" if tn[t] < len(summary["seeds"]) else ""))
                                                   if t in td else "—" for t in tasks]))
    calib = summary["calibration"]
    if calib:
        lines += ["", "Calibration on dev (classification tasks; mean over seeds). ECE in % (15 bins), NLL in "
                  "nats; 'after' = post-hoc temperature scaling, cross-fitted (T fitted on one half of dev, "
                  "scored on the other, then swapped): the honest number. In-sample 'after' in brackets.", "",
                  md_row(["combo", "task", "ECE before", "ECE after", "NLL before", "NLL after", "T"]), md_rule(7)]
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
    plt = pyplot()
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
    save_figure(fig, path)


def print_report(summary: dict) -> None:
    """The table, the verdict lines, and the JSON line last."""
    print(render_markdown(summary))
    print(summary_line(summary), flush=True)
