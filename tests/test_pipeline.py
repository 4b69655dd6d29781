"""The main job end to end: `vegalm run --recipe recipes/smoke.yaml --out DIR`, run twice as a user would.

The first run trains the tokenizer, RTD (+ SimCSE) and the MLM baseline, fine-tunes both on RTE and STS-B and
writes the report; every artefact is then opened and checked (transformers loads the exported model with no
missing or unexpected keys, the submission zip has the 11 leaderboard files, the PNGs decode). The first run
takes the default --jobs (2 on 2+ cores: worker processes, side by side); the second, identical but with
--jobs 1 (in turn, in-process), must skip every finished stage: no checkpoint, segment store, tokenizer or
fine-tuning result is rewritten.

Marked slow: the first run takes 3.5-4.5 minutes on 2 shared CPU cores (measured), over the 2-minute budget of
the fast suite.

    .venv/bin/python -m pytest tests/test_pipeline.py -q -m slow
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from _data import CORPUS_DIR, GLUE_DIR, needs

pytestmark = [pytest.mark.slow, needs(CORPUS_DIR, GLUE_DIR)]

REPO = Path(__file__).resolve().parents[1]
SUBMISSION = ["AX.tsv", "CoLA.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "MRPC.tsv", "QNLI.tsv", "QQP.tsv", "RTE.tsv",
              "SST-2.tsv", "STS-B.tsv", "WNLI.tsv"]
TASKS = ["rte", "stsb"]  # recipes/smoke.yaml glue.tasks
MODELS = {"rtd": "discriminator", "mlm": "encoder"}


def vegalm_run(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vegalm.cli", "run", "--recipe", "recipes/smoke.yaml",
                           "--out", str(out), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=1500)
    return proc, time.perf_counter() - t0


def frozen_files(out: Path) -> list[Path]:
    """Outputs of finished stages that a re-run must leave alone (it rewrites only the summaries and report).
    The exported models count: a rewritten export would cost time (fine-tuning caches key on its content)."""
    files = [out / "tokenizer" / "tokenizer.json", out / "data" / "meta.json", out / "data" / "input_ids.npy"]
    for name, folder in MODELS.items():
        files += [out / name / folder / "config.json", out / name / folder / "model.safetensors"]
        files += sorted((out / name).glob("phase*/checkpoints/step-*/*"))
        files += sorted((out / name).glob("phase*/done.json")) + sorted((out / name).glob("phase*/metrics.jsonl"))
        for task in TASKS:
            run = out / "glue" / name / task / "seed0"
            files += [run / "results.json", run / "dev_predictions.tsv", run / "test_predictions.tsv"]
    return files


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    first, t_first = vegalm_run(out)  # --jobs 2 on 2+ cores: both pretrainings side by side, in workers
    assert first.returncode == 0, first.stderr[-4000:]
    frozen = frozen_files(out)
    assert all(f.is_file() for f in frozen), [str(f) for f in frozen if not f.is_file()]
    stamps = {f: f.stat().st_mtime_ns for f in frozen}
    weights = (out / "rtd" / "discriminator" / "model.safetensors").read_bytes()
    second, t_second = vegalm_run(out, "--jobs", "1")  # in turn, in-process: must find the same finished stages
    assert second.returncode == 0, second.stderr[-4000:]
    print(f"first run {t_first:.0f} s, second run {t_second:.0f} s")
    return {"out": out, "first": first, "second": second, "t": (t_first, t_second), "stamps": stamps,
            "weights": weights}


def test_hf_loadable_models(runs):
    import torch
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    out = runs["out"]
    for name, folder, cls in [("rtd", "discriminator", AutoModel), ("rtd", "generator", AutoModelForMaskedLM),
                              ("mlm", "encoder", AutoModelForMaskedLM)]:
        path = out / name / folder
        model, info = cls.from_pretrained(str(path), output_loading_info=True)
        assert model.config.model_type == "deberta-v2"
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            assert not info.get(key), f"{path}: {key} = {info[key]}"
        tok = AutoTokenizer.from_pretrained(str(path))
        enc = tok(["Replaced token detection."], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
        assert hidden.shape[-1] == model.config.hidden_size and torch.isfinite(hidden).all()
    summary = json.loads((out / "rtd" / "summary.json").read_text())
    assert Path(summary["model_path"]) == out / "rtd" / "discriminator"
    assert set(summary["phases"]) == {"phase1", "phase2"}


def test_glue_results(runs):
    out = runs["out"]
    for name in MODELS:
        res = json.loads((out / "glue" / name / "results.json").read_text())
        assert sorted(res["per_task"]) == TASKS and res["seeds"] == [0]
        assert isinstance(res["glue"]["median"]["score"], float)
        for task in TASKS:
            run = json.loads((out / "glue" / name / task / "seed0" / "results.json").read_text())
            assert run["task"] == task and isinstance(run["dev_score"], float)
            assert run["dev_score"] == res["per_task"][task]["best_score"]
        assert (out / "glue" / name / "results.md").is_file()


def test_submission_zip(runs):
    for name in MODELS:
        with zipfile.ZipFile(runs["out"] / "glue" / name / "submission.zip") as z:
            assert sorted(z.namelist()) == SUBMISSION
            tables = {}
            for member in z.namelist():
                text = z.read(member).decode("utf-8")
                assert text.split("\n", 1)[0] == "index\tprediction", member
                rows = list(csv.reader(io.StringIO(text), delimiter="\t"))[1:]
                assert rows and all(len(r) == 2 for r in rows), member
                tables[member] = rows
        assert len(tables["RTE.tsv"]) == 3000 and {p for _, p in tables["RTE.tsv"]} <= {"entailment", "not_entailment"}
        assert len(tables["STS-B.tsv"]) == 1379
        assert all(0.0 <= float(p) <= 5.0 for _, p in tables["STS-B.tsv"])
        assert [int(i) for i, _ in tables["RTE.tsv"]] == list(range(3000))


def test_report(runs):
    from matplotlib.image import imread

    out = runs["out"]
    md = (out / "report.md").read_text(encoding="utf-8")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "## GLUE dev (local tasks)" in md and "| model | rte | stsb | average |" in md
    assert "<h2>GLUE dev (local tasks)</h2>" in page and "<th>rte</th><th>stsb</th><th>average</th>" in page
    for name in MODELS:
        assert f"| {name} | " in md and f"<td>{name}</td>" in page
    comparison = "the MLM-only baseline at equal pretraining compute"
    assert "RTD + SimCSE " in md and comparison in md and comparison in page
    for key in ("mlm_loss", "rtd_loss", "cl_loss"):
        png = out / f"curve_{key}.png"
        image = imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, png
        assert f"![curve_{key}.png](curve_{key}.png)" in md and f'<img src="curve_{key}.png"' in page
    assert imread(out / "glue" / "rtd" / "results.png").ndim == 3


def test_second_run_skips_finished_stages(runs):
    out = runs["out"]
    changed = [str(f.relative_to(out)) for f, ns in runs["stamps"].items() if f.stat().st_mtime_ns != ns]
    assert changed == [], f"rewritten by the second run: {changed}"
    err = runs["second"].stderr
    assert err.count("phase1: complete (step ") == 2 and "phase2: complete (step 6), skipped" in err
    assert err.count("is complete, skipped") == 2  # the exports were not rewritten either
    assert "starting from scratch" not in err and "training a" not in err
    assert (out / "rtd" / "discriminator" / "model.safetensors").read_bytes() == runs["weights"]
    t_first, t_second = runs["t"]
    # Relative, same machine, minutes apart: the re-run only loads, re-exports and re-reports.
    assert t_second < 0.5 * t_first, runs["t"]
