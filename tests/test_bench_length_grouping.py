"""bench/length_grouping.py: random vs length-grouped batches of one epoch, on real CoLA with MiniLM-L6."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _bench import load_bench

ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = ROOT.parent / "shared" / "data" / "glue"
pytestmark = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"real GLUE data not found at {GLUE_DIR}")


def test_both_arms_train_the_same_examples():
    bench = load_bench("length_grouping")
    lengths = [(7 * i) % 53 + 3 for i in range(1000)]
    rnd, grp = (bench.epoch_batches(lengths, 32, 4, g) for g in (False, True))
    assert len(rnd) == len(grp) == 31 and all(len(b) == 32 for b in rnd + grp)
    assert sorted(i for b in rnd for i in b) == sorted(i for b in grp for i in b)
    padded = [sum(max(lengths[i] for i in b) * 32 for b in arm) for arm in (rnd, grp)]
    assert padded[1] < 0.8 * padded[0]


def test_cola_on_minilm(capsys):
    bench = load_bench("length_grouping")
    assert bench.main(["--task", "cola", "--steps", "1", "--repeats", "2", "--glue-dir", str(GLUE_DIR)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["batches"] == 8551 // 32 and line["repeats"] == 2
    # measured on the real CoLA train set: random batches pad to ~2x the real tokens, grouped ones to ~1.05x
    assert line["padded_over_real"]["grouped"] < 1.1 < 1.5 < line["padded_over_real"]["random"]
    assert line["epoch_s_median"]["random"] > 0 and line["epoch_s_median"]["grouped"] > 0
    with pytest.raises(SystemExit):
        bench.main(["--steps", "0"])
