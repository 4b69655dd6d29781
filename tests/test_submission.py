"""GLUE leaderboard zip: files, headers, label strings, STS-B clipping, placeholders, validation."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import pytest

from vegalm.experiments.submission import SUBMISSION_STEMS, SubmissionError, read_submission, write_submission
from _data import GLUE_DIR, needs_glue

ELEVEN = {"CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv", "MNLI-mm.tsv",
          "QNLI.tsv", "RTE.tsv", "WNLI.tsv", "AX.tsv"}
MNLI_FRONT = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["\t".join(header)] + ["\t".join(r) for r in rows]) + "\n", encoding="utf-8")


def mnli(i: int, *labels: str) -> list[str]:
    return [str(i), "1", f"{i}n", "slate", "( a )", "( b )", "(ROOT a)", "(ROOT b)", f"p{i}", f"h{i}", *labels]


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    """A GLUE dir with a few official-layout files; everything else is absent."""
    g = tmp_path / "glue"
    pair = ["index", "sentence1", "sentence2"]
    write_tsv(g / "RTE" / "train.tsv", pair + ["label"],
              [["0", "a", "b", "not_entailment"], ["1", "c", "d", "entailment"], ["2", "e", "f", "not_entailment"]])
    write_tsv(g / "RTE" / "test.tsv", pair, [["0", "a", "b"], ["1", "c", "d"], ["2", "e", "f"]])
    sts = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    write_tsv(g / "STS-B" / "train.tsv", sts + ["score"],
              [[str(i), "main-news", "f", "2012", "0", "none", "none", "a", "b", s] for i, s in
               enumerate(["1.000", "2.000", "3.600"])])
    write_tsv(g / "STS-B" / "test.tsv", sts, [[str(i), "g", "f", "y", "0", "n", "n", "a", "b"] for i in range(4)])
    write_tsv(g / "MNLI" / "train.tsv", MNLI_FRONT + ["label1", "gold_label"],
              [mnli(0, "neutral", "neutral"), mnli(1, "entailment", "entailment"), mnli(2, "neutral", "neutral")])
    write_tsv(g / "MNLI" / "test_matched.tsv", MNLI_FRONT, [mnli(i) for i in range(3)])
    write_tsv(g / "CoLA" / "test.tsv", ["index", "sentence"], [["0", "x"], ["1", "y"]])
    return g


def test_zip_contents_and_placeholders(tiny, tmp_path):
    out = tmp_path / "out" / "submission.zip"
    preds = {
        "STS-B": ([3, 1, 0, 2], [5.7, -0.3, 2.34567, 4.0]),
        "MNLI-m": ([0, 1, 2], [0, 1, 2]),
        "AX": (list(range(1104)), ["neutral"] * 1103 + [1]),  # label strings are accepted too
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = write_submission(preds, out, tiny)
    with zipfile.ZipFile(out) as zf:
        assert set(zf.namelist()) == ELEVEN and len(zf.namelist()) == 11
        for name in zf.namelist():
            assert zf.read(name).decode().split("\n", 1)[0] == "index\tprediction"
    assert [p.name for p in out.parent.iterdir()] == ["submission.zip"]  # no temp file left
    sub = read_submission(out)
    assert sub["STS-B"] == [(0, "2.346"), (1, "0.000"), (2, "4.000"), (3, "5.000")]  # clipped, 3 decimals
    assert sub["MNLI-m"] == [(0, "contradiction"), (1, "entailment"), (2, "neutral")]
    assert sub["AX"][-1] == (1103, "entailment") and len(sub["AX"]) == 1104
    # Placeholders: real test indices where a test file exists, canonical sizes otherwise.
    assert sub["RTE"] == [(0, "not_entailment"), (1, "not_entailment"), (2, "not_entailment")]  # train majority
    assert sub["CoLA"] == [(0, "0"), (1, "0")]  # no train file -> first label
    assert len(sub["MNLI-mm"]) == 9847 and {p for _, p in sub["MNLI-mm"]} == {"neutral"}  # MNLI train majority
    assert [i for i, _ in sub["QQP"]] == list(range(390965)) and sub["QQP"][0] == (0, "0")
    sizes = {"SST-2": 1821, "MRPC": 1725, "QNLI": 5463, "WNLI": 146}
    assert {k: len(sub[k]) for k in sizes} == sizes
    assert {p for _, p in sub["QNLI"]} == {"entailment"}
    assert manifest == {
        "CoLA.tsv": "placeholder:majority", "SST-2.tsv": "placeholder:canonical-size",
        "MRPC.tsv": "placeholder:canonical-size", "STS-B.tsv": "model", "QQP.tsv": "placeholder:canonical-size",
        "MNLI-m.tsv": "model", "MNLI-mm.tsv": "placeholder:canonical-size",
        "QNLI.tsv": "placeholder:canonical-size", "RTE.tsv": "placeholder:majority",
        "WNLI.tsv": "placeholder:canonical-size", "AX.tsv": "model",
    }
    warned = " ".join(str(w.message) for w in caught)
    placeholders = [f for f, how in manifest.items() if how != "model"]
    assert len(caught) == len(placeholders) and all(f in warned for f in placeholders)
    assert "STS-B.tsv" not in warned


def _messages(fn) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return "\n".join(str(w.message) for w in caught)


def test_stsb_placeholder_uses_train_mean(tiny, tmp_path):
    out = tmp_path / "s.zip"
    text = _messages(lambda: write_submission({}, out, tiny))
    assert "STS-B.tsv: placeholder, not a model: predicts 2.200 (mean score of the train file)" in text
    assert {p for _, p in read_submission(out)["STS-B"]} == {"2.200"}
    text = _messages(lambda: write_submission({}, out, tmp_path / "nothing"))  # overwrites the previous zip
    assert "STS-B.tsv: placeholder, not a model: predicts 2.500 (no train file: middle of the 0-5 scale)" in text
    assert read_submission(out)["STS-B"][0] == (0, "2.500")


def test_validation_errors(tiny, tmp_path):
    out = tmp_path / "bad.zip"
    cases = [
        ({"RTE": ([0, 1], [0, 1])}, r"RTE\.tsv: 2 predictions do not match the 3 test rows"),
        ({"RTE": ([0, 1, 5], [0, 1, 1])}, r"RTE\.tsv: .*first unknown index: 5"),
        ({"QQP": ([0, 1], [0, 1])}, r"QQP\.tsv: 2 predictions, but the test split has 390965 rows"),
        ({"RTE": ([0, 1, 2], [0, 1, 2])}, r"RTE\.tsv: label id 2 out of range 0\.\.1"),
        ({"RTE": ([0, 1, 2], [0, 1, "maybe"])}, r"RTE\.tsv: unknown label 'maybe'"),
        ({"RTE": ([0, 1, 1], [0, 1, 1])}, r"RTE\.tsv: index 1 appears more than once"),
        ({"RTE": ([0, 1, 2], [0, 1])}, r"RTE\.tsv: 3 indices but 2 predictions"),
        ({"STS-B": ([0, 1, 2, 3], [1.0, float("nan"), 1.0, 1.0])}, r"STS-B\.tsv: prediction is NaN"),
        ({"MNLI": ([0], [0])}, r"unknown submission file 'MNLI'"),
    ]
    for preds, pattern in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(SubmissionError, match=pattern):
                write_submission(preds, out, tiny)
    assert list(tmp_path.glob("*.zip")) == [] and list(tmp_path.glob(".*tmp")) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_submission({"QQP": ([0, 1], [0, 1])}, out, tiny, check_sizes=False)
    assert read_submission(out)["QQP"] == [(0, "0"), (1, "1")]


@needs_glue
def test_real_glue_dir(tmp_path):
    preds = {"RTE": (list(range(3000)), [i % 2 for i in range(3000)])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = write_submission(preds, tmp_path / "s.zip", GLUE_DIR)
    sub = read_submission(tmp_path / "s.zip")
    assert list(sub) == list(SUBMISSION_STEMS)
    assert manifest["RTE.tsv"] == "model" and sub["RTE"][:2] == [(0, "entailment"), (1, "not_entailment")]
    assert manifest["QNLI.tsv"] == "placeholder:majority" and len(sub["QNLI"]) == 5463  # test file, no train
    assert manifest["QQP.tsv"] == manifest["AX.tsv"] == "placeholder:canonical-size"
    assert {p for _, p in sub["SST-2"]} == {"1"} and len(sub["SST-2"]) == 1821  # 37569 of 67349 train are "1"
    assert {p for _, p in sub["STS-B"]} == {"2.701"}
