"""bench/trick_cost.py: per-step time of each combo from the runner's own log, on a real MRPC slice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _bench import load_bench
from _data import GLUE_DIR, needs_glue

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [needs_glue,
              pytest.mark.usefixtures("fresh_accelerate")]


def test_step_seconds_reads_the_log(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("\n".join(json.dumps({"step": s, "elapsed": e}) for s, e in [(10, 5.0), (14, 9.0)]) + "\n")
    assert load_bench("trick_cost").step_seconds(f, 14) == 1.0


def test_two_combos_on_minilm(tmp_path, capsys):
    bench = load_bench("trick_cost")
    out = tmp_path / "cost.json"
    argv = ["--task", "mrpc", "--combos", "vanilla,r3f", "--steps", "12", "--batch-size", "4", "--threads", "1",
            "--glue-dir", str(GLUE_DIR), "--out", str(out)]
    assert bench.main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == json.loads(out.read_text())
    assert set(line["s_per_step"]) == {"vanilla", "r3f"} and line["measured_steps"] == 2
    assert line["ratio_vs_vanilla"]["vanilla"] == 1.0 and line["s_per_step"]["r3f"] > 0
    with pytest.raises(SystemExit):
        bench.main([*argv, "--steps", "10"])
    with pytest.raises(SystemExit):
        bench.main([*argv, "--combos", "vanilla,transductive"])


def test_rounds_and_settings(tmp_path, capsys):
    """--repeats runs the combos in rounds (ratio: median over rounds); KEY=VALUE settings reach every combo and a
    bad one stops the bench before any run."""
    bench = load_bench("trick_cost")
    argv = ["--task", "mrpc", "--combos", "vanilla,rdrop", "--steps", "11", "--batch-size", "4", "--threads", "1",
            "--glue-dir", str(GLUE_DIR), "--repeats", "2", "mixed_precision=bf16"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    line = json.loads(out.strip().splitlines()[-1])
    assert line["repeats"] == 2 and out.count("round 2/2") == 2
    assert line["mixed_precision"] == {"vanilla": "bf16", "rdrop": "bf16"}  # as each run resolved it
    assert bench.main([*argv[:-1], "mixed_precision=no"]) == 0  # the same runs in fp32: the setting is what moved
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mixed_precision"]["rdrop"] == "no"
    assert bench.main([*argv[:-1], "weight_decay=-1"]) == 2
    bad = capsys.readouterr()
    assert "weight_decay" in bad.err and "round" not in bad.out  # refused before the first run
    with pytest.raises(SystemExit):  # a key the timing relies on
        bench.main([*argv[:-1], "max_steps=50"])
