"""Unpadded passes (model/unpad.py) against the padded twin: logits, loss and every gradient, padding included."""

from __future__ import annotations

import copy
import csv

import pytest
import torch

from vegalm.model import EncoderConfig, VegaForSequenceClassification
from vegalm.model.unpad import Packing, enable_unpadding
from _data import GLUE_DIR, needs_glue

GLUE = GLUE_DIR


def _rte_pairs(n: int = 6) -> list[tuple[str, str]]:
    with open(GLUE / "RTE" / "dev.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : n + 1]
    return [(r[1], r[2]) for r in rows]


def assert_same_pass(padded, unpadded, step, atol=2e-5):
    """`step(model) -> (logits, loss)` on both models: logits, loss and every parameter's gradient agree."""
    outs = []
    for m in (padded, unpadded):
        m.zero_grad(set_to_none=True)
        logits, loss = step(m)
        loss.backward()
        outs.append((logits.detach(), loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (la, lossa, ga), (lb, lossb, gb) = outs
    torch.testing.assert_close(lb, la, atol=atol, rtol=1e-4)
    torch.testing.assert_close(lossb, lossa, atol=atol, rtol=1e-4)
    assert ga.keys() == gb.keys()
    for name in ga:
        if ga[name] is None:
            assert gb[name] is None, name
            continue
        torch.testing.assert_close(gb[name], ga[name], atol=atol, rtol=1e-3, msg=name)


def _compare(padded, unpadded, batch, labels, atol=2e-5):
    def step(m):
        out = m(**batch, labels=labels)
        return out.logits, out.loss

    assert_same_pass(padded, unpadded, step, atol)


def test_packing_round_trip_and_gradient():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    p = Packing(mask)
    x = torch.randn(3, 4, 5, requires_grad=True)
    packed = p.unpad(x)
    assert packed.shape == (8, 5)
    back = p.pad(packed)
    torch.testing.assert_close(back, x * mask[..., None])
    back.sum().backward()
    torch.testing.assert_close(x.grad, mask[..., None].float().expand(3, 4, 5))


@pytest.mark.parametrize("left", [False, True])
def test_grouped_attention_matches_padded_attention(left):
    """Packing.attend (sequences sorted by length, ATTN_GROUPS groups each padded to its own longest) against
    one masked attention over the whole padded batch: outputs at real tokens and gradients of q, k, v, with a
    batch of 7 lengths (one much longer than the rest) and, for `left`, left padding."""
    torch.manual_seed(0)
    lengths = torch.tensor([3, 9, 1, 4, 4, 2, 6])
    B, L, H, D = len(lengths), int(lengths.max()), 2, 4
    t = torch.arange(L)
    mask = (t[None] >= L - lengths[:, None]) if left else (t[None] < lengths[:, None])
    p = Packing(mask)
    groups, _ = p.groups()
    assert len(groups) == 4 and [g[1].shape for g in groups][-1][1] == 9 and groups[0][1].shape[1] < 9
    q, k, v = (torch.randn(B, L, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def attn(q, k, v, real):  # [b, H, n, D] each, real [b, n]
        s = (q @ k.transpose(-1, -2)).masked_fill(~real[:, None, None, :], float("-inf"))
        return s.softmax(-1) @ v

    packed = p.attend(*(p.unpad(x) for x in (q, k, v)), attn)  # [T, H, D]
    ref = attn(*(x.transpose(1, 2) for x in (q, k, v)), mask).transpose(1, 2)  # [B, L, H, D]
    torch.testing.assert_close(packed, p.unpad(ref))
    w = torch.randn_like(packed)
    got = torch.autograd.grad((packed * w).sum(), (q, k, v))
    want = torch.autograd.grad((p.unpad(ref) * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", ["eager", "fused", "sdpa"])
@pytest.mark.parametrize("layout", ["right", "hole"])
def test_vega_unpadded_matches_padded(impl, layout):
    """Right padding runs the length groups; a mask with a hole in a row (relative positions are measured in the
    padded layout, which groups would not keep) runs the batch padded as one group."""
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        position_buckets=8, max_position_embeddings=64, attn_impl=impl,
                        initializer_range=0.3)  # attention far from uniform: relative positions show in the logits
    padded = VegaForSequenceClassification(cfg, num_labels=3).train()
    unpadded = copy.deepcopy(padded)
    assert enable_unpadding(unpadded)
    lengths = [17, 5, 11, 2]
    ids = torch.randint(5, 300, (4, 17))
    mask = (torch.arange(17)[None] < torch.tensor(lengths)[:, None]).long()
    if layout == "hole":
        mask[0, 6:9] = 0
    assert Packing(mask).contiguous() == (layout == "right")
    ids = ids * mask
    _compare(padded, unpadded, {"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 2, 1, 2]))


def _minilm():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from vegalm.finetune.models import minilm_path

    path = str(minilm_path())
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, hidden_dropout_prob=0.0,
                                                               attention_probs_dropout_prob=0.0)
    return model.train(), AutoTokenizer.from_pretrained(path)


@needs_glue
def test_minilm_unpadded_matches_padded_on_rte():
    padded, tok = _minilm()
    unpadded = copy.deepcopy(padded)
    assert enable_unpadding(unpadded)
    a, b = zip(*_rte_pairs())
    batch = dict(tok(list(a), list(b), padding=True, truncation=True, max_length=128, return_tensors="pt"))
    assert not bool(batch["attention_mask"].all())  # the batch really has padding
    _compare(padded, unpadded, batch, torch.tensor([1, 0, 1, 0, 0, 1]))
    # the packed path really ran: its hidden states at padding positions are exactly zero
    pad = ~batch["attention_mask"].bool()
    with torch.no_grad():
        h_pad = padded.bert(**batch).last_hidden_state[pad]
        h_unpad = unpadded.bert(**batch).last_hidden_state[pad]
    assert h_pad.abs().max() > 0 and h_unpad.abs().max() == 0
    # no padding at all: the padded path runs unchanged
    one = {k: v[:1, : int(batch["attention_mask"][0].sum())] for k, v in batch.items()}
    _compare(padded, unpadded, one, torch.tensor([1]))


@needs_glue
def test_minilm_unpadded_bf16_autocast_close():
    padded, tok = _minilm()
    unpadded = copy.deepcopy(padded)
    enable_unpadding(unpadded)
    a, b = zip(*_rte_pairs(4))
    batch = dict(tok(list(a), list(b), padding=True, return_tensors="pt"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        la = padded.eval()(**batch).logits.float()
        lb = unpadded.eval()(**batch).logits.float()
    ref = padded(**batch).logits
    assert (la - ref).abs().max() < 0.1 and (lb - ref).abs().max() < 0.1


def _tiny_hf(family: str, num_labels: int = 2):
    import transformers

    cfg_cls, model_cls = {"roberta": ("RobertaConfig", "RobertaForSequenceClassification"),
                          "electra": ("ElectraConfig", "ElectraForSequenceClassification"),
                          "albert": ("AlbertConfig", "AlbertForSequenceClassification"),
                          "bert": ("BertConfig", "BertForSequenceClassification")}[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                         max_position_embeddings=40, num_labels=num_labels, pad_token_id=1,
                                         classifier_dropout_prob=0.0, classifier_dropout=0.0)  # ALBERT, ELECTRA heads
    return getattr(transformers, model_cls)(cfg).train()


@pytest.mark.parametrize("family", ["roberta", "electra", "albert"])
def test_tiny_hf_families_unpadded_match_padded(family):
    padded = _tiny_hf(family, num_labels=1)
    unpadded = copy.deepcopy(padded)
    assert enable_unpadding(unpadded)
    mask = (torch.arange(12)[None] < torch.tensor([12, 3, 7])[:, None]).long()
    ids = torch.where(mask.bool(), torch.randint(3, 100, (3, 12)), 1)  # 1: the pad id
    _compare(padded, unpadded, {"input_ids": ids, "attention_mask": mask}, torch.tensor([0.5, -1.0, 2.0]))


def test_a_deepcopy_of_an_unpadded_hf_model_runs_its_own_weights():
    """EMA and SMART teachers are deep copies: theirs must run their own (here: halved) encoder weights,
    unpadded, and leave the original's packing state alone."""
    model = _tiny_hf("bert").eval()
    reference = copy.deepcopy(model)  # padded
    assert enable_unpadding(model)
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for m in (teacher, reference):
            for p in m.bert.encoder.parameters():
                p.mul_(0.5)
    mask = (torch.arange(9)[None] < torch.tensor([9, 4])[:, None]).long()
    batch = {"input_ids": torch.where(mask.bool(), torch.randint(3, 100, (2, 9)), 0), "attention_mask": mask}
    with torch.no_grad():
        torch.testing.assert_close(teacher(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=1e-4)
        assert (teacher(**batch).logits - model(**batch).logits).abs().max() > 1e-3  # the halving shows
        assert teacher.bert(**batch).last_hidden_state[~mask.bool()].abs().max() == 0  # the packed path ran
    assert model.bert.encoder._vegalm_mask is None and teacher.bert.encoder._vegalm_mask is None


def test_unsupported_model_is_left_alone():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert not enable_unpadding(m)


def test_fast_dropout_swap_keeps_rate_and_eval_identity():
    from vegalm.model.dropout import FastDropout
    from vegalm.model.unpad import use_fast_dropout

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.25), torch.nn.Sequential(torch.nn.Dropout(0.5)))
    assert use_fast_dropout(m) == 2
    assert isinstance(m[1], FastDropout) and m[2][0].p == 0.5
    x = torch.ones(200, 4)
    m.eval()
    torch.testing.assert_close(m(x), m[0](x))
    kept = (m[1].train()(torch.ones(100_000)) != 0).float().mean()
    assert abs(float(kept) - 0.75) < 0.01
