"""What the sweeps' reports share: statistics over seeds, Markdown table rows, and writing a plot."""

from __future__ import annotations

import io
import statistics
from pathlib import Path

from vegalm.io import atomic_write_bytes

STAT_KEYS = ("mean", "median", "std", "n")  # the ablation cells' order
SPREAD_KEYS = ("median", "mean", "std", "min", "max", "n")  # the GLUE sweep's order (results.json)


def seed_stats(values: list[float], keys: tuple[str, ...] = STAT_KEYS) -> dict[str, float]:
    """Median, mean, sample std (ddof=1; 0.0 for one value), min, max and n of `values`, the `keys` in order."""
    every = {"median": float(statistics.median(values)), "mean": float(statistics.fmean(values)),
             "std": float(statistics.stdev(values)) if len(values) > 1 else 0.0,
             "min": float(min(values)), "max": float(max(values)), "n": len(values)}
    return {k: every[k] for k in keys}


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def md_rule(columns: int) -> str:
    """The header rule of a Markdown table of `columns` columns."""
    return "|" + "---|" * columns


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported on first use: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Write `fig` as a PNG, atomically, and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


__all__ = ["SPREAD_KEYS", "STAT_KEYS", "md_row", "md_rule", "pyplot", "save_figure", "seed_stats"]
