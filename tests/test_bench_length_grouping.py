"""bench/length_grouping.py: random vs length-grouped batches of one epoch, on real CoLA with MiniLM-L6."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _bench import load_bench
from _data import GLUE_DIR, needs_glue

ROOT = Path(__file__).resolve().parents[1]
pytestmark = needs_glue


def test_arms_train_the_same_examples():
    bench = load_bench("length_grouping")
    lengths = [(7 * i) % 53 + 3 for i in range(1000)]
    rnd, mic, grp = (bench.epoch_steps(lengths, 32, 4, arm, micro=4) for arm in bench.ARMS)
    assert len(rnd) == len(mic) == len(grp) == 31
    assert all(len(st) == 1 and len(st[0]) == 32 for st in rnd + grp) and all(len(st) == 4 for st in mic)
    # micro: every step holds the random arm's examples, as 4 micro-batches of 8
    assert [sorted(i for mb in st for i in mb) for st in mic] == [sorted(st[0]) for st in rnd]
    assert sorted(i for st in rnd for i in st[0]) == sorted(i for st in grp for i in st[0])

    def padded(arm):
        return sum(max(lengths[i] for i in mb) * len(mb) for st in arm for mb in st)

    assert padded(grp) < padded(mic) < 0.8 * padded(rnd)


def test_cola_on_minilm(capsys):
    bench = load_bench("length_grouping")
    assert bench.main(["--task", "cola", "--steps", "1", "--repeats", "2", "--glue-dir", str(GLUE_DIR)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["batches"] == 8551 // 32 and line["repeats"] == 2
    # measured on the real CoLA train set: random batches pad to ~2.0x the real tokens, micro-batches of 8
    # to ~1.2x, grouped batches to ~1.05x
    pad = line["padded_over_real"]
    assert pad["grouped"] < 1.1 < pad["micro"] < 1.3 < 1.9 < pad["random"]
    assert all(line["epoch_s_median"][a] > 0 for a in ("random", "micro", "grouped"))
    with pytest.raises(SystemExit):
        bench.main(["--steps", "0"])
