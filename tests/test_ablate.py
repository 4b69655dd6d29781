"""`vegalm ablate`: combos, the sweep's records / table / plot / JSON line, caching, pseudo-labels, --summary.

One real sweep (module fixture) on a 2-layer, hidden-32 random encoder, 1 seed, tasks WNLI (the smallest
real classification task) and STS-B, combos vanilla, adv (SiFT, lambda 1), selfcal and transductive,
32 training examples and 2 steps per run. The encoder is initialised with std 0.5 instead of 0.02 so
that its features differ between inputs and the teacher predicts both classes (with 0.02 every test row
gets the same logits, and a class-balanced selection is empty). The summary and anchor arithmetic is
checked on hand-written records in the exact committed format.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState

from vegalm.config import ConfigError
from vegalm.data import glue as glue_data
from vegalm.errors import VegaError, WorkersInterrupted
from vegalm.experiments import ablate
from vegalm.data.glue import load_extra_train
from vegalm.finetune.config import FinetuneConfig, config_hash, resolve
from vegalm.finetune.models import minilm_path
from _data import GLUE_DIR, needs_glue

pytestmark = needs_glue
TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            position_buckets=32, initializer_range=0.5)
COMBOS = ["vanilla", "adv", "selfcal", "transductive"]
SETTINGS = ["max_train_samples=32", "batch_size=16", "max_steps=2", "progress=false", f"glue_dir={GLUE_DIR}",
            "trick_args.adv.params.vat_lambda=1.0"]


def _main(argv: list[str]) -> tuple[int, str]:
    from vegalm.cli import main

    buf = io.StringIO()
    AcceleratorState._reset_state(reset_partial_state=True)
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    AcceleratorState._reset_state(reset_partial_state=True)
    return rc, buf.getvalue()


class _GuardedTestRow:
    """A test row whose label must never be read (GLUE test files have none; a leak would show here)."""

    __slots__ = ("guid", "index", "text_a", "text_b")

    def __init__(self, ex):
        self.guid, self.index, self.text_a, self.text_b = ex.guid, ex.index, ex.text_a, ex.text_b

    @property
    def label(self):
        raise AssertionError(f"the label of test row {self.guid} was read")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from vegalm.model import EncoderConfig, VegaModel

    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    VegaModel(EncoderConfig(**TINY)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, path / name)
    return path


@pytest.fixture(scope="module")
def sweep(tiny_dir, tmp_path_factory):
    """The sweep, run once through the CLI, with test rows that raise if their label is read."""
    torch.set_num_threads(1)  # the cores are shared
    root = tmp_path_factory.mktemp("ablate")
    argv = ["ablate", "--model", str(tiny_dir), "--tasks", "wnli,stsb", "--seeds", "1", "--tricks", ",".join(COMBOS),
            "--out", str(root / "out"), "--results-dir", str(root / "results"), "--model-tag", "tiny", *SETTINGS]
    real = glue_data.load_split
    handed = []

    def guarded(task, split, glue_dir=None):
        rows = real(task, split, glue_dir)
        if split.startswith("test"):
            rows = [_GuardedTestRow(ex) for ex in rows]
            handed.extend(rows)
        return rows

    import vegalm.finetune.run  # noqa: F401  bound to the real load_split first: the run itself encodes test rows

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(glue_data, "load_split", guarded)  # experiments/ablate/runs.py imports it from here at call time
        rc, stdout = _main(argv)
    assert rc == 0, stdout
    return {"root": root, "argv": argv, "stdout": stdout, "records": root / "results" / "tiny",
            "out": root / "out", "handed": handed}


def _record(sweep, combo, task) -> dict:
    return json.loads((sweep["records"] / f"{combo}__{task}__seed0.json").read_text())


# ------------------------------------------------------------------------------------------ combos


def test_the_core_never_imports_experiments():
    from test_layout import SRC, import_graph  # the layout test's AST walk (imports in functions count)

    graph = import_graph(SRC, "vegalm")
    assert "vegalm.finetune.run" in graph["vegalm.experiments.ablate.runs"]  # the walk sees real edges
    above = ("vegalm.experiments", "vegalm.pipeline")  # the sweeps, and `vegalm run` (pretraining + the GLUE sweep)
    shims: set[str] = set()  # moved to experiments/glue.py; deleted once its importers switch
    leaks = sorted(f"{m} -> {t}" for m, targets in graph.items() if not m.startswith(above) and m not in shims
                   for t in targets if t.startswith("vegalm.experiments"))
    assert not leaks, leaks



def test_seeds_count_or_list():
    from vegalm.experiments.glue import parse_seeds

    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("0,") == [0] and parse_seeds("3,4,5") == [3, 4, 5]
    with pytest.raises(ConfigError, match=r"got 0 \(a list names seeds: 0, is seed 0 alone"):
        parse_seeds("0")
    with pytest.raises(ConfigError, match="distinct"):
        parse_seeds("1,1")


def test_combo_names_and_model_tags():
    got = {c.name: (c.tricks, c.transductive) for c in ablate.parse_combos("vanilla, adv,all,adv+ema,ema,all")}
    assert got == {"vanilla": ((), False), "adv": (("adv",), False), "all": (("adv", "selfcal"), True),
                   "adv+ema": (("adv", "ema"), False), "ema": (("ema",), False)}
    assert [c.name for c in ablate.parse_combos("selfcal,transductive")] == ["selfcal", "transductive"]
    assert ablate.parse_combos("transductive")[0].tricks == ()
    tapt = {c.name: (c.tricks, c.transductive, c.tapt) for c in ablate.parse_combos("tapt,all+tapt,vanilla")}
    assert tapt == {"tapt": ((), False, True), "all+tapt": (("adv", "selfcal"), True, True), "vanilla": ((), False, False)}
    with pytest.raises(ConfigError) as e:
        ablate.parse_combos("vanilla,advv")
    msg = str(e.value)
    assert "\n" not in msg and "'advv'" in msg
    assert all(n in msg for n in ("vanilla", "adv", "selfcal", "transductive", "all", "smart", "freelb", "r3f",
                                  "sift", "ema"))
    with pytest.raises(ConfigError, match="unknown combo 'vanilla\\+adv'"):
        ablate.parse_combos("vanilla+adv")
    assert ablate.model_tag("minilm-l6") == "minilm-l6"
    assert ablate.model_tag("runs/pt/discriminator/") == "pt-discriminator"
    assert ablate.model_tag("microsoft/deberta-v3-small") == "microsoft-deberta-v3-small"


def test_extra_train_hook_is_hashed_by_content(tiny_dir, tmp_path):
    rows = [{"guid": "wnli-test-3", "index": 3, "text_a": "A dog.", "text_b": "It barks.", "label": 1}]
    a, b = tmp_path / "a.jsonl", tmp_path / "b" / "pseudo.jsonl"
    b.parent.mkdir()
    for f in (a, b):
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = dict(task="wnli", model=str(tiny_dir), out=str(tmp_path / "o"), glue_dir=str(GLUE_DIR))
    plain = resolve(FinetuneConfig(**base))
    with_a = resolve(FinetuneConfig(**base, extra_train=str(a)))
    assert "extra_train_sha256" not in plain and with_a["extra_train"] == str(a.resolve())
    # the same content elsewhere is the same run; other content is another run; none is the old key
    assert config_hash(with_a) == config_hash(resolve(FinetuneConfig(**base, extra_train=str(b))))
    b.write_text(b.read_text().replace('"label": 1', '"label": 0'))
    assert config_hash(with_a) != config_hash(resolve(FinetuneConfig(**base, extra_train=str(b)))) != config_hash(plain)
    ex = load_extra_train(a, glue_data.TASKS["wnli"])
    assert [(e.guid, e.index, e.label) for e in ex] == [("wnli-test-3", 3, 1)]
    a.write_text(json.dumps({**rows[0], "label": 2}) + "\n")
    with pytest.raises(VegaError, match=r"a\.jsonl:1: label 2 outside \[0, 2\)"):
        load_extra_train(a, glue_data.TASKS["wnli"])
    with pytest.raises(ConfigError, match="extra_train: no such file"):
        resolve(FinetuneConfig(**base, extra_train=str(tmp_path / "missing.jsonl")))


# ------------------------------------------------------------------------------------------ the sweep


def test_records_table_plot_and_json_line(sweep):
    files = sorted(p.name for p in sweep["records"].glob("*.json"))
    assert files == sorted(f"{c}__{t}__seed0.json" for c in COMBOS for t in ("wnli", "stsb"))
    for combo in COMBOS:
        for task in ("wnli", "stsb"):
            rec = _record(sweep, combo, task)
            run = json.loads((Path(rec["run_dir"]) / "results.json").read_text())
            assert rec["dev_score"] == pytest.approx(run["dev_score"], abs=1e-4)
            assert rec["config_hash"] == run["config_hash"] and rec["model_tag"] == "tiny"
            assert rec["combo"] == combo and rec["seed"] == 0 and rec["wall_s"] > 0
            assert run["config"]["tricks"] == rec["tricks"] and run["config"]["defaults"] == "vega"
            assert rec["overrides"]["max_steps"] == 2 and "progress" not in rec["overrides"]
            if task == "wnli":  # classification: calibration from the dev logits, cross-fitted included
                cal = rec["calibration"]
                assert {"ece_before", "ece_after", "ece_after_crossfit", "nll_before", "nll_after_crossfit",
                        "temperature"} <= set(cal) and 0 <= cal["ece_before"] <= 1
            else:
                assert rec["calibration"] is None
    assert _record(sweep, "adv", "wnli")["tricks"] == ["adv"]
    adv_run = json.loads((sweep["out"] / "adv" / "wnli" / "seed0" / "results.json").read_text())
    assert adv_run["config"]["trick_args"]["adv"]["params"] == {"vat_lambda": 1.0}

    md = (sweep["out"] / "ablation.md").read_text()
    for combo in COMBOS:
        assert f"| {combo} |" in md
    assert "| combo | stsb | wnli | avg | Δ avg vs vanilla | wall vs vanilla | s/run |" in md
    van = {t: _record(sweep, "vanilla", t)["dev_score"] for t in ("wnli", "stsb")}
    assert f"{van['wnli']:.2f} ± 0.00 ({van['wnli']:.2f})" in md and "RTD" in md
    assert (sweep["out"] / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    lines = sweep["stdout"].strip().splitlines()
    assert lines[0].startswith("trained 7 run(s)")  # 4 combos x 2 tasks, less STS-B's transductive (no pseudo)
    last = json.loads(lines[-1])
    assert set(last) == {"tasks", "seeds", "seed_list", "avg", "paired", "plan_sha256"} and last["plan_sha256"] is None and last["tasks"] == ["stsb", "wnli"] and last["seeds"] == 1
    assert list(last["avg"]) == COMBOS
    assert last["avg"]["vanilla"] == pytest.approx((van["wnli"] + van["stsb"]) / 2, abs=0.006)
    assert "| vanilla |" in sweep["stdout"]  # the table is printed too


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_transductive_pseudo_labels(sweep):
    assert len(sweep["handed"]) >= 146  # WNLI's test rows went through the label guard
    rec = _record(sweep, "transductive", "wnli")
    p = rec["pseudo"]
    teacher = Path(p["teacher_dir"])
    assert teacher == sweep["out"] / "vanilla" / "wnli" / "seed0"  # shared with the vanilla combo
    assert p["test_rows"] == 146 and p["skipped"] is None
    assert p["selected"] == sum(p["per_class"]) > 0 and len(set(p["per_class"])) == 1  # class-balanced
    assert p["selected"] <= int(0.3 * 146)
    pseudo = [json.loads(line) for line in (Path(rec["run_dir"]) / "pseudo.jsonl").read_text().splitlines()]
    assert len(pseudo) == p["selected"] and all(r["guid"].startswith("wnli-test-") for r in pseudo)
    logits = np.load(teacher / "test_logits.npy")  # test rows in file order (index 0..145)
    test_index = [e.index for e in glue_data.load_split("wnli", "test", GLUE_DIR)]
    for r in pseudo:  # every pseudo-label is the teacher's prediction
        assert r["label"] == int(logits[test_index.index(r["index"])].argmax())
    # the pseudo-labels' likely accuracy: the teacher on the dev rows that clear the same per-class cut
    pt = _softmax(logits)
    cut = {}
    for r in pseudo:
        i = test_index.index(r["index"])
        cut[r["label"]] = min(cut.get(r["label"], 1.0), pt[i].max())
    pd = _softmax(np.load(teacher / "dev_logits.npy"))
    gold = np.array([e.label for e in glue_data.load_split("wnli", "dev", GLUE_DIR)])
    keep = np.array([row.max() >= cut.get(int(row.argmax()), np.inf) for row in pd])
    assert p["dev_rows"] == 71 and p["dev_rows_at_cut"] == int(keep.sum()) > 0
    assert p["dev_accuracy_at_cut"] == pytest.approx(100 * (pd.argmax(1)[keep] == gold[keep]).mean(), abs=0.01)
    assert p["teacher_dev_score"] == pytest.approx(_record(sweep, "vanilla", "wnli")["dev_score"])
    line = next(x for x in sweep["stdout"].splitlines() if x.startswith("- transductive / wnli:"))
    assert (f"past the same cut {p['dev_accuracy_at_cut']:.1f}%; teacher {p['teacher_dev_score']:.2f} -> "
            f"student {rec['dev_score']:.2f}") in line
    run = json.loads((Path(rec["run_dir"]) / "results.json").read_text())
    assert run["num_train_examples"] == 32 + p["selected"] and "extra_train_sha256" in run["config"]
    assert rec["wall_s"] == pytest.approx(sum(rec["wall_parts_s"].values()))
    assert set(rec["wall_parts_s"]) == {"teacher", "student"}
    # STS-B: regression, no pseudo-labels, the row is vanilla's run
    st = _record(sweep, "transductive", "stsb")
    assert st["pseudo"]["selected"] == 0 and "regression" in st["pseudo"]["skipped"]
    assert st["dev_score"] == _record(sweep, "vanilla", "stsb")["dev_score"]
    assert st["run_dir"] == str(sweep["out"] / "vanilla" / "stsb" / "seed0")


def test_rerun_trains_nothing(sweep, monkeypatch):
    before = {p.name: p.read_bytes() for p in sweep["records"].glob("*.json")}
    pseudo = sweep["out"] / "transductive" / "wnli" / "seed0" / "pseudo.jsonl"
    mtime = pseudo.stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("a cached run must not train")

    monkeypatch.setattr("vegalm.train.trainer.Trainer.train", no_training)
    rc, stdout = _main(sweep["argv"])
    assert rc == 0 and stdout.startswith("trained 0 run(s)")
    assert {p.name: p.read_bytes() for p in sweep["records"].glob("*.json")} == before
    assert pseudo.stat().st_mtime_ns == mtime
    assert stdout.strip().splitlines()[-1] == sweep["stdout"].strip().splitlines()[-1]


def test_cached_only_rebuilds_records_and_trains_nothing(sweep, tmp_path, monkeypatch):
    """--cached-only reads back what is there, writes the same records, and lists what is not cached."""
    shutil.copytree(sweep["out"], tmp_path / "out")
    (tmp_path / "out" / "adv" / "wnli" / "seed0" / "results.json").unlink()  # as if cut off by a time limit
    monkeypatch.setattr("vegalm.train.trainer.Trainer.train", lambda *a, **k: pytest.fail("--cached-only trained"))
    argv = list(sweep["argv"])
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    argv[argv.index("--results-dir") + 1] = str(tmp_path / "results")
    rc, stdout = _main([*argv, "--cached-only"])
    assert rc == 0 and stdout.startswith("trained 0 run(s)")
    assert "not cached (skipped): adv wnli seed 0" in stdout.splitlines()[0]
    rebuilt = {p.name: json.loads(p.read_text()) for p in (tmp_path / "results" / "tiny").glob("*.json")}
    serial = {p.name: json.loads(p.read_text()) for p in sweep["records"].glob("*.json")}
    assert sorted(rebuilt) == sorted(set(serial) - {"adv__wnli__seed0.json"})
    moved = ("teacher_dir",)  # the teacher's folder moved with the copy; everything else is the same
    for name, rec in rebuilt.items():
        want = serial[name]
        assert (rec["dev_score"], rec["config_hash"]) == (want["dev_score"], want["config_hash"]), name
        assert {k: v for k, v in (rec["pseudo"] or {}).items() if k not in moved} == {
            k: v for k, v in (want["pseudo"] or {}).items() if k not in moved}, name


def test_pseudo_label_gate_reports_the_teacher_below_the_bar(sweep, tmp_path, monkeypatch):
    """--pseudo-min-dev-accuracy: below the bar the student is skipped and the row is the teacher's run;
    at the bar the student (cached) is kept. Read back from the sweep's runs: nothing trains."""
    acc = _record(sweep, "transductive", "wnli")["pseudo"]["dev_accuracy_at_cut"]
    monkeypatch.setattr("vegalm.train.trainer.Trainer.train", lambda *a, **k: pytest.fail("the gate trained"))
    argv = [a for a in sweep["argv"] if not a.startswith("trick_args.adv")]  # no adv combo here
    argv[argv.index("--tricks") + 1] = "vanilla,transductive"
    argv[argv.index("--tasks") + 1] = "wnli"
    for bar, skipped in ((acc + 0.01, True), (acc, False)):
        argv[argv.index("--results-dir") + 1] = str(tmp_path / f"r{bar}")
        rc, stdout = _main([*argv, "--pseudo-min-dev-accuracy", str(bar)])
        assert rc == 0 and stdout.startswith("trained 0 run(s)"), stdout
        rec = json.loads((tmp_path / f"r{bar}" / "tiny" / "transductive__wnli__seed0.json").read_text())
        assert rec["pseudo_min_dev_accuracy"] == bar
        if skipped:
            assert "under pseudo_min_dev_accuracy" in rec["pseudo"]["skipped"]
            assert rec["pseudo"]["selected"] == 0 and rec["pseudo"]["below_bar"] > 0
            assert rec["dev_score"] == _record(sweep, "vanilla", "wnli")["dev_score"]
            assert rec["run_dir"] == str(sweep["out"] / "vanilla" / "wnli" / "seed0")
        else:
            assert rec["pseudo"]["skipped"] is None
            assert rec["dev_score"] == _record(sweep, "transductive", "wnli")["dev_score"]
    rc, _ = _main([*argv, "--pseudo-min-dev-accuracy", "101"])
    assert rc == 2


