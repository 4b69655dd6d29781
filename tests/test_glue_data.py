"""GLUE loaders: real files from ../shared/data/glue, synthetic files in the exact official layouts, errors."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from vegalm.data import glue
from vegalm.data.glue import (
    TASKS,
    Example,
    GlueFormatError,
    available_splits,
    default_glue_dir,
    examples_from_hub,
    load_split,
    load_split_hub,
    load_task,
)
from vegalm.errors import VegaError
from _data import GLUE_DIR, needs_glue


# Row counts from shared/data/README.md (the canonical GLUE sizes).
REAL_COUNTS = {
    ("cola", "train"): 8551, ("cola", "dev"): 1043, ("cola", "test"): 1063,
    ("sst2", "train"): 67349, ("sst2", "dev"): 872, ("sst2", "test"): 1821,
    ("mrpc", "train"): 3668, ("mrpc", "dev"): 408, ("mrpc", "test"): 1725,
    ("stsb", "train"): 5749, ("stsb", "dev"): 1500, ("stsb", "test"): 1379,
    ("qnli", "dev"): 5463, ("qnli", "test"): 5463,
    ("rte", "train"): 2490, ("rte", "dev"): 277, ("rte", "test"): 3000,
    ("wnli", "train"): 635, ("wnli", "dev"): 71, ("wnli", "test"): 146,
}


# ------------------------------------------------------------------------------------------ registry


def test_registry_facts():
    assert list(TASKS) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ax"]
    assert TASKS["mnli"].labels == ("contradiction", "entailment", "neutral")
    assert TASKS["ax"].labels == TASKS["mnli"].labels
    assert TASKS["rte"].labels == TASKS["qnli"].labels == ("entailment", "not_entailment")
    assert all(TASKS[t].labels == ("0", "1") for t in ("cola", "sst2", "mrpc", "qqp", "wnli"))
    assert TASKS["stsb"].is_regression and TASKS["stsb"].num_labels == 1 and TASKS["mnli"].num_labels == 3
    assert TASKS["mnli"].dev_splits == ("dev_matched", "dev_mismatched")
    assert TASKS["mnli"].test_splits == ("test_matched", "test_mismatched")
    files = [f for s in TASKS.values() for f in s.submission_files.values()]
    assert sorted(files) == sorted(
        ["CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv", "MNLI-mm.tsv",
         "QNLI.tsv", "RTE.tsv", "WNLI.tsv", "AX.tsv"]
    )
    sizes = {f: s.test_sizes[sp] for s in TASKS.values() for sp, f in s.submission_files.items()}
    assert sizes == {"CoLA.tsv": 1063, "SST-2.tsv": 1821, "MRPC.tsv": 1725, "STS-B.tsv": 1379, "QQP.tsv": 390965,
                     "MNLI-m.tsv": 9796, "MNLI-mm.tsv": 9847, "QNLI.tsv": 5463, "RTE.tsv": 3000, "WNLI.tsv": 146,
                     "AX.tsv": 1104}
    assert not TASKS["cola"].is_pair and not TASKS["sst2"].is_pair and TASKS["ax"].is_pair
    assert TASKS["ax"].dir_name == "diagnostic" and TASKS["ax"].files == {"test": "diagnostic.tsv"}
    assert TASKS["mnli"].hub_splits["dev_mismatched"] == "validation_mismatched"
    assert TASKS["rte"].hub_splits["dev"] == "validation"
    assert glue.get_task("SST-2") is TASKS["sst2"] and glue.get_task("STS-B") is TASKS["stsb"]
    with pytest.raises(VegaError, match="unknown GLUE task 'foo'"):
        glue.get_task("foo")


# ------------------------------------------------------------------------------------------ real data


@needs_glue
@pytest.mark.parametrize(("task", "split"), sorted(REAL_COUNTS))
def test_real_counts(task, split):
    examples = load_split(task, split, GLUE_DIR)
    assert len(examples) == REAL_COUNTS[(task, split)]
    spec = TASKS[task]
    assert all((ex.text_b is not None) == spec.is_pair for ex in examples)
    if split == "test":
        assert all(ex.label is None for ex in examples)
        assert [ex.index for ex in examples] == list(range(len(examples)))
    else:
        assert all(ex.label is not None for ex in examples)
    assert examples[3].guid == f"{task}-{split}-3"


@needs_glue
def test_real_contents():
    cola = load_split("cola", "dev", GLUE_DIR)  # headerless; label column 2 (counts from `cut -f2 | uniq -c`)
    assert Counter(ex.label for ex in cola) == {1: 721, 0: 322}
    assert cola[0].text_a == "The sailors rode the breeze clear of the rocks."
    rte = load_split("rte", "dev", GLUE_DIR)
    assert Counter(rte[i].label for i in range(len(rte))) == {0: 146, 1: 131}  # entailment=0
    assert rte[0].label == 1 and rte[0].text_b == "Christopher Reeve had an accident."
    mrpc = load_split("mrpc", "train", GLUE_DIR)  # BOM before "Quality" must not hide the label column
    assert Counter(ex.label for ex in mrpc) == {1: 2474, 0: 1194}
    # An unbalanced '"' in real MRPC text is a literal character, and the row keeps its 5 fields.
    dev = load_split("mrpc", "dev", GLUE_DIR)
    assert dev[0].text_b == '"The foodservice pie business does not fit our long-term growth strategy.'
    assert dev[1].text_a.startswith("Magnarelli said")
    stsb = load_split("stsb", "train", GLUE_DIR)
    assert stsb[0].label == 5.0 and stsb[1].label == pytest.approx(3.8)
    assert sum(ex.label for ex in stsb) / len(stsb) == pytest.approx(2.701, abs=1e-3)
    sst = load_split("sst2", "train", GLUE_DIR)
    assert Counter(ex.label for ex in sst) == {1: 37569, 0: 29780}
    assert sst[0].text_a == "hide new secretions from the parental units "
    qnli = load_split("qnli", "dev", GLUE_DIR)
    assert Counter(ex.label for ex in qnli) == {0: 2702, 1: 2761}


@needs_glue
def test_real_load_task_and_available():
    assert available_splits("qnli", GLUE_DIR) == ["dev", "test"]
    assert available_splits("mnli", GLUE_DIR) == []
    splits = load_task("rte", GLUE_DIR)
    assert {k: len(v) for k, v in splits.items()} == {"train": 2490, "dev": 277, "test": 3000}
    with pytest.raises(GlueFormatError, match=r"MNLI: no GLUE files for mnli"):
        load_task("mnli", GLUE_DIR)


# ------------------------------------------------------------------------------------------ synthetic files
# Headers below are the official GLUE ones. Sources: the MNLI/QQP samples quoted in a public GLUE survey
# post (repo file "Datasets for Text Generation", dev_matched header with label1..label5), fastNLP's
# MNLILoader docstring (train header with label1 only), the transformers/BERT processors (QQP test
# `id question1 question2`, MNLI test = the first ten columns, AX read from diagnostic/diagnostic.tsv with
# `index sentence1 sentence2`), and the nyu-mll/glue dataset card for sizes and Hub label names.

MNLI_FRONT = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
MNLI_TRAIN = MNLI_FRONT + ["label1", "gold_label"]
MNLI_DEV = MNLI_FRONT + ["label1", "label2", "label3", "label4", "label5", "gold_label"]
QQP_LABELED = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
QQP_TEST = ["id", "question1", "question2"]


def write_tsv(path: Path, header: list[str] | None, rows: list[list[str]], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def mnli_row(i: int, s1: str, s2: str, labels: list[str]) -> list[str]:
    return [str(i), str(1000 + i), f"{1000 + i}e", "fiction", "( ( a b ) c )", "( d e )",
            "(ROOT (S (NP a)))", "(ROOT (S (NP d)))", s1, s2, *labels]


@pytest.fixture()
def synth(tmp_path: Path) -> Path:
    m = tmp_path / "MNLI"
    write_tsv(m / "train.tsv", MNLI_TRAIN, [
        mnli_row(0, 'He said "no.', "He refused.", ["entailment", "entailment"]),
        mnli_row(1, '"Quoted start', "Something.", ["neutral", "neutral"]),
        mnli_row(2, "The cat sat.", "No cat sat.", ["contradiction", "contradiction"]),
    ])
    for split, n in (("dev_matched", 2), ("dev_mismatched", 3)):
        write_tsv(m / f"{split}.tsv", MNLI_DEV, [
            mnli_row(i, f"p{i}", f"h{i}", ["neutral", "entailment", "neutral", "neutral", "neutral", "neutral"])
            for i in range(n)
        ])
    write_tsv(m / "test_matched.tsv", MNLI_FRONT, [mnli_row(i, f"p{i}", f"h{i}", []) for i in range(4)])
    write_tsv(m / "test_mismatched.tsv", MNLI_FRONT, [mnli_row(i, f"p{i}", f"h{i}", []) for i in (7, 8)])
    q = tmp_path / "QQP"
    write_tsv(q / "train.tsv", QQP_LABELED, [
        ["201359", "303345", "303346", 'What does "fine" mean?', "Define fine?", "1"],
        ["15329", "29298", "29299", '"Why are people so obsessed?', "How can a male have a child?", "0"],
    ])
    write_tsv(q / "dev.tsv", QQP_LABELED, [["5", "10", "11", "a?", "b?", "0"]])
    write_tsv(q / "test.tsv", QQP_TEST, [["0", 'Is "x" y?', "z?"], ["1", "p?", "q?"], ["2", "r?", "s?"]])
    write_tsv(tmp_path / "QNLI" / "train.tsv", ["index", "question", "sentence", "label"],
              [["0", "Who?", "Him.", "entailment"], ["1", "Where?", "Then.", "not_entailment"]])
    write_tsv(tmp_path / "diagnostic" / "diagnostic.tsv", ["index", "sentence1", "sentence2"],
              [["0", "The cat sat.", "A cat sat."], ["1", "x", "y"]])
    return tmp_path


def test_synthetic_mnli(synth):
    assert available_splits("mnli", synth) == list(TASKS["mnli"].files)
    splits = load_task("mnli", synth)
    assert {k: len(v) for k, v in splits.items()} == {
        "train": 3, "dev_matched": 2, "dev_mismatched": 3, "test_matched": 4, "test_mismatched": 2}
    train = splits["train"]
    assert [ex.label for ex in train] == [1, 2, 0]  # entailment, neutral, contradiction
    assert train[0].text_a == 'He said "no.' and train[1].text_a == '"Quoted start'  # quotes are literal
    assert train[0].text_b == "He refused."
    assert all(ex.label == 2 for ex in splits["dev_matched"])  # gold_label (last), not label1
    assert [ex.index for ex in splits["test_mismatched"]] == [7, 8]
    assert splits["test_mismatched"][0].guid == "mnli-test_mismatched-7" and splits["test_matched"][0].label is None


def test_synthetic_qqp_qnli_ax(synth):
    train = load_split("qqp", "train", synth)
    assert [ex.label for ex in train] == [1, 0]
    assert train[0].text_a == 'What does "fine" mean?' and train[1].text_a == '"Why are people so obsessed?'
    assert train[1].text_b == "How can a male have a child?"
    test = load_split("qqp", "test", synth)
    assert [ex.index for ex in test] == [0, 1, 2] and test[0].text_a == 'Is "x" y?' and test[0].label is None
    assert load_split("qqp", "dev", synth)[0].text_b == "b?"
    qnli = load_split("qnli", "train", synth)
    assert [ex.label for ex in qnli] == [0, 1] and qnli[1].text_b == "Then."
    assert available_splits("qnli", synth) == ["train"]
    ax = load_split("ax", "test", synth)
    assert [ex.index for ex in ax] == [0, 1] and ax[0].text_b == "A cat sat." and ax[0].guid == "ax-test-0"


def test_ax_alternative_location(tmp_path):
    write_tsv(tmp_path / "AX" / "AX.tsv", ["index", "sentence1", "sentence2"], [["0", "a", "b"]])
    assert load_split("ax", "test", tmp_path)[0].text_a == "a"


def test_mrpc_bom_and_cola_headerless(tmp_path):
    write_tsv(tmp_path / "MRPC" / "dev.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
              [["0", "1", "2", "A.", "B."]], bom=True)
    assert load_split("mrpc", "dev", tmp_path)[0].label == 0
    write_tsv(tmp_path / "CoLA" / "train.tsv", None, [["gj04", "0", "*", "Bad."], ["gj04", "1", "", "Good."]])
    ex = load_split("cola", "train", tmp_path)
    assert [(e.label, e.text_a, e.text_b) for e in ex] == [(0, "Bad.", None), (1, "Good.", None)]


# ------------------------------------------------------------------------------------------ malformed input

RTE_HEADER = ["index", "sentence1", "sentence2", "label"]


def test_wrong_column_count(tmp_path):
    path = write_tsv(tmp_path / "RTE" / "dev.tsv", RTE_HEADER,
                     [["0", "a", "b", "entailment"], ["1", "a\tb", "c", "entailment"]])
    with pytest.raises(GlueFormatError) as e:
        load_split("rte", "dev", tmp_path)
    assert str(e.value).startswith(f"{path}:3: expected 4 tab-separated columns")
    assert "found 5" in str(e.value)
    write_tsv(tmp_path / "CoLA" / "dev.tsv", None, [["gj04", "1", "", "ok"], ["gj04", "1", "ok"]])
    with pytest.raises(GlueFormatError, match=r"CoLA/dev\.tsv:2: expected 4 .* found 3"):
        load_split("cola", "dev", tmp_path)


def test_unknown_label(tmp_path):
    path = write_tsv(tmp_path / "RTE" / "dev.tsv", RTE_HEADER, [["0", "a", "b", "maybe"]])
    with pytest.raises(GlueFormatError) as e:
        load_split("rte", "dev", tmp_path)
    assert str(e.value) == f"{path}:2: unknown label 'maybe' for rte (expected entailment|not_entailment)"
    write_tsv(tmp_path / "MNLI" / "train.tsv", MNLI_TRAIN, [mnli_row(0, "a", "b", ["-", "-"])])
    with pytest.raises(GlueFormatError, match=r"train\.tsv:2: unknown label '-' for mnli"):
        load_split("mnli", "train", tmp_path)
    write_tsv(tmp_path / "STS-B" / "dev.tsv", ["index", "sentence1", "sentence2", "score"], [["0", "a", "b", "hi"]])
    with pytest.raises(GlueFormatError, match=r"dev\.tsv:2: score 'hi' for stsb is not a number"):
        load_split("stsb", "dev", tmp_path)


def test_empty_and_header_only(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "dev.tsv").write_text("")
    with pytest.raises(GlueFormatError, match=r"RTE/dev\.tsv: empty file"):
        load_split("rte", "dev", tmp_path)
    write_tsv(tmp_path / "RTE" / "dev.tsv", RTE_HEADER, [])
    with pytest.raises(GlueFormatError, match=r"RTE/dev\.tsv: empty file, no examples"):
        load_split("rte", "dev", tmp_path)
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "dev.tsv").write_text("\n\n")
    with pytest.raises(GlueFormatError, match="empty file"):
        load_split("cola", "dev", tmp_path)


def test_missing_file_split_column(tmp_path):
    with pytest.raises(GlueFormatError) as e:
        load_split("rte", "train", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "RTE" / "train.tsv") in msg and "task rte, split train" in msg
    with pytest.raises(GlueFormatError, match="rte has no split 'dev_matched'"):
        load_split("rte", "dev_matched", tmp_path)
    with pytest.raises(GlueFormatError, match="no GLUE files for qqp"):
        load_task("qqp", tmp_path)
    path = write_tsv(tmp_path / "RTE" / "dev.tsv", ["index", "sentence1", "sentence2"], [["0", "a", "b"]])
    with pytest.raises(GlueFormatError) as e:
        load_split("rte", "dev", tmp_path)
    assert str(e.value).startswith(f"{path}:1: missing column 'label' in header")
    write_tsv(tmp_path / "RTE" / "test.tsv", ["index", "sentence1", "sentence2"], [["zero", "a", "b"]])
    with pytest.raises(GlueFormatError, match=r"test\.tsv:2: index 'zero' is not an integer"):
        load_split("rte", "test", tmp_path)


def test_not_utf8(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "dev.tsv").write_bytes(b"index\tsentence1\tsentence2\tlabel\n0\t\xff\xfe\tb\tentailment\n")
    with pytest.raises(GlueFormatError, match="not UTF-8"):
        load_split("rte", "dev", tmp_path)


# ------------------------------------------------------------------------------------------ glue dir


def test_default_glue_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VEGALM_GLUE_DIR", str(tmp_path / "mine"))
    assert default_glue_dir() == tmp_path / "mine"
    monkeypatch.delenv("VEGALM_GLUE_DIR")
    work = tmp_path / "proj"
    (tmp_path / "shared" / "data" / "glue").mkdir(parents=True)
    work.mkdir()
    monkeypatch.chdir(work)  # ../shared/data/glue from the working dir wins
    assert default_glue_dir().resolve() == (tmp_path / "shared" / "data" / "glue").resolve()
    monkeypatch.chdir(tmp_path)  # no ../shared here: falls back to the repo's sibling
    expected = glue._REPO_ROOT.parent / "shared" / "data" / "glue"  # the package's own sibling
    assert default_glue_dir() == (expected if expected.is_dir() else tmp_path.parent / "shared" / "data" / "glue")


# ------------------------------------------------------------------------------------------ Hub mapping


def _hub(data: dict, label_feature) -> object:
    from datasets import ClassLabel, Dataset, Features, Value

    feats = {k: Value("string") for k in data if k not in ("label", "idx")}
    feats["label"] = ClassLabel(names=label_feature) if isinstance(label_feature, list) else Value(label_feature)
    feats["idx"] = Value("int32")
    return Dataset.from_dict(data, features=Features(feats))


def test_examples_from_hub_label_mapping():
    # Hub MNLI: 0=entailment 1=neutral 2=contradiction; ours: contradiction, entailment, neutral.
    ds = _hub({"premise": ["p0", "p1", "p2"], "hypothesis": ["h0", "h1", "h2"], "label": [0, 1, 2], "idx": [0, 1, 2]},
              ["entailment", "neutral", "contradiction"])
    ex = examples_from_hub("mnli", "dev_matched", ds)
    assert [e.label for e in ex] == [1, 2, 0]
    assert [TASKS["mnli"].labels[e.label] for e in ex] == ["entailment", "neutral", "contradiction"]
    assert ex[2] == Example("mnli-dev_matched-2", 2, "p2", "h2", 0)
    wnli = _hub({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0, 1], "idx": [0, 1]},
                ["not_entailment", "entailment"])
    assert [e.label for e in examples_from_hub("wnli", "train", wnli)] == [0, 1]  # "0" = not entailment
    rte = _hub({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [1, 0], "idx": [0, 1]},
               ["entailment", "not_entailment"])
    assert [e.label for e in examples_from_hub("rte", "dev", rte)] == [1, 0]


def test_examples_from_hub_test_and_regression():
    test = _hub({"question1": ["a", "b"], "question2": ["c", "d"], "label": [-1, -1], "idx": [0, 1]}, "int64")
    ex = examples_from_hub("qqp", "test", test)
    assert [e.label for e in ex] == [None, None] and ex[1].guid == "qqp-test-1" and ex[0].text_b == "c"
    sts = _hub({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [4.25, -1.0], "idx": [0, 1]}, "float32")
    assert [e.label for e in examples_from_hub("stsb", "dev", sts)] == [4.25, None]
    sst = _hub({"sentence": ["good", "bad"], "label": [1, 0], "idx": [0, 1]}, "int64")  # plain ints: Hub order
    assert [(e.text_a, e.text_b, e.label) for e in examples_from_hub("sst2", "train", sst)] == [
        ("good", None, 1), ("bad", None, 0)]
    with pytest.raises(GlueFormatError, match="missing column 'hypothesis'"):
        examples_from_hub("mnli", "train", _hub({"premise": ["a"], "label": [0], "idx": [0]}, "int64"))
    odd = _hub({"sentence1": ["a"], "sentence2": ["b"], "label": [0], "idx": [0]}, ["yes", "no"])
    with pytest.raises(GlueFormatError, match="unknown label name 'yes'"):
        examples_from_hub("rte", "train", odd)


def test_load_split_hub_without_network(monkeypatch):
    import datasets

    calls = []
    fake = _hub({"premise": ["p"], "hypothesis": ["h"], "label": [2], "idx": [0]},
                ["entailment", "neutral", "contradiction"])

    def fake_load(path, config, split=None, cache_dir=None):
        calls.append((path, config, split))
        return fake

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ex = load_split_hub("mnli", "dev_mismatched")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")] and ex[0].label == 0

    def offline(*a, **k):
        raise ConnectionError("no network\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GlueFormatError, match=re.escape("could not load nyu-mll/glue rte/validation")):
        load_split_hub("rte", "dev")


@pytest.mark.parametrize(("task", "dir_name", "header"), [
    ("rte", "RTE", ["index", "sentence1", "sentence2"]),
    ("qqp", "QQP", QQP_TEST),
    ("cola", "CoLA", ["index", "sentence"]),
])
def test_duplicate_test_index_is_caught_at_load_with_file_and_line(tmp_path, task, dir_name, header):
    width = len(header) - 1
    rows = [["0", *["a"] * width], ["1", *["b"] * width], ["2", *["c"] * width], ["1", *["d"] * width]]
    path = write_tsv(tmp_path / dir_name / "test.tsv", header, rows)
    with pytest.raises(GlueFormatError, match=rf"^{re.escape(str(path))}:5: duplicate index 1 \(first on line 3\)$"):
        load_split(task, "test", tmp_path)
    write_tsv(path, header, rows[:3])
    assert [e.index for e in load_split(task, "test", tmp_path)] == [0, 1, 2]


@needs_glue
def test_real_test_files_have_no_duplicate_indices():
    for task, split in REAL_COUNTS:
        if split == "test":
            assert len({e.index for e in load_split(task, split, GLUE_DIR)}) == REAL_COUNTS[task, split]


@pytest.mark.parametrize("split", ["dev", "test"])
def test_a_directory_where_a_tsv_belongs_says_so(tmp_path, split):
    write_tsv(tmp_path / "RTE" / "train.tsv", RTE_HEADER, [["0", "a", "b", "entailment"]])
    (tmp_path / "RTE" / f"{split}.tsv").mkdir()
    where = tmp_path / "RTE" / f"{split}.tsv"
    msg = rf"^{re.escape(str(where))}: is a directory, expected the TSV file of GLUE task rte, split {split}$"
    with pytest.raises(GlueFormatError, match=msg):
        load_split("rte", split, tmp_path)
    with pytest.raises(GlueFormatError, match=msg):  # not skipped as absent by load_task
        load_task("rte", tmp_path)
