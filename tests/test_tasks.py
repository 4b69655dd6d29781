"""The per-task defaults table of docs/finetuning.md against finetune/tasks.py."""

from __future__ import annotations

import re
from pathlib import Path

from vegalm.data.glue import TASKS
from vegalm.finetune.tasks import DEFAULTS, TaskDefaults

DOC = Path(__file__).resolve().parents[1] / "docs" / "finetuning.md"


def test_defaults_table_complete_and_documented():
    assert len(TASKS) == 10
    for name, table in DEFAULTS.items():
        assert set(table) == set(TASKS), name
    rows = re.findall(r"^\| (vega|run_glue) +\| (\w+) +\| ([\d.e-]+) +\| (\d+) +\| (\d+) +\| ([\d.]+) +\| (\d+) +\|$",
                      DOC.read_text(encoding="utf-8"), re.M)
    assert len(rows) == 11
    for set_name, task, lr, epochs, batch, warmup, max_len in rows:
        for t in (TASKS if task == "all" else [task]):
            d = DEFAULTS[set_name][t]
            assert (d.lr, d.epochs, d.batch_size, d.warmup_ratio, d.max_length) == (
                float(lr), int(epochs), int(batch), float(warmup), int(max_len)), (set_name, t)
    assert DEFAULTS["run_glue"]["rte"] == TaskDefaults(2e-5, 3, 32, 0.0, 128)
