"""`pooling=mean` (model/pooling.py): the head reads the masked mean of the last layer where it read [CLS].

Checked against the head applied by hand to a mean computed here, on MiniLM (transformers' BERT) with real RTE
pairs, on our encoder, and on tiny RoBERTa/ELECTRA heads; padded and packed (unpad) passes agree; a deepcopy
pools its own weights; the key changes only when the option is on.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_finetune import save_tiny_encoder
from _data import GLUE_DIR, needs_glue
from test_finetune_unpad import TINY, _batch
from test_kernels_unpad import _tiny_hf

from vegalm.config import ConfigError
from vegalm.finetune.config import FinetuneConfig, config_hash, resolve
from vegalm.finetune.models import build_model, forward_inputs, minilm_path
from vegalm.model.pooling import masked_mean, use_mean_pooling
from vegalm.model.unpad import enable_unpadding

pytestmark = needs_glue


def _mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked mean written out per row, as a twin of masked_mean's batched sum."""
    return torch.stack([h[i, mask[i].bool()].mean(0) for i in range(h.shape[0])])


def _build(model: Path | str, pooling: str, unpad: bool):
    resolved = resolve(FinetuneConfig.of(task="rte", model=str(model), out="o", glue_dir=str(GLUE_DIR),
                                         pooling=pooling, unpad=unpad))
    torch.manual_seed(0)  # the new head
    return build_model(resolved, 2)[0].eval(), resolved


@pytest.mark.parametrize("unpad", [False, True])
def test_minilm_mean_pooling_is_the_head_on_the_masked_mean(unpad):
    model, _ = _build(minilm_path(), "mean", unpad)
    plain, _ = _build(minilm_path(), "cls", False)
    batch, _ = _batch("rte", 6, "dev")
    inputs = {k: batch[k] for k in forward_inputs(model)}
    with torch.no_grad():
        h = plain.bert(**inputs).last_hidden_state
        want = plain.classifier(plain.bert.pooler(_mean(h, inputs["attention_mask"])[:, None]))
        got = model(**inputs).logits
        cls = plain(**inputs).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert (got - cls).abs().max() > 1e-2  # the head does read something else than [CLS]
    assert model.bert.encoder._vegalm_mask is None  # the stashed mask lives for one forward only


def test_mean_ignores_padding_and_gradients_reach_every_real_token():
    model, _ = _build(minilm_path(), "mean", False)
    batch, _ = _batch("rte", 4, "dev")
    inputs = {k: batch[k] for k in forward_inputs(model)}
    wider = {k: torch.nn.functional.pad(v, (0, 5)) for k, v in inputs.items()}  # 5 more padding columns
    with torch.no_grad():
        torch.testing.assert_close(model(**wider).logits, model(**inputs).logits, atol=2e-5, rtol=1e-4)
    emb = model.bert.embeddings.word_embeddings
    grads = []

    def keep_grad(module, args, out):
        out.register_hook(grads.append)

    handle = emb.register_forward_hook(keep_grad)
    model(**inputs).logits.sum().backward()
    handle.remove()
    g = grads[0].norm(dim=-1)  # [B, L]
    mask = inputs["attention_mask"].bool()
    assert (g[mask] > 0).all()


def test_our_encoder_pools_the_mean_padded_and_packed(tmp_path):
    tiny = save_tiny_encoder(tmp_path, TINY)
    padded, _ = _build(tiny, "mean", False)
    packed, _ = _build(tiny, "mean", True)
    plain, _ = _build(tiny, "cls", False)
    batch, _ = _batch("rte", 6, "dev")
    inputs = {k: batch[k] for k in forward_inputs(padded)}
    with torch.no_grad():
        h = plain.deberta(**inputs).last_hidden_state
        want = plain.classifier(plain.pooler(_mean(h, inputs["attention_mask"])[:, None]))
        torch.testing.assert_close(padded(**inputs).logits, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(packed(**inputs).logits, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["roberta", "electra"])
def test_tiny_hf_heads_read_the_mean_and_a_deepcopy_pools_its_own(family):
    model = _tiny_hf(family).eval()
    assert use_mean_pooling(model) and use_mean_pooling(model)  # idempotent: one hook
    assert len(model.base_model.encoder._forward_hooks) == 1
    enable_unpadding(model)
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher.base_model.encoder.parameters():
            p.mul_(0.5)
    mask = (torch.arange(10)[None] < torch.tensor([10, 4, 7])[:, None]).long()
    batch = {"input_ids": torch.where(mask.bool(), torch.randint(3, 100, (3, 10)), 1), "attention_mask": mask}
    with torch.no_grad():
        for m in (model, teacher):
            h = m.base_model(**batch).last_hidden_state  # position 0 already holds the mean
            assert m.base_model.encoder._vegalm_mask is None
            ref = copy.deepcopy(m)
            ref.base_model.encoder._forward_hooks.clear()
            raw = ref.base_model(**batch).last_hidden_state
            torch.testing.assert_close(h[:, 0], _mean(raw, mask), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(h[:, 1:], raw[:, 1:])
            torch.testing.assert_close(m(**batch).logits, m.classifier(h), atol=1e-6, rtol=1e-5)


def test_masked_mean_in_bf16_sums_in_fp32():
    torch.manual_seed(0)
    h = (torch.randn(2, 300, 8) + 40).bfloat16()  # 300 values near 40: a bf16 running sum would drift
    mask = torch.ones(2, 300)
    mask[1, 100:] = 0
    got = masked_mean(h, mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _mean(h.float(), mask), atol=0.2, rtol=0)
    torch.testing.assert_close(masked_mean(h, None).float(), h.float().mean(1), atol=0.2, rtol=0)


def test_pooling_enters_the_key_only_when_mean_and_bad_values_stop_early():
    base = dict(task="rte", model=str(minilm_path()), out="o", glue_dir=str(GLUE_DIR))
    cls, mean = (resolve(FinetuneConfig.of(**base, pooling=p)) for p in ("cls", "mean"))
    assert "pooling" not in cls and mean["pooling"] == "mean" and config_hash(cls) != config_hash(mean)
    assert config_hash(cls) == config_hash(resolve(FinetuneConfig.of(**base)))  # older keys stay valid
    with pytest.raises(ConfigError, match=r"^pooling: expected one of cls, mean, got 'max'"):
        FinetuneConfig.of(**base, pooling="max").check()


def test_a_model_without_an_encoder_module_is_refused():
    import transformers

    cfg = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    model = transformers.DistilBertForSequenceClassification(cfg)
    assert not use_mean_pooling(model) and not model.distilbert.transformer._forward_hooks
