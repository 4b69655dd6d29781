"""bench/glue_anchor.py: both sides run on a real CoLA slice, records merge per side, the table reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _bench import load_bench
from accelerate.state import AcceleratorState
from _data import GLUE_DIR, needs_glue

ROOT = Path(__file__).resolve().parents[1]
pytestmark = needs_glue


def test_anchor_sides_merge_and_summary(tmp_path, capsys):
    bench = load_bench("glue_anchor")
    common = ["--task", "cola", "--seed", "3", "--max-train-samples", "32", "--threads", "1", "--no-progress",
              "--glue-dir", str(GLUE_DIR), "--out", str(tmp_path)]
    AcceleratorState._reset_state(reset_partial_state=True)
    assert bench.main([*common, "--sides", "vegalm", "--note", "pytest beside it"]) == 0
    rec = json.loads((tmp_path / "cola-seed3.json").read_text())
    assert "hf_trainer" not in rec and rec["vegalm"]["steps"] == 3  # one batch of 32 per epoch, 3 epochs
    assert rec["vegalm"]["concurrent_load"] == "pytest beside it"
    AcceleratorState._reset_state(reset_partial_state=True)
    assert bench.main(common) == 0  # only the missing Trainer side runs
    rec = json.loads((tmp_path / "cola-seed3.json").read_text())
    assert rec["hf_trainer"]["steps"] == 3 and rec["train_time_ratio"] is None  # a loaded side leaves the ratio
    assert rec["score_delta"] == round(rec["vegalm"]["dev_score"] - rec["hf_trainer"]["dev_score"], 3)
    capsys.readouterr()
    assert bench.main(["--summary", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table = json.loads(lines[-1])
    assert table["tasks"]["cola"]["vegalm"]["s_per_epoch"] is None  # its only run was measured under load
    assert table["tasks"]["cola"]["hf_trainer"]["scores"] == [round(rec["hf_trainer"]["dev_score"], 2)]
    assert lines[2].startswith("| cola |")


def test_speed_check_counts_padded_tokens(capsys):
    bench = load_bench("glue_anchor")
    AcceleratorState._reset_state(reset_partial_state=True)
    argv = ["--task", "mrpc", "--seed", "1", "--max-train-samples", "32", "--threads", "1", "--no-progress",
            "--glue-dir", str(GLUE_DIR), "--repeats", "2"]
    assert bench.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["repeats"] == 2 and len(out["train_s_all"]["vegalm"]) == 2
    # one batch of 32 per epoch holds every example: both sides push the same padded tokens
    assert out["padded_tokens"]["vegalm"] == out["padded_tokens"]["hf_trainer"] > 3 * 32 * 20
    assert out["ratio_per_token_median"] > 0
    with pytest.raises(SystemExit):
        bench.main([*argv, "--out", "x"])
