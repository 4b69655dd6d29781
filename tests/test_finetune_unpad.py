"""`unpad=true` fine-tuning against its padded twin: the same loss, gradients and evaluation logits through the
fine-tuning model (pooler, classification head, the objective with a trick), and a tiny `run_finetune` whose dev
logits agree. Model: a 2-layer, hidden-32 vegalm encoder with random weights and dropout off (dropout draws its
masks over the packed tokens, so with it on the two runs see other, equally likely masks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_finetune import save_tiny_encoder
from test_kernels_unpad import assert_same_pass

from vegalm.config import ConfigError
from vegalm.data.glue import get_task, load_split
from vegalm.data.tokenizer import load_tokenizer
from vegalm.finetune.config import FinetuneConfig, config_hash, resolve
from vegalm.finetune.models import build_model, forward_inputs, minilm_path
from vegalm.finetune.predict import predict_logits
from vegalm.finetune.run import run_finetune
from vegalm.finetune.tasks import Collator, GlueDataset
from vegalm.finetune.tricks import build_objective
from vegalm.finetune.tricks.r3f import R3F, R3FArgs
from vegalm.model import modeling
from _data import GLUE_DIR, needs_glue

pytestmark = [needs_glue,
              pytest.mark.usefixtures("fresh_accelerate")]
TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            position_buckets=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            initializer_range=0.3)  # logits of order 1 (0.02 gives ~0.006 for every input)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny_unpad"), TINY)


def _twins(model: Path, task: str = "rte", **kw):
    """(padded, unpadded) fine-tuning models built by build_model from one seed, and their resolved configs."""
    out = []
    for unpad in (False, True):
        resolved = resolve(FinetuneConfig.of(task=task, model=str(model), out="o", glue_dir=str(GLUE_DIR),
                                             unpad=unpad, **kw))
        torch.manual_seed(0)  # the new head's initialisation
        out.append(build_model(resolved, get_task(task).num_labels)[0])
    padded, unpadded = out
    torch.testing.assert_close(unpadded.state_dict(), padded.state_dict(), rtol=0, atol=0)
    return padded, unpadded


def _batch(task: str, n: int, split: str = "train") -> tuple[dict, GlueDataset]:
    tok = load_tokenizer(minilm_path())
    ds = GlueDataset.from_examples(load_split(task, split, GLUE_DIR)[:n], tok, task, 128)
    batch = Collator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max() and len(set(lengths.tolist())) > 2  # varied lengths, real padding
    return batch, ds


def test_unpad_enters_the_cache_key_only_when_on(tiny_dir):
    """unpad=false adds no key (keys of earlier runs stay valid); unset, it is on where the backbone supports it:
    our encoder, a transformers BERT (MiniLM), not transformers' own DeBERTa."""
    base = dict(task="rte", out="o", glue_dir=str(GLUE_DIR))
    off = resolve(FinetuneConfig.of(**base, model=str(tiny_dir), unpad=False))
    on = resolve(FinetuneConfig.of(**base, model=str(tiny_dir), unpad=True))
    assert "unpad" not in off and on["unpad"] is True and config_hash(on) != config_hash(off)
    for model, backend, want in ((tiny_dir, "auto", True), (minilm_path(), "auto", True), (tiny_dir, "hf", False)):
        default = resolve(FinetuneConfig.of(**base, model=str(model), backend=backend))
        assert default.get("unpad", False) is want, (model, backend)
        built = build_model(default, 2)[0]
        packed = any(getattr(m, "unpad", False) is True or getattr(m, "_vegalm_unpadded", False)
                     for m in built.modules())
        assert packed is want, (model, backend)
        assert not any(type(m) is torch.nn.Dropout for m in built.modules()) or not want  # FastDropout when packed


@pytest.mark.parametrize("native,want", [(True, "bf16"), (False, "no")])
def test_mixed_precision_auto_follows_the_hardware(tiny_dir, monkeypatch, native, want):
    """Unset, mixed_precision is bf16 where the device runs bf16 in hardware and fp32 elsewhere; the decided value
    is what the key holds, so an auto run and an explicit run of the same precision share their cache."""
    monkeypatch.setattr("vegalm.finetune.config.native_bf16", lambda: native)
    base = dict(task="rte", out="o", glue_dir=str(GLUE_DIR), model=str(tiny_dir))
    auto = resolve(FinetuneConfig.of(**base))
    assert auto["mixed_precision"] == want
    assert config_hash(auto) == config_hash(resolve(FinetuneConfig.of(**base, mixed_precision=want)))
    with pytest.raises(ConfigError, match="mixed_precision: expected one of no, bf16, auto, got .fp16."):
        FinetuneConfig.of(**base, mixed_precision="fp16").check()


