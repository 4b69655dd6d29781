"""vegalm.cache: digests pinned to the values the old finetune/runner.py code gave, and the stage-key API."""

from pathlib import Path

import pytest

from vegalm.cache import (STAGE_FILE, StaleStageError, check_stage, config_hash, file_digest, fingerprint, read_stage,
                          stage_key, write_stage)
from vegalm.errors import VegaError

# The fine-tuning cache key's excluded fields at the time of the move (finetune/runner.py UNHASHED).
OLD_UNHASHED = ("out", "progress", "save_model", "eval_batch_size", "extra_train", "checkpoint_every",
                "model", "init_from", "tokenizer", "glue_dir")


def _model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text('{"a": 1}\n')
    (tmp_path / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "notes.txt").write_text("x")
    return tmp_path


def test_digests_match_the_old_runner_values(tmp_path):
    # Values computed with finetune/runner.py's file_digest / fingerprint / config_hash before the move:
    # cached fine-tuning results are keyed by them, so they must never change.
    d = _model_dir(tmp_path)
    assert file_digest(d / "config.json") == "e8c628edc9968ef0"
    assert fingerprint(d) == [["config.json", 9, "e8c628edc9968ef0"], ["model.safetensors", 1024, "785b0751fc2c53dc"]]
    cfg = {"task": "rte", "lr": 3e-5, "seed": 0, "out": "runs/x", "model": "/some/path",
           "tricks": ["adv", "selfcal"], "p": Path("a/b")}
    assert config_hash(cfg, OLD_UNHASHED) == "70d2aec552d58a49"
    assert config_hash({**cfg, "out": "elsewhere"}, OLD_UNHASHED) == "70d2aec552d58a49"
    assert config_hash({**cfg, "lr": 5e-5}, OLD_UNHASHED) != "70d2aec552d58a49"


def test_file_digest_sees_a_rewrite(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"one")
    first = file_digest(f)
    f.write_bytes(b"two!")  # another size, so the (path, size, mtime) memo cannot hide the change
    assert file_digest(f) != first


def test_stage_missing_done_retrain_and_stale(tmp_path):
    d = tmp_path / "tok"
    key = stage_key(vocab_size=1000, corpus={"files": [{"path": "a.txt", "size": 10}]}, seq=(1, 2))
    assert key["seq"] == [1, 2]  # normalised to JSON
    assert check_stage(d, key, retrain=False) == "missing"
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")  # files without a stage record: not a finished stage
    assert check_stage(d, key, retrain=False) == "missing"
    write_stage(d, key)
    assert read_stage(d) == key
    assert check_stage(d, stage_key(vocab_size=1000, corpus={"files": [{"path": "a.txt", "size": 10}]}, seq=[1, 2]),
                       retrain=False) == "done"
    other = stage_key(vocab_size=32000, corpus={"files": [{"path": "a.txt", "size": 99}]}, seq=[1, 2])
    assert check_stage(d, other, retrain=True) == "retrain"
    with pytest.raises(StaleStageError) as e:
        check_stage(d, other, retrain=False, flag="--retrain-tokenizer")
    msg = str(e.value)
    assert isinstance(e.value, VegaError) and "\n" not in msg
    assert str(d) in msg and "--retrain-tokenizer" in msg
    assert "corpus.files[0].size: 10 → 99" in msg and "vocab_size: 1000 → 32000" in msg


def test_stale_message_names_added_removed_and_counts_the_rest(tmp_path):
    write_stage(tmp_path, stage_key(a=1, b=2, c=3, d=4, gone=0))
    with pytest.raises(StaleStageError, match=r"a: 1 → 9; b: 2 → 9; c: 3 → 9; and 3 more"):
        check_stage(tmp_path, stage_key(a=9, b=9, c=9, d=9, new=1), retrain=False)
    with pytest.raises(StaleStageError, match=r"gone: 0 → \(none\); new: \(none\) → 1"):
        check_stage(tmp_path, stage_key(a=1, b=2, c=3, d=4, new=1), retrain=False)


def test_unreadable_stage_record_is_missing(tmp_path):
    (tmp_path / STAGE_FILE).write_text("{not json")
    assert read_stage(tmp_path) is None
    assert check_stage(tmp_path, {"a": 1}, retrain=False) == "missing"
