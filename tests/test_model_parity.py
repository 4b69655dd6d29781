"""Our encoder against transformers' DebertaV2 with identical random weights: outputs and gradients.

Every kernel (eager, fused, sdpa; flex forward-only because CPU FlexAttention has no
backward) is compared with HF on padded batches, for several configs covering shared and
separate position keys, position_buckets 0 and 256, c2p/p2c subsets, absolute positions,
token types and a factorised embedding.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    DebertaV2ForSequenceClassification,
    DebertaV2Model,
)

from vegalm.model import VegaForMaskedLM, VegaForSequenceClassification, VegaModel
from vegalm.model import attention

TOL = 1e-5
BASE = dict(
    vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=320, relative_attention=True,
)  # fmt: skip
CONFIGS = {
    # DeBERTa-v3: shared keys, 256 log buckets (L=160 > 128 reaches the log region), LN'd rel embeddings.
    "v3-b256": dict(position_buckets=256, max_relative_positions=-1, share_att_key=True, pos_att_type="p2c|c2p",
                    norm_rel_ebd="layer_norm", position_biased_input=False),
    # Small buckets: most distances land in the log region.
    "v3-b16": dict(position_buckets=16, max_relative_positions=64, share_att_key=True, pos_att_type=["p2c", "c2p"],
                   norm_rel_ebd="layer_norm", position_biased_input=False),
    # DeBERTa-v2-like: separate position projections, no buckets, clamped span, absolute positions, token types.
    "v2-b0": dict(position_buckets=0, max_relative_positions=16, share_att_key=False, pos_att_type=["p2c", "c2p"],
                  norm_rel_ebd="none", position_biased_input=True, type_vocab_size=2),
    "c2p-only": dict(position_buckets=0, max_relative_positions=-1, share_att_key=False, pos_att_type=["c2p"],
                     position_biased_input=True),
    "p2c-only": dict(position_buckets=32, max_relative_positions=128, share_att_key=True, pos_att_type=["p2c"],
                     position_biased_input=False),
    "factorised-emb": dict(position_buckets=16, max_relative_positions=64, share_att_key=True,
                           pos_att_type=["p2c", "c2p"], embedding_size=16, position_biased_input=False),
    "no-relative": dict(relative_attention=False, position_biased_input=True),
}  # fmt: skip
LENGTHS = {"v3-b256": 160}


def hf_config(name: str, **extra) -> DebertaV2Config:
    return DebertaV2Config(**{**BASE, **CONFIGS[name], **extra})


def batch(cfg, L: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (3, L), generator=g)
    mask = torch.ones(3, L, dtype=torch.long)
    mask[1, L - 7 :] = 0  # padding at the end of two rows
    mask[2, L // 3 :] = 0
    ids[mask == 0] = 0
    tt = (torch.arange(L) > L // 2).long().expand(3, L) if getattr(cfg, "type_vocab_size", 0) else None
    return ids, mask, tt


def set_impl(model, impl: str) -> None:
    for m in model.modules():
        if hasattr(m, "impl"):
            m.impl = impl


def hf_pair(hf_cls, our_cls, name, tmp_path, **kw):
    torch.manual_seed(0)
    hf = hf_cls(hf_config(name, **kw)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path)
    ours = our_cls.from_pretrained(tmp_path).eval()
    assert ours.loaded_fresh_keys == []
    return hf, ours


def grads(model, prefix_map=lambda n: n):
    return {prefix_map(n): p.grad for n, p in model.named_parameters() if p.grad is not None}


def compare_grads(hf, ours):
    g_hf, g_ours = grads(hf), grads(ours)
    # Legacy HF MLM head names differ; compare the parameters both sides have under the same name.
    common = set(g_hf) & set(g_ours)
    assert len(common) >= len(g_ours) - 4, sorted(set(g_ours) - set(g_hf))
    for n in sorted(common):
        d = (g_hf[n] - g_ours[n]).abs().max().item()
        scale = g_hf[n].abs().max().item()
        assert d <= TOL and d <= 1e-4 * max(scale, 1e-3), f"grad {n}: max abs diff {d:.2e} (max |grad| {scale:.2e})"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("impl", ["eager", "fused", "fused-band", "sdpa"])
def test_encoder_forward_and_grad(name, impl, tmp_path, monkeypatch):
    """fused-band: the fused kernel with BandBias's offset layout (bf16's) forced in fp32, so it meets the same
    tolerance against transformers as the gather layout."""
    hf, ours = hf_pair(DebertaV2Model, VegaModel, name, tmp_path)
    if impl == "fused-band":
        monkeypatch.setattr(attention, "band_layout", lambda *_: True)
        impl = "fused"
    set_impl(ours, impl)
    ids, mask, tt = batch(hf.config, LENGTHS.get(name, 40))
    a = hf(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    b = ours(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"hidden states differ by {diff:.2e} (padding positions included)"
    w = torch.randn_like(a)
    (a * w).mean().backward()  # a training-scale loss: gradients O(1e-3..1)
    (b * w).mean().backward()
    compare_grads(hf, ours)


@pytest.mark.parametrize("name", ["v3-b16", "v2-b0"])
def test_flex_forward(name, tmp_path):
    hf, ours = hf_pair(DebertaV2Model, VegaModel, name, tmp_path)
    set_impl(ours, "flex")
    ids, mask, tt = batch(hf.config, 40)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = hf(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        b = ours(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    assert (a - b).abs().max().item() <= TOL


@pytest.mark.parametrize("name,legacy", [("v3-b16", False), ("v2-b0", True), ("factorised-emb", True)])
@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_mlm_logits_and_grad(name, legacy, impl, tmp_path):
    hf, ours = hf_pair(DebertaV2ForMaskedLM, VegaForMaskedLM, name, tmp_path, legacy=legacy)
    set_impl(ours, impl)
    ids, mask, tt = batch(hf.config, 40)
    a = hf(ids, attention_mask=mask, token_type_ids=tt).logits
    b = ours(ids, attention_mask=mask, token_type_ids=tt).logits
    assert (a - b).abs().max().item() <= TOL
    # Sparse path: logits only at labelled positions, same values and same loss.
    labels = torch.full_like(ids, -100)
    labels[:, 3:9] = ids[:, 3:9]
    la = hf(ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    lb = ours(ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    assert lb.logits.shape == (18, hf.config.vocab_size)
    assert torch.allclose(lb.logits, a.flatten(0, 1)[lb.masked_positions], atol=TOL)
    assert abs(la.loss.item() - lb.loss.item()) <= TOL
    la.loss.backward()
    lb.loss.backward()
    g_ours = grads(ours)
    for n, p in hf.named_parameters():
        if p.grad is None:
            continue
        n2 = n.replace("cls.predictions.transform.", "lm_predictions.lm_head.").replace(
            "cls.predictions.bias", "lm_predictions.lm_head.bias"
        )
        if n2 in g_ours:
            assert (p.grad - g_ours[n2]).abs().max().item() <= TOL, n


@pytest.mark.parametrize("num_labels", [3, 1])
@pytest.mark.parametrize("name", ["v3-b256", "v2-b0"])
def test_classifier_logits_and_grad(name, num_labels, tmp_path):
    hf, ours = hf_pair(DebertaV2ForSequenceClassification, VegaForSequenceClassification, name, tmp_path,
                       num_labels=num_labels)  # fmt: skip
    ids, mask, tt = batch(hf.config, LENGTHS.get(name, 40))
    labels = torch.tensor([0.5, 2.0, 4.1]) if num_labels == 1 else torch.tensor([0, 2, 1])
    a = hf(ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    b = ours(ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    # HF flattens regression logits to [B] when labels are given; ours stay [B, 1].
    assert (a.logits.reshape(3, -1) - b.logits).abs().max().item() <= TOL
    assert abs(a.loss.item() - b.loss.item()) <= TOL
    a.loss.backward()
    b.loss.backward()
    compare_grads(hf, ours)


@pytest.mark.parametrize(
    "our_cls,auto_cls,kw",
    [
        (VegaModel, AutoModel, {}),
        (VegaForMaskedLM, AutoModelForMaskedLM, {}),
        (VegaForSequenceClassification, AutoModelForSequenceClassification, {"num_labels": 3}),
    ],
)
def test_save_pretrained_loads_in_transformers(our_cls, auto_cls, kw, tmp_path):
    from vegalm.model.config import EncoderConfig

    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        position_buckets=16, max_relative_positions=64, max_position_embeddings=128)  # fmt: skip
    ours = our_cls(cfg, **kw).eval()
    ours.save_pretrained(tmp_path)
    hf, info = auto_cls.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set()), info
    assert not info.get("mismatched_keys")
    hf.eval()
    ids, mask, _ = batch(hf.config, 40)
    a = hf(ids, attention_mask=mask)
    b = ours(ids, attention_mask=mask)
    key = "last_hidden_state" if our_cls is VegaModel else "logits"
    assert (a[key] - b[key]).abs().max().item() <= TOL
    # Round trip through our own loader too.
    again = our_cls.from_pretrained(tmp_path).eval()
    assert torch.equal(again(ids, attention_mask=mask)[key], b[key])
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deberta-v2"