@pytest.mark.parametrize("task,trick", [("rte", None), ("rte", "r3f"), ("stsb", None)])
def test_training_step_matches_the_padded_twin(tiny_dir, task, trick):
    """Loss and every gradient of the fine-tuning objective (pooler + head; r3f adds a forward on perturbed
    inputs_embeds), on a batch of 8 real rows of varied length."""
    padded, unpadded = _twins(tiny_dir, task)
    assert unpadded.deberta.unpad and not padded.deberta.unpad
    spec = get_task(task)
    tricks = [("r3f", R3F(R3FArgs(eps=1e-2), spec, spec.num_labels))] if trick else []
    objective = build_objective(spec.num_labels, forward_inputs(padded), tricks)
    batch, _ = _batch(task, 8)
    inputs = {k: batch[k] for k in forward_inputs(padded)}

    def step(model):
        torch.manual_seed(1)  # r3f's noise: the same draw for both
        loss, _ = objective(model.train(), batch)
        with torch.no_grad():
            logits = model(**inputs).logits
        return logits, loss

    assert_same_pass(padded, unpadded, step)


def test_eval_logits_match_the_padded_twin(tiny_dir):
    """predict_logits (the evaluation path) in fp32, and under bf16 autocast within bf16's rounding."""
    padded, unpadded = _twins(tiny_dir)
    _, ds = _batch("rte", 40, "dev")
    collate, cpu = Collator(load_tokenizer(minilm_path()).pad_token_id), torch.device("cpu")
    a, b = (predict_logits(m, ds, collate, 16, cpu) for m in (padded, unpadded))
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)
    a16, b16 = (predict_logits(m, ds, collate, 16, cpu, bf16=True) for m in (padded, unpadded))
    scale = np.abs(a).max()  # ~6 here, where bf16's 8-bit mantissa rounds to 1/32
    assert np.abs(b16 - a).max() < 0.03 * scale and np.abs(a16 - a).max() < 0.03 * scale


def test_hf_backend_minilm_is_unpadded_and_others_are_refused(tiny_dir):
    padded, unpadded = _twins(minilm_path())
    assert unpadded.bert.encoder._vegalm_unpadded and not hasattr(padded.bert.encoder, "_vegalm_unpadded")
    batch, _ = _batch("rte", 4, "dev")
    inputs = {k: batch[k] for k in forward_inputs(padded)}
    with torch.no_grad():
        torch.testing.assert_close(unpadded.eval()(**inputs).logits, padded.eval()(**inputs).logits,
                                   atol=2e-5, rtol=1e-4)
    # transformers' own DeBERTa-v2 has no attention-interface dispatch: one line naming the backend
    resolved = resolve(FinetuneConfig.of(task="rte", model=str(tiny_dir), out="o", glue_dir=str(GLUE_DIR),
                                         backend="hf", unpad=True))
    with pytest.raises(ConfigError, match=r"^unpad: backend hf has no packed path for DebertaV2For"):
        build_model(resolved, 2)


def test_run_finetune_unpadded_gives_the_padded_logits(tiny_dir, tmp_path, monkeypatch):
    """Three optimizer steps of a tiny run, then dev evaluation: the dev logits of unpad=true and unpad=false agree,
    and only the unpad=true run packed its batches (in training and in evaluation)."""
    packed = {"train": 0, "eval": 0}

    class CountingPacking(modeling.Packing):
        def __init__(self, mask):
            super().__init__(mask)
            packed["train" if torch.is_grad_enabled() else "eval"] += 1

    monkeypatch.setattr(modeling, "Packing", CountingPacking)
    base = dict(task="rte", model=str(tiny_dir), max_train_samples=32, batch_size=8, max_steps=3, progress=False,
                glue_dir=str(GLUE_DIR), eval_test=False, save_model=False,
                mixed_precision="no")  # fp32: the two must agree to float rounding, which bf16 would exceed
    res, logits = {}, {}
    for unpad in (False, True):
        out = tmp_path / f"unpad_{unpad}"
        res[unpad] = run_finetune(FinetuneConfig.of(**base, out=str(out), unpad=unpad))
        if not unpad:
            assert packed == {"train": 0, "eval": 0}
        logits[unpad] = np.load(out / "dev_logits.npy")
    assert res[True]["config"]["unpad"] is True and "unpad" not in res[False]["config"]
    assert res[True]["config_hash"] != res[False]["config_hash"]
    assert packed["train"] == 3 and packed["eval"] == 5  # 3 steps; 277 dev rows in batches of 64
    assert logits[True].shape == (277, 2)  # RTE dev
    assert np.abs(logits[False][0] - logits[False]).max() > 0.1  # the logits depend on the input
    np.testing.assert_allclose(logits[True], logits[False], atol=1e-4, rtol=1e-3)
