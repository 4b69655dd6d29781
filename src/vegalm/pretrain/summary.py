"""`vegalm run`'s OUT/summary.json and the report's health section (held-out AUC / excess, STS-B, GLUE).

The GLUE comparison is over seeds: per seed, the average of the tasks' dev scores; mean +- std over
seeds for each model, and the paired difference (same fine-tuning seed) RTD - MLM with its std.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def _rows(path: Path, key: str) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get(key) is not None]


def _last(root: Path, key: str) -> float | None:
    for phase in ("phase2", "phase1"):
        rows = _rows(root / phase / "metrics.jsonl", key)
        if rows:
            return rows[-1][key]
    return None


def _mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def glue_by_seed(glue: dict) -> dict[str, float]:
    """seed -> unweighted mean over tasks of that seed's dev score (a seed missing a task is left out)."""
    per_task = glue.get("per_task", {})
    seeds = set.intersection(*(set(e["scores"]) for e in per_task.values())) if per_task else set()
    return {s: statistics.fmean(e["scores"][s] for e in per_task.values()) for s in sorted(seeds)}


def build_summary(out: Path, pre: dict, glue: dict, wall_s: float) -> dict[str, Any]:
    rtd_root = out / "rtd"
    phases = pre.get("rtd", {}).get("phases", {})
    s: dict[str, Any] = {
        "wall_s": wall_s,
        "rtd_replaced_auc": _last(rtd_root, "heldout_rtd_auc"),
        "rtd_excess_nats": _last(rtd_root, "heldout_rtd_excess"),
        "rtd_context_auc": _last(rtd_root, "heldout_context_auc"),  # against unigram replacements: context only
        "rtd_token_cos": _last(rtd_root, "heldout_token_cos"),  # near 1: the discriminator has collapsed
        "rtd_train_auc": _last(rtd_root, "rtd_auc"),
        "generator_loss": _last(rtd_root, "heldout_mlm_loss"),
        "unigram_entropy": _last(rtd_root, "unigram_entropy"),
        "sts_zero_shot_phase1": phases.get("phase1", {}).get("sts_zero_shot"),
        "sts_zero_shot_phase2": phases.get("phase2", {}).get("sts_zero_shot"),
        "sts_zero_shot_mlm": pre.get("mlm", {}).get("phases", {}).get("phase1", {}).get("sts_zero_shot"),
    }
    by_seed = {name: glue_by_seed(g) for name, g in glue.items()}
    s["glue_avg"] = {name: (_mean_std(list(v.values()))["mean"] if v else None) for name, v in by_seed.items()}
    s["glue_avg_std"] = {name: (_mean_std(list(v.values()))["std"] if v else None) for name, v in by_seed.items()}
    s["glue_seeds"] = sorted({k for v in by_seed.values() for k in v})
    s["glue_per_task"] = {name: {t: {"scores": e["scores"], "mean": e.get("mean"), "std": e.get("std")}
                                 for t, e in g.get("per_task", {}).items()} for name, g in glue.items()}  # fmt: skip
    if "rtd" in by_seed and "mlm" in by_seed:
        common = sorted(set(by_seed["rtd"]) & set(by_seed["mlm"]))
        diffs = [by_seed["rtd"][k] - by_seed["mlm"][k] for k in common]
        s["glue_paired_diff"] = {**_mean_std(diffs), "per_seed": dict(zip(common, diffs))} if diffs else None
    return s


def write_summary(out: Path, pre: dict, glue: dict, wall_s: float) -> dict[str, Any]:
    s = build_summary(out, pre, glue, wall_s)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(s, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / "summary.json")
    return s


LABELS = {"heldout_rtd_": "held-out", "rtd_": "train", "heldout_context_": "held-out, unigram replacements"}


def plot_health(out: Path, runs: dict[str, Path]) -> str | None:
    """curve_health.png: held-out replaced-token AUC and excess loss of the RTD run over its steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = runs.get("rtd")
    if root is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    drawn = False
    for ax, key, title in ((axes[0], "auc", "replaced-token AUC"), (axes[1], "excess", "RTD loss - prior entropy (nats)")):
        offset = 0
        for phase in ("phase1", "phase2"):
            series = (("heldout_rtd_", "-o"), ("rtd_", ":")) + ((("heldout_context_", "-s"),) if key == "auc" else ())
            for prefix, style in series:
                rows = _rows(root / phase / "metrics.jsonl", prefix + key)
                if rows:
                    ax.plot([offset + r["step"] for r in rows], [r[prefix + key] for r in rows], style, markersize=3,
                            label=f"{phase} {LABELS[prefix]}")  # fmt: skip
                    drawn = True
            done = root / phase / "done.json"
            if done.is_file():
                offset += json.loads(done.read_text()).get("step", 0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.legend(fontsize=7)
    axes[0].axhline(0.5, color="gray", lw=0.5)
    axes[1].axhline(0.0, color="gray", lw=0.5)
    fig.tight_layout()
    fig.savefig(out / "curve_health.png", dpi=110)
    plt.close(fig)
    return "curve_health.png" if drawn else None


def report_lines(s: dict, figure: str | None) -> list[str]:
    """The report's health / STS-B / GLUE-with-uncertainty section."""
    f = lambda x, spec=".3f": "-" if x is None else format(x, spec)  # noqa: E731
    lines = ["## Pretraining health (held-out segments)", "",
             f"Replaced-token AUC {f(s['rtd_replaced_auc'])} (0.5 = chance), against unigram replacements (context "
             f"only) {f(s.get('rtd_context_auc'))}, excess loss over the prior "
             f"{f(s['rtd_excess_nats'])} nats (< 0: better than predicting the base rate), mean cosine between the "
             f"discriminator's output vectors {f(s.get('rtd_token_cos'))} (near 1: collapsed), generator loss "
             f"{f(s['generator_loss'])} vs the corpus unigram entropy {f(s['unigram_entropy'])} nats.", ""]  # fmt: skip
    if figure:
        lines += [f"![health]({figure})", ""]
    p1, p2 = s.get("sts_zero_shot_phase1"), s.get("sts_zero_shot_phase2")
    lines += ["## Zero-shot STS-B dev (Spearman x 100, pooled embeddings, cosine, no fine-tuning)", "",
              f"After phase 1 (RTD): {f(p1, '.1f')}; after phase 2 (RTD + SimCSE): {f(p2, '.1f')}"
              + (f" ({p2 - p1:+.1f} points)" if None not in (p1, p2) else "")
              + f"; MLM baseline: {f(s.get('sts_zero_shot_mlm'), '.1f')}.", ""]  # fmt: skip
    avg, sd, pd = s.get("glue_avg", {}), s.get("glue_avg_std", {}), s.get("glue_paired_diff")
    if avg:
        seeds = ", ".join(map(str, s.get("glue_seeds", [])))
        lines += ["## GLUE dev over fine-tuning seeds", "",
                  "Per seed, the unweighted task average; mean +- std over seeds " + f"({seeds}):", ""]  # fmt: skip
        lines += [f"- {name}: {f(avg[name], '.2f')} +- {f(sd.get(name), '.2f')}" for name in avg]
        if pd:
            lines += ["", f"Paired difference RTD - MLM (same seeds): {pd['mean']:+.2f} +- {pd['std']:.2f} over "
                          f"{pd['n']} seeds. Reported as it falls; the comparison was not tuned on its outcome."]  # fmt: skip
        lines.append("")
    return lines


__all__ = ["build_summary", "write_summary", "plot_health", "report_lines", "glue_by_seed"]
