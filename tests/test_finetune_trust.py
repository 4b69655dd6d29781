"""`vegalm finetune` never deletes what it did not write, and never trains from a model folder whose weights
do not match its config.json (issue 14 §3 deletion, §4). Through the real CLI, on tiny real runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vegalm.cli import main
from vegalm.finetune.models import build_model
from vegalm.finetune.config import FinetuneConfig, resolve
from vegalm.finetune.models import minilm_path
from vegalm.model import EncoderConfig, VegaModel
from vegalm.outdir import MARKER, lock_dir
from _data import GLUE_DIR, needs

pytestmark = [needs(GLUE_DIR / "WNLI" / "train.tsv"),
              pytest.mark.usefixtures("fresh_accelerate")]
TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            position_buckets=32)
FAST = ["max_train_samples=32", "batch_size=16", "max_steps=2", "progress=false", "eval_test=false",
        f"glue_dir={GLUE_DIR}"]
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _with_tokenizer(path: Path) -> Path:
    for name in TOKENIZER:
        shutil.copy(minilm_path() / name, path / name)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    VegaModel(EncoderConfig(**TINY)).save_pretrained(path)
    return _with_tokenizer(path)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
              ).save_pretrained(path)
    return _with_tokenizer(path)


def _finetune(capsys, model: Path, out: Path, *extra: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main(["finetune", "--task", "wnli", "--model", str(model), "--out", str(out), *FAST, *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [line for line in err.splitlines() if line.startswith("error:")]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# ---------------------------------------------------------------------------------- §3 deletion


@pytest.mark.parametrize("user_file", ["checkpoints/important.txt", "model/weights.bin", "results.json", "tb"])
def test_user_files_under_our_names_are_refused_untouched(tiny_dir, tmp_path, capsys, user_file):
    out = tmp_path / "out"
    (out / user_file).parent.mkdir(parents=True, exist_ok=True)
    (out / user_file).write_bytes(b"the user's own bytes\x00\x01")
    (out / "notes.txt").write_text("mine too")
    before = _snapshot(out)
    rc, errors = _finetune(capsys, tiny_dir, out, "checkpoint_every=1")
    assert rc == 2 and len(errors) == 1
    assert user_file.split("/")[0] in errors[0] and "vegalm did not create" in errors[0]
    assert _snapshot(out) == before  # byte-identical, and nothing added (no marker, no lock file)


def test_user_files_dropped_into_a_finished_run_are_refused(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _finetune(capsys, tiny_dir, out, "save_model=false")[0] == 0
    assert (out / MARKER).is_file() and not (out / "checkpoints").exists()
    (out / "model").mkdir()
    (out / "model" / "weights.bin").write_bytes(b"\x00" * 16)
    before = _snapshot(out)
    rc, errors = _finetune(capsys, tiny_dir, out, "seed=1")  # another config: it would retrain and save the model
    assert rc == 2 and len(errors) == 1 and "weights.bin" in errors[0]
    assert _snapshot(out) == before


def test_a_run_replaces_and_deletes_only_its_own_folders(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    assert _finetune(capsys, tiny_dir, out, "checkpoint_every=1")[0] == 0
    assert not (out / "checkpoints").exists() and (out / "model" / MARKER).is_file()
    assert _finetune(capsys, tiny_dir, out, "seed=1", "checkpoint_every=1")[0] == 0  # model/ replaced: it is ours
    assert json.loads((out / "results.json").read_text())["seed"] == 1 and (out / "notes.txt").read_text() == "kept"
    assert not (out / ".vegalm.lock.pid").exists()


def test_an_unmarked_run_of_an_older_vegalm_is_adopted(tiny_dir, tmp_path, capsys):
    """A results.json with a config hash and a checkpoints/config_hash stamp show that vegalm wrote them."""
    out = tmp_path / "old"
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "checkpoints" / "config_hash").write_text("0123456789abcdef\n")
    (out / "checkpoints" / "step-1" / "model.safetensors").write_bytes(b"old")
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")
    (out / "results.json").write_text(json.dumps({"config_hash": "fedcba9876543210", "dev_score": 1.0}))
    assert _finetune(capsys, tiny_dir, out)[0] == 0
    assert not (out / "checkpoints").exists() and (out / "model" / "model.safetensors").is_file()


def test_a_second_run_on_a_locked_folder_fails_at_once(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with lock_dir(out):
        rc, errors = _finetune(capsys, tiny_dir, out)
    assert rc == 2 and len(errors) == 1 and "in use by another vegalm run" in errors[0]
    assert not (out / "results.json").exists()


# ------------------------------------------------------------------- §4 weights that do not match


def test_bert_config_over_deberta_weights_is_an_error(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bert-over-deberta"
    shutil.copytree(tiny_dir, bad)
    shutil.copy(minilm_path() / "config.json", bad / "config.json")
    rc, errors = _finetune(capsys, bad, tmp_path / "out")
    assert rc == 2 and len(errors) == 1
    assert f"{bad / 'model.safetensors'}" in errors[0] and "encoder weights missing (bert.embeddings." in errors[0]
    assert "allow_new_weights=true" in errors[0] and not (tmp_path / "out" / "results.json").exists()
    rc, _ = _finetune(capsys, bad, tmp_path / "out", "allow_new_weights=true")  # the explicit override trains
    assert rc == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["config"]["allow_new_weights"] is True and any(k.startswith("bert.encoder.") for k in
                                                              res["model"]["fresh_weights"])


@pytest.mark.parametrize("folder, layers, what", [
    ("tiny_dir", 3, "missing weight 'deberta.encoder.layer.2."),      # our encoder
    ("tiny_dir", 1, "unexpected weight 'deberta.encoder.layer.1."),
    ("tiny_bert", 3, "encoder weights missing (bert.encoder.layer.2."),  # a transformers backbone
    ("tiny_bert", 1, "unexpected encoder weights (encoder.layer.1."),
])
def test_a_mismatched_config_is_an_error(request, tmp_path, capsys, folder, layers, what):
    bad = _edit_config(request.getfixturevalue(folder), tmp_path / "bad", num_hidden_layers=layers)
    rc, errors = _finetune(capsys, bad, tmp_path / "out")
    assert rc == 2 and len(errors) == 1 and str(bad / "model.safetensors") in errors[0] and what in errors[0]
    if folder == "tiny_dir":  # the explicit override trains
        assert _finetune(capsys, bad, tmp_path / "out", "allow_new_weights=true", "save_model=false")[0] == 0


def test_matching_folders_only_get_a_new_head(tiny_bert, tmp_path, capsys, caplog):
    with caplog.at_level("WARNING"):
        rc, _ = _finetune(capsys, tiny_bert, tmp_path / "out", "save_model=false")
    assert rc == 0
    said = [m for m in (r.getMessage() for r in caplog.records) if "newly initialised" in m or "LOAD REPORT" in m]
    assert said == [f"{tiny_bert}: newly initialised weights: classifier.bias, classifier.weight"]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["model"]["fresh_weights"] == ["classifier.bias", "classifier.weight"]
    assert "allow_new_weights" not in res["config"]  # off: not in the cache key, so older keys stay valid
    resolved = resolve(FinetuneConfig.of(task="rte", model="minilm-l6", out=str(tmp_path / "m"), glue_dir=str(GLUE_DIR)))
    _, fresh = build_model(resolved, 2)
    assert fresh == ["classifier.bias", "classifier.weight"]


@pytest.mark.parametrize("which", ["bert", "deberta"])
def test_a_config_value_of_the_wrong_type_names_file_and_key(tiny_dir, tiny_bert, tmp_path, capsys, which):
    bad = _edit_config(tiny_bert if which == "bert" else tiny_dir, tmp_path / "bad", num_hidden_layers="2")
    rc, errors = _finetune(capsys, bad, tmp_path / "out")
    assert rc == 2 and errors == [f"error: {bad / 'config.json'}: num_hidden_layers: expected int, got '2'"]