def test_parallel_jobs_match_the_serial_sweep(sweep, tmp_path, monkeypatch):
    """--jobs 2: the same runs in two spawned workers give the serial sweep's records, score for score."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the serial sweep ran on 1 thread; so do the workers
    argv = list(sweep["argv"])
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    argv[argv.index("--results-dir") + 1] = str(tmp_path / "results")
    rc, stdout = _main([*argv, "--jobs", "2"])
    assert rc == 0 and stdout.startswith(f"trained {len(COMBOS) * 2 - 1} run(s)")  # transductive reuses vanilla
    serial = {p.name: json.loads(p.read_text()) for p in sweep["records"].glob("*.json")}
    parallel = {p.name: json.loads(p.read_text()) for p in (tmp_path / "results" / "tiny").glob("*.json")}
    assert sorted(parallel) == sorted(serial)
    for name, rec in serial.items():
        assert (parallel[name]["dev_score"], parallel[name]["config_hash"]) == (rec["dev_score"], rec["config_hash"])
    assert stdout.strip().splitlines()[-1] == sweep["stdout"].strip().splitlines()[-1]


def test_parallel_plan_keeps_shared_folders_in_one_job():
    combos = ablate.parse_combos("vanilla,adv,transductive,all,tapt,all+tapt")
    jobs = ablate.plan_jobs(combos, ["rte", "cola"], [0, 1], {"rte": 1.0, "cola": 3.0})
    runs = [(c.name, t, s) for job in jobs for c, t, s in job]
    assert sorted(runs) == sorted((c.name, t, s) for c in combos for t in ("rte", "cola") for s in (0, 1))
    names = [[c.name for c, _, _ in job] for job in jobs]
    assert ["vanilla", "transductive"] in names and ["tapt", "all+tapt"] in names  # folders shared: one job
    assert [job[0][2] for job in jobs] == [0] * 8 + [1] * 8  # seed-major
    assert (names[0], jobs[0][0][1]) == (["tapt", "all+tapt"], "cola")  # the longest job of seed 0 first
    assert names[7] == ["adv"] and jobs[7][0][1] == "rte"  # the shortest last


def test_summary_from_records_alone(sweep, tmp_path, monkeypatch):
    committed = tmp_path / "results" / "ablation" / "tiny"
    shutil.copytree(sweep["records"], committed)
    monkeypatch.setattr("vegalm.finetune.run.run_finetune", lambda *a, **k: pytest.fail("summary trained"))
    want = sweep["stdout"].strip().splitlines()[-1]
    for path in (committed, committed.parent):  # the tag folder, or its parent holding one tag
        rc, stdout = _main(["ablate", "--summary", str(path)])
        assert rc == 0 and stdout.strip().splitlines()[-1] == want
        assert "| transductive |" in stdout and "Calibration on dev" in stdout
    (committed.parent / "other").mkdir()
    shutil.copy(next(committed.glob("*.json")), committed.parent / "other")
    with pytest.raises(ConfigError, match="several model tags"):
        ablate.load_records(committed.parent)


# ------------------------------------------------------------------------------------------ summary


def _write_records(root: Path, scores: dict, model: str = "minilm-l6", anchor: str | None = "minilm-l6"):
    """Records in the committed format: scores[combo][task] = [score per seed]; wall 10 s, `all` 30 s."""
    root.mkdir(parents=True)
    for combo, per_task in scores.items():
        for task, values in per_task.items():
            for seed, v in enumerate(values):
                rec = {"combo": combo, "task": task, "seed": seed, "dev_score": v, "model": model,
                       "model_tag": "minilm-l6", "anchor_model": anchor, "overrides": {},
                       "wall_s": 30.0 if combo == "all" else 10.0, "calibration": None, "pseudo": None}
                (root / f"{combo}__{task}__seed{seed}.json").write_text(json.dumps(rec))


def test_report_names_the_device_and_warns_when_they_differ(tmp_path):
    _write_records(tmp_path / "r", {"vanilla": {"mrpc": [82.3, 82.9]}})
    s = ablate.summarize(ablate.load_records(tmp_path / "r"))
    assert s["devices"] == {} and "Device" not in ablate.render_markdown(s)  # hand-written: none recorded
    for seed, name in ((0, "NVIDIA H100 80GB HBM3"), (1, None)):
        f = tmp_path / "r" / f"vanilla__mrpc__seed{seed}.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "device": "cuda" if name else "cpu",
                                 "device_name": name}))
    s = ablate.summarize(ablate.load_records(tmp_path / "r"))
    assert s["devices"] == {"NVIDIA H100 80GB HBM3": 1, "cpu": 1}
    assert "**Warning: the records come from different devices** (NVIDIA H100 80GB HBM3: 1 runs, cpu: 1 runs)" in (
        ablate.render_markdown(s))


def test_summary_arithmetic_anchor_and_verdict(tmp_path):
    scores = {
        "vanilla": {"rte": [60, 62, 64], "mrpc": [80, 81, 82], "stsb": [84, 85, 86], "cola": [20, 25, 30]},
        "all": {"rte": [64, 66, 68], "mrpc": [82, 83, 84], "stsb": [83, 83.5, 84], "cola": [25, 26, 27]},
    }
    _write_records(tmp_path / "r", scores)
    s = ablate.summarize(ablate.load_records(tmp_path / "r"))
    assert s["tasks"] == ["cola", "mrpc", "stsb", "rte"] and s["seeds"] == [0, 1, 2]
    assert s["cells"]["vanilla"]["rte"]["mean"] == 62 and s["cells"]["vanilla"]["rte"]["std"] == pytest.approx(2)
    assert s["cells"]["vanilla"]["cola"]["median"] == 25
    assert s["avg"]["vanilla"] == pytest.approx((62 + 81 + 85 + 25) / 4)
    assert s["avg"]["all"] == pytest.approx((66 + 83 + 83.5 + 26) / 4)
    assert s["delta_vs_vanilla"]["all"] == pytest.approx(s["avg"]["all"] - s["avg"]["vanilla"])
    # STS-B: -1.5 vs vanilla's std 1.0 -> flagged; CoLA: +1; none other is below
    assert s["worse_than_vanilla_std"]["all"] == ["stsb"]
    assert s["wall"]["all"]["vs_vanilla"] == pytest.approx(3.0)
    anchor = s["anchor"]
    assert anchor["avg"] == pytest.approx(56.3) and anchor["tasks"] == ["cola", "mrpc", "stsb", "rte"]
    assert anchor["delta"]["all"] == pytest.approx(s["avg"]["all"] - 56.3)
    verdict = "\n".join(ablate.verdict_lines(s))
    assert f"all vs vanilla: {s['delta_vs_vanilla']['all']:+.2f} points" in verdict
    assert f"all vs anchor: {s['avg']['all'] - 56.3:+.2f} points" in verdict
    assert "worse than vanilla by more than vanilla's seed std: stsb (-1.50, std 1.00)" in verdict
    # paired per seed (task averages): all - vanilla = 63.5 - 61, 64.625 - 63.25, 65.75 - 65.5 = 2.5, 1.375, 0.25;
    # mean 1.375, sd 1.125, t(0.95, 2) = 2.919986: lower bound 1.375 - 2.919986 * 1.125 / sqrt(3) = -0.5216
    p = s["paired_vs_vanilla"]["all"]
    assert p["per_seed"] == {"0": 2.5, "1": 1.375, "2": 0.25} and p["mean"] == pytest.approx(1.375)
    assert p["sd"] == pytest.approx(1.125) and p["lower_95"] == pytest.approx(-0.5216, abs=1e-4)
    assert "paired over seeds 0, 1, 2: one-sided 95% lower bound -0.52" in verdict
    line = json.loads(ablate.summary_line(s))
    assert line == {"tasks": ["cola", "mrpc", "stsb", "rte"], "seeds": 3, "seed_list": [0, 1, 2],
                    "avg": {"vanilla": round(s["avg"]["vanilla"], 2), "all": round(s["avg"]["all"], 2)},
                    "paired": {"all": {"per_seed": {"0": 2.5, "1": 1.38, "2": 0.25}, "mean": 1.38,
                                       "lower_95": -0.52}}, "plan_sha256": None}
    # another model: no anchor; a combo missing a task has no average
    del scores["all"]["cola"]
    _write_records(tmp_path / "q", scores, model="runs/pt/discriminator", anchor=None)
    s2 = ablate.summarize(ablate.load_records(tmp_path / "q"))
    assert s2["anchor"] is None and s2["avg"]["all"] is None
    assert json.loads(ablate.summary_line(s2))["avg"]["all"] is None
    assert "anchor" not in "\n".join(ablate.verdict_lines(s2))


def test_partial_sweep_deltas_pair_seeds(tmp_path):
    """A trick run on seed 0 only is compared with vanilla's seed 0, not with vanilla's 3-seed mean."""
    scores = {"vanilla": {"cola": [32, 24, 26]}, "adv": {"cola": [30]}}
    _write_records(tmp_path / "r", scores)
    s = ablate.summarize(ablate.load_records(tmp_path / "r"))
    assert s["task_delta_vs_vanilla"]["adv"] == {"cola": pytest.approx(-2.0)}  # unpaired it would read +3.33
    assert s["task_delta_seeds"]["adv"] == {"cola": 1} and s["delta_vs_vanilla"]["adv"] == pytest.approx(-2.0)
    assert "| adv | -2.00 [1] |" in ablate.render_markdown(s)
    # the verdict's regression line uses the same paired change as the table (unpaired: -5.33)
    _write_records(tmp_path / "a", {"vanilla": {"cola": [32, 24, 26]}, "all": {"cola": [22]}})
    s = ablate.summarize(ablate.load_records(tmp_path / "a"))
    assert "tasks worse than vanilla by more than vanilla's seed std: cola (-10.00 [1], std " in "\n".join(
        ablate.verdict_lines(s))
    from vegalm.cli import main  # --summary --out writes the report files from the records alone

    assert main(["ablate", "--summary", str(tmp_path / "a"), "--out", str(tmp_path / "rep")]) == 0
    assert sorted(f.name for f in (tmp_path / "rep").iterdir()) == ["ablation.json", "ablation.md", "ablation.png"]
    assert "| all | -10.00* [1] |" in (tmp_path / "rep" / "ablation.md").read_text()


def test_cli_errors_are_one_line(tiny_dir, tmp_path, capsys):
    from vegalm.cli import main

    base = ["ablate", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--results-dir", str(tmp_path / "r"),
            "--tasks", "wnli"]
    (tmp_path / "empty").mkdir()
    cases = [
        ([*base, "--tricks", "vanilla,bogus"], "unknown combo 'bogus' (valid: vanilla, transductive, all"),
        ([*base, "tricks=adv"], "tricks: set by the ablation"),
        ([*base, "--tricks", "vanilla,adv", "trick_args.selfcal.alpha_T=0.5"], "trick_args.selfcal"),
        ([*base, "lrr=1"], "unknown key lrr"),
        ([*base, "--tricks", "adv", "trick_args.adv.params.vat_lamda=1"], "vat_lamda"),
        ([*base, "--pseudo-fraction", "0"], "pseudo-fraction"),
        ([*base, "--tricks", "vanilla,tapt"], "needs the RTD generator"),
        (["ablate", "--tasks", "wnli"], "--model: required"),
        (["ablate", "--summary", str(tmp_path / "empty")], "no ablation records"),
        (["ablate", "--summary", str(tmp_path / "empty"), "--model", "x"], "--summary reads the JSON records only"),
        (["ablate", "--summary", str(tmp_path / "empty"), "--out", str(tmp_path / "empty")], "outside the records"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()  # nothing ran


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is gone


@pytest.mark.slow
def test_sigterm_to_a_parallel_sweep_stops_its_workers_too(tiny_dir, tmp_path):
    """`vegalm ablate --jobs 2` SIGTERMed, the parent only (as a scheduler would): it forwards the signal, both
    fine-tuning workers stop at a step boundary with a checkpoint, and it exits 143 with one line. Before
    workers.supervised_pool the parent died at once and left both workers training as orphans."""
    from vegalm.train.checkpoint import latest_checkpoint

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vegalm.cli", "ablate", "--model", str(tiny_dir), "--tasks", "rte", "--seeds", "2",
           "--tricks", "vanilla", "--jobs", "2", "--out", str(out), "--results-dir", str(tmp_path / "results"),
           "--model-tag", "tiny", "max_steps=100000", "batch_size=4", "train.log_every=1", "checkpoint_every=5",
           "eval_test=false", "progress=false", f"glue_dir={GLUE_DIR}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "ablate.log"
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    metrics = [out / "vanilla" / "rte" / f"seed{s}" / "metrics.jsonl" for s in (0, 1)]
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if all(m.is_file() and len(m.read_text().splitlines()) >= 6 for m in metrics):  # both past a checkpoint
            break
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert proc.poll() is None and len(workers) >= 2, log.read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=180)
    text = log.read_text()
    assert rc == 143 and "Traceback" not in text, text[-3000:]
    assert [ln for ln in text.splitlines() if ln.startswith("interrupted")] == [str(WorkersInterrupted(15))], text
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], "workers outlived the sweep"
    for s in (0, 1):
        assert latest_checkpoint(out / "vanilla" / "rte" / f"seed{s}" / "checkpoints") is not None, s


def _plan_file(sweep, path: Path, **change) -> Path:
    """The fixture sweep written as a plan file (what `--plan` reads), with `change` applied."""
    import yaml

    from vegalm.config import parse_override

    settings = {}
    for item in SETTINGS:
        (*parents, leaf), value = parse_override(item)  # the value as key=value would give it
        node = settings
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    plan = {"model": str(sweep["argv"][sweep["argv"].index("--model") + 1]), "tasks": ["wnli", "stsb"],
            "seeds": [0], "tricks": COMBOS, "results_dir": "results", "model_tag": "tiny", "device": "cpu",
            "settings": settings, "about": {"question": "does the plan reproduce the fixture's runs?"}, **change}
    path.write_text(yaml.safe_dump(plan))
    return path


def test_a_plan_file_runs_its_sweep_and_stamps_every_record(sweep, tmp_path, monkeypatch):
    """--plan: the same runs as the fixture's flags (cache hits, nothing trained), each record carrying the file's
    name and sha256, the report and the JSON line naming the plan; flags the plan fixes, unknown plan keys and
    another device are refused."""
    import hashlib

    shutil.copytree(sweep["out"], tmp_path / "out")
    plan = _plan_file(sweep, tmp_path / "PREREGISTERED.yaml")
    digest = hashlib.sha256(plan.read_bytes()).hexdigest()
    monkeypatch.setattr("vegalm.train.trainer.Trainer.train", lambda *a, **k: pytest.fail("a planned rerun trained"))
    rc, stdout = _main(["ablate", "--plan", str(plan), "--out", str(tmp_path / "out")])
    assert rc == 0 and stdout.startswith("trained 0 run(s)")
    records = sorted((tmp_path / "results" / "tiny").glob("*.json"))  # results_dir is relative to the plan file
    assert len(records) == len(COMBOS) * 2
    for f in records:
        rec = json.loads(f.read_text())
        assert rec["plan"] == {"file": "PREREGISTERED.yaml", "sha256": digest}
        assert rec["dev_score"] == _record(sweep, rec["combo"], rec["task"])["dev_score"]
    rc, stdout = _main(["ablate", "--summary", str(tmp_path / "results" / "tiny")])
    assert f"every record comes from the plan PREREGISTERED.yaml {digest}" in stdout
    assert json.loads(stdout.strip().splitlines()[-1])["plan_sha256"] == digest
    shutil.copy(sweep["records"] / "vanilla__wnli__seed0.json", tmp_path / "results" / "tiny")  # one made without
    rc, stdout = _main(["ablate", "--summary", str(tmp_path / "results" / "tiny")])
    assert "do not all come from one plan" in stdout and json.loads(stdout.strip().splitlines()[-1])["plan_sha256"] is None

    for extra, want in ((["--tasks", "rte"], "--tasks: fixed by --plan"), (["lr=1e-3"], "key=value settings: fixed by"),
                        (["--model", "minilm-l6"], "--model: fixed by --plan")):
        with pytest.raises(ConfigError, match=want):
            from vegalm.cli import main

            main(["ablate", "--plan", str(plan), "--out", str(tmp_path / "o2"), *extra, "--debug"])
    bad = _plan_file(sweep, tmp_path / "bad.yaml", seed=[3])
    with pytest.raises(ConfigError, match="seed"):
        main(["ablate", "--plan", str(bad), "--out", str(tmp_path / "o2"), "--debug"])
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(ConfigError, match="device: the plan runs on cpu, this machine on cuda"):
        main(["ablate", "--plan", str(plan), "--out", str(tmp_path / "o2"), "--debug"])


def test_the_documented_plan_example_loads(tmp_path):
    """docs/ablation.md's plan file, as a user would copy it, is a valid plan."""
    import re

    from vegalm.experiments.ablate.plan import load_plan

    doc = (Path(__file__).resolve().parents[1] / "docs" / "ablation.md").read_text(encoding="utf-8")
    (tmp_path / "PREREGISTERED.yaml").write_text(re.search(r"```yaml\n(.*?)```", doc, re.S).group(1))
    plan = load_plan(tmp_path / "PREREGISTERED.yaml")
    assert plan.kwargs["seeds"] == [3, 4, 5] and plan.kwargs["results_dir"] == tmp_path
    assert plan.kwargs["mixed_precision"] == "bf16" and plan.kwargs["lr"] == 1e-4 and len(plan.sha256) == 64


