"""Trick ablation (`vegalm ablate`): what each fine-tuning trick buys over the vanilla recipe, over tasks x seeds.

The manual (combos, caching, records, the report) is docs/ablation.md.
"""

from __future__ import annotations

from vegalm.experiments.ablate.combos import ALL_TRICKS, Combo, parse_combos, valid_combo_names
from vegalm.experiments.ablate.jobs import plan_jobs, run_ablation
from vegalm.experiments.ablate.runs import run_one
from vegalm.experiments.ablate.summary import (
    ANCHOR,
    load_records,
    plot_ablation,
    print_report,
    render_markdown,
    summarize,
    summary_line,
    verdict_lines,
    write_report,
)
from vegalm.finetune.naming import model_tag
from vegalm.finetune.stages.self_training import pseudo_labels_from_run

__all__ = [
    "ALL_TRICKS",
    "ANCHOR",
    "Combo",
    "load_records",
    "model_tag",
    "parse_combos",
    "plan_jobs",
    "plot_ablation",
    "print_report",
    "pseudo_labels_from_run",
    "render_markdown",
    "run_ablation",
    "run_one",
    "summarize",
    "summary_line",
    "valid_combo_names",
    "verdict_lines",
    "write_report",
]