def test_cli_defaults_are_the_librarys():
    """`vegalm ablate`'s defaults are written out in experiments/cli.py (its --help imports no torch): they must be
    the constants the library uses."""
    from vegalm.experiments.ablate.combos import DEFAULT_COMBOS
    from vegalm.experiments.cli import ABLATE_DEFAULTS
    from vegalm.finetune.stages.self_training import PSEUDO_FRACTION

    assert ABLATE_DEFAULTS["tricks"] == DEFAULT_COMBOS and ABLATE_DEFAULTS["pseudo_fraction"] == PSEUDO_FRACTION


def test_plan_model_paths_are_relative_to_the_file(tmp_path):
    from vegalm.experiments.ablate.plan import load_plan

    (tmp_path / "models" / "enc").mkdir(parents=True)
    for model, want in (("models/enc", str(tmp_path / "models" / "enc")), ("minilm-l6", "minilm-l6"),
                        ("microsoft/deberta-v3-small", "microsoft/deberta-v3-small")):
        (tmp_path / "p.yaml").write_text(f"model: {model}\nseeds: [3]\nmodel_tag: t\n")
        assert load_plan(tmp_path / "p.yaml").kwargs["model"] == want
    (tmp_path / "p.yaml").write_text("model: minilm-l6\nmodel_tag: t\n")
    with pytest.raises(ConfigError, match="seeds: required"):
        load_plan(tmp_path / "p.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the committed plan runs on the CPU")
def test_the_committed_preregistration_validates_every_run(tmp_path, capsys):
    """results/ablation/PREREGISTERED.yaml (issue 17's frozen sweep) still loads and every one of its runs passes
    validation: a code change that broke it would stop the sweep mid-way. --cached-only trains nothing."""
    from vegalm.cli import main
    from vegalm.experiments.ablate.plan import load_plan

    committed = Path(__file__).resolve().parents[1] / "results" / "ablation" / "PREREGISTERED.yaml"
    plan = load_plan(committed)
    assert plan.kwargs["seeds"] == [3, 4, 5] and plan.plan.device == "cpu"
    assert main(["ablate", "--plan", str(committed), "--out", str(tmp_path / "o"), "--cached-only"]) == 2
    err = capsys.readouterr().err
    assert f"none of the {3 * 4 * 6} runs is cached" in err, err[-2000:]
