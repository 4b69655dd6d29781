"""Fast kernels against their eager twins, bf16 autocast, size recipes, and checkpoint-loading errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vegalm.errors import VegaError
from vegalm.model import EncoderConfig, VegaForSequenceClassification, VegaModel
from vegalm.model.attention import BandBias, FusedAttention, RelBias, band_layout
from vegalm.model.dropout import FastDropout
from vegalm.model.relpos import diagonals, log_bucket, rel_index

SMALL = EncoderConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, position_buckets=16, max_relative_positions=64,
                      max_position_embeddings=128)  # fmt: skip


def test_log_buckets_match_transformers():
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    rel = torch.arange(-2000, 2001)
    for buckets, max_rel in [(256, 512), (16, 64), (32, 128), (256, 2048)]:
        assert torch.equal(log_bucket(rel, buckets, max_rel), make_log_bucket_position(rel, buckets, max_rel).long())
    idx = rel_index(300, 256, 256, 512)
    assert idx.shape == (300, 300) and idx.min() >= 0 and idx.max() <= 511
    assert torch.equal(idx, idx.flip(0).flip(1).neg() + 2 * 256)  # odd symmetry of the buckets


def test_fused_attention_gradcheck():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 2, 9, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: FusedAttention.apply(*t, 0.4, 0.0), (q, k, v, bias))

    def dropped(*t):
        torch.manual_seed(5)  # same keep mask in every evaluation
        return FusedAttention.apply(*t, 0.4, 0.25)

    assert torch.autograd.gradcheck(dropped, (q, k, v, bias))


def test_fused_attention_matches_eager_formula():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 8) for _ in range(3))
    bias = torch.randn(2, 3, 11, 11)
    ref = (q @ k.transpose(-1, -2) * 0.3 + bias).softmax(-1) @ v
    assert torch.allclose(FusedAttention.apply(q, k, v, bias, 0.3, 0.0), ref, atol=1e-6)


def test_rel_bias_gradcheck_and_values():
    torch.manual_seed(0)
    idx = rel_index(10, 4, 4, 16)
    idx = idx - idx.min()
    P = int(idx.max()) + 1
    c, p = (torch.randn(2, 3, 10, P, dtype=torch.float64, requires_grad=True) for _ in range(2))
    full = idx.expand(2, 3, 10, 10)
    ref = torch.gather(c, -1, full) + torch.gather(p, -1, full.transpose(-1, -2)).transpose(-1, -2)
    assert torch.allclose(RelBias.apply(c, p, idx), ref)
    assert torch.autograd.gradcheck(lambda a, b: RelBias.apply(a, b, idx), (c, p))


def test_band_layout_is_chosen_for_cpu_bf16_up_to_twice_the_bucket_rows():
    """The measured rule (BENCHMARKS.md, band vs gather): bf16/fp16 on a CPU while 2L-1 <= 2P+1; fp32 and CUDA
    gather; S1024 gathers (the offset table would be 4x the rows). The rows are those a DeBERTa-v3 config (256
    buckets) really uses: 255 at S128, 511 at S512 (where the band layout was measured faster in bf16), 512 at
    S1024."""
    from vegalm.model.relpos import RelIndexCache

    cfg = EncoderConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, position_buckets=256, max_relative_positions=-1)
    cache = RelIndexCache(cfg.att_span, cfg.position_buckets, cfg.max_rel)
    rows = {L: (lambda r: r[2] - r[1] + 1)(cache.get(L, torch.device("cpu"))) for L in (128, 512, 1024)}
    assert rows == {128: 255, 512: 511, 1024: 512}
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert band_layout(torch.bfloat16, cpu, 512, rows[512]) and band_layout(torch.float16, cpu, 128, rows[128])
    assert not band_layout(torch.float32, cpu, 128, rows[128])
    assert not band_layout(torch.bfloat16, cuda, 128, rows[128])
    assert not band_layout(torch.bfloat16, cpu, 1024, rows[1024])


@pytest.mark.parametrize("length,span,buckets,max_rel", [(10, 4, 4, 16), (40, 8, 8, 24), (7, 16, 0, 0)])
def test_rel_index_is_toeplitz_and_diagonals_read_it(length, span, buckets, max_rel):
    """BandBias relies on idx[i, j] depending on i - j only, log buckets included."""
    idx = rel_index(length, span, buckets, max_rel)
    diag = diagonals(idx)
    i, j = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    assert diag.shape == (2 * length - 1,) and torch.equal(idx, diag[i - j + length - 1])


@pytest.mark.parametrize("terms", ["both", "c2p", "p2c"])
def test_band_bias_is_the_gather_twin_in_values_and_gradients(terms):
    """The fused kernel's BandBias (offset-ordered tables read through strided views) against two torch.gather
    calls on the bucket tables (the eager formula), values and gradients; float64 gradcheck of the views."""
    torch.manual_seed(0)
    L = 10
    idx = rel_index(L, 4, 4, 16)
    idx = idx - idx.min()
    P = int(idx.max()) + 1
    diag = diagonals(idx)
    c, p = (torch.randn(2, 3, L, P, dtype=torch.float64, requires_grad=True) for _ in range(2))
    full = idx.expand(2, 3, L, L)
    ref = 0
    if terms != "p2c":
        ref = ref + torch.gather(c, -1, full)
    if terms != "c2p":
        ref = ref + torch.gather(p, -1, full.transpose(-1, -2)).transpose(-1, -2)
    got = BandBias.apply(c.index_select(-1, diag.flip(0)) if terms != "p2c" else None,
                         p.index_select(-1, diag) if terms != "c2p" else None)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    w = torch.randn_like(ref)
    want = torch.autograd.grad((ref * w).sum(), (c, p), allow_unused=True, materialize_grads=True)
    have = torch.autograd.grad((got * w).sum(), (c, p), allow_unused=True, materialize_grads=True)
    for a, b in zip(have, want):
        torch.testing.assert_close(a, b)
    cb, pb = (torch.randn(2, 3, L, 2 * L - 1, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: BandBias.apply(a, b), (cb, pb))


def test_fast_dropout_rate_scale_and_grad():
    torch.manual_seed(0)
    d = FastDropout(0.1).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    y = d(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.9) < 0.002
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d y / d x = keep / (1 - p)
    assert torch.equal(FastDropout(0.1).eval()(x), x)
    twin = FastDropout(0.1, fast=False).train()  # the eager twin is F.dropout itself
    torch.manual_seed(3)
    a = twin(x)
    torch.manual_seed(3)
    assert torch.equal(a, F.dropout(x, 0.1, True))


@pytest.mark.parametrize("impl", ["fused", "sdpa"])
def test_bf16_autocast_close_to_fp32(impl):
    torch.manual_seed(0)
    m = VegaModel(SMALL).eval()
    for mod in m.modules():
        if hasattr(mod, "impl"):
            mod.impl = impl
    ids = torch.randint(5, 100, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    ref = m(ids, attention_mask=mask).last_hidden_state
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids, attention_mask=mask).last_hidden_state
    assert (out.float() - ref).abs().max().item() < 0.1  # LayerNorm'd outputs, bf16 has 8 mantissa bits
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(ids, attention_mask=mask).last_hidden_state.float().pow(2).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_training_mode_kernels_agree_without_dropout():
    """eager and fused must give the same training-mode gradients when no dropout is drawn."""
    cfg = EncoderConfig(**{**SMALL.__dict__, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    torch.manual_seed(0)
    a = VegaModel(cfg).train()
    b = VegaModel(cfg).train()
    b.load_state_dict(a.state_dict())
    for mod in b.modules():
        if hasattr(mod, "impl"):
            mod.impl = "fused"
    for mod in a.modules():
        if hasattr(mod, "impl"):
            mod.impl = "eager"
    ids = torch.randint(5, 100, (3, 25))
    for m in (a, b):
        m(ids).last_hidden_state.pow(2).mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_flex_training_with_attention_dropout_warns_and_runs_sdpa():
    """FlexAttention has no attention dropout: training with it falls back to sdpa, and says so."""
    cfg = EncoderConfig(**{**SMALL.__dict__, "attention_probs_dropout_prob": 0.1, "attn_impl": "flex"})
    m = VegaModel(cfg).train()
    ids = torch.randint(5, 100, (2, 12))
    with pytest.warns(UserWarning, match="runs the sdpa kernel"):
        out = m(ids).last_hidden_state
    out.pow(2).mean().backward()  # CPU flex has no backward: this works only because sdpa ran
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_vega_1_3b_on_meta_device():
    out = subprocess.run([sys.executable, "-m", "vegalm.cli", "model-info", "--size", "vega-1.3b"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert "48 layers, hidden 1536, 24 heads" in out.stdout
    non_emb = float(out.stdout.split("=")[1].split("M")[0].replace(",", ""))
    assert 1355 <= non_emb <= 1365, out.stdout  # ~1.36B non-embedding parameters


# ---------------------------------------------------------------- bad checkpoints
@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    VegaModel(SMALL).save_pretrained(tmp_path)
    return tmp_path


def _msg(fn) -> str:
    with pytest.raises(VegaError) as e:
        fn()
    return str(e.value)


def test_missing_directory_and_files(saved, tmp_path):
    assert "no such model directory" in _msg(lambda: VegaModel.from_pretrained(tmp_path / "nope"))
    (saved / "model.safetensors").unlink()
    assert "model.safetensors: missing" in _msg(lambda: VegaModel.from_pretrained(saved))
    (saved / "config.json").unlink()
    assert "config.json: missing" in _msg(lambda: VegaModel.from_pretrained(saved))


def test_pickle_is_refused(saved):
    (saved / "model.safetensors").rename(saved / "pytorch_model.bin")
    assert "safetensors only" in _msg(lambda: VegaModel.from_pretrained(saved))


def test_bad_config(saved):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "conv_kernel_size": 3}))
    m = _msg(lambda: VegaModel.from_pretrained(saved))
    assert "config.json" in m and "conv_kernel_size" in m
    (saved / "config.json").write_text("{not json")
    assert "config.json:1: invalid JSON" in _msg(lambda: VegaModel.from_pretrained(saved))


def test_shape_mismatch_missing_and_unexpected_keys(saved):
    w = load_file(saved / "model.safetensors")
    key = "encoder.layer.0.attention.self.query_proj.weight"
    bad = dict(w)
    bad[key] = torch.zeros(5, 5)
    save_file(bad, saved / "model.safetensors")
    m = _msg(lambda: VegaModel.from_pretrained(saved))
    assert "model.safetensors" in m and key in m and "(5, 5)" in m
    bad = {k: v for k, v in w.items() if k != key}
    save_file(bad, saved / "model.safetensors")
    assert f"missing weight '{key}'" in _msg(lambda: VegaModel.from_pretrained(saved))
    save_file({**w, "encoder.layer.9.foo": torch.zeros(1)}, saved / "model.safetensors")
    assert "unexpected weight 'encoder.layer.9.foo'" in _msg(lambda: VegaModel.from_pretrained(saved))


def test_head_is_fresh_from_encoder_checkpoint_and_reinit_on_mismatch(saved):
    m = VegaForSequenceClassification.from_pretrained(saved, num_labels=3)
    assert set(m.loaded_fresh_keys) == {"pooler.dense.weight", "pooler.dense.bias", "classifier.weight",
                                        "classifier.bias"}  # fmt: skip
    m.save_pretrained(saved / "cls3")
    assert "reinit_head=True" in _msg(lambda: VegaForSequenceClassification.from_pretrained(saved / "cls3", num_labels=2))
    m2 = VegaForSequenceClassification.from_pretrained(saved / "cls3", num_labels=2, reinit_head=True)
    assert m2.classifier.weight.shape == (2, 32) and "classifier.weight" in m2.loaded_fresh_keys
    assert torch.equal(m2.pooler.dense.weight, m.pooler.dense.weight)  # the pooler is kept


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16-input"])
def test_gelu_linear_is_the_eager_twin_in_values_and_gradients(approximate, dtype):
    """model/ffn.py against `linear(F.gelu(h))` under plain autograd: output, dh, dW, db; fp32, and bf16 autocast
    (fp32 weights, bf16 compute, as in training) with an fp32 or a bf16 input (the layer's intermediate.dense
    output is bf16), on [B, L, FFN] and packed [T, FFN] inputs. On this CPU the two agree to the bit."""
    from vegalm.model.ffn import _GeluLinear, gelu_linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 16)
    for shape in ((3, 7, 48), (11, 48)):
        h = torch.randn(*shape).to(torch.bfloat16 if dtype == "bf16-input" else torch.float32).requires_grad_()
        g = torch.randn(*shape[:-1], 16)
        grads = []
        for fast in (False, True):
            amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != "fp32")
            with amp:
                out = gelu_linear(h, lin, approximate) if fast else lin(F.gelu(h, approximate=approximate))
            dh, dw, db = torch.autograd.grad(out, (h, lin.weight, lin.bias), g.to(out.dtype))
            grads.append((out, dh, dw, db))
        (ref, *ref_g), (got, *got_g) = grads
        assert got.dtype == ref.dtype and all(a.dtype == b.dtype for a, b in zip(got_g, ref_g))
        tol = dict(atol=1e-6, rtol=1e-5) if dtype == "fp32" else dict(atol=1e-5, rtol=8e-3)  # bf16: 1 ulp
        torch.testing.assert_close(got, ref, **tol)
        for a, b in zip(got_g, ref_g):
            torch.testing.assert_close(a, b, **tol)
    h64 = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w64, b64 = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((3, 6), (3,)))
    assert torch.autograd.gradcheck(lambda x, w, b: _GeluLinear.apply(x, w, b, approximate), (h64, w64, b64))


def test_layer_keeps_the_gelu_input_only():
    """A training forward of the default layer saves one [B, L, FFN] tensor fewer than attn_impl=eager's."""
    cfg = EncoderConfig(**{**SMALL.__dict__, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    torch.manual_seed(0)
    m = VegaModel(cfg).train()
    ids = torch.randint(5, 100, (2, 30))

    def ffn_sized():
        seen = {}

        def pack(t):
            if t.shape[-1] == cfg.intermediate_size and t.dim() >= 2 and t.numel() >= 2 * 30 * cfg.intermediate_size:
                seen[t.untyped_storage().data_ptr()] = t.shape
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(ids).last_hidden_state.sum().backward()
        return len(seen)

    recompute = ffn_sized()
    for mod in m.modules():
        if hasattr(mod, "impl"):
            mod.impl = "eager"
    assert ffn_sized() == 2 * cfg.num_hidden_layers and recompute == cfg.num_hidden_layers


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_softmax_is_the_fp32_softmax_rounded(dtype):
    """FusedAttention takes the softmax in q's dtype: the kernel accumulates in fp32 and rounds once, so each
    probability is the fp32 softmax's rounded value or, for a few per 100,000 (the division rounds differently
    at some row lengths), its neighbour one unit in the last place away; masked entries (the dtype's min, as
    `_biased` writes them) stay exactly 0. Row lengths 1-69 and the usual ones, as packed groups produce them."""
    torch.manual_seed(0)
    off = total = 0
    for n in [*range(1, 70), 100, 128, 129, 300, 511, 512]:
        s = (torch.randn(2, 3, 33, n) * 6).to(dtype)
        if n > 3:
            s[..., -2:] = torch.finfo(dtype).min
        got, want = torch.softmax(s, -1), torch.softmax(s, -1, dtype=torch.float32).to(dtype)
        ulps = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
        assert int(ulps.max()) <= 1, n
        off, total = off + int((ulps > 0).sum()), total + ulps.numel()
        if n > 3:
            assert bool((got[..., -2:] == 0).all())
    assert off / total < 1e-4, (off, total)


@pytest.mark.parametrize("length", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("permuted", [False, True])
def test_band_gradient_zeroes_exactly_the_cells_off_the_band(length, permuted, monkeypatch):
    """BandBias's table gradient zeroes only the cells the band view does not write: it must equal a zero-filled
    table with the band copied in, for contiguous tables and `_per_head`'s [B,H,L,W] views of [H,B,L,W]. The
    buffer starts as NaN, so a cell written by neither shows."""
    from vegalm.model import attention
    from vegalm.model.attention import _band, _band_grad

    B, H, L = 2, 3, length
    shape = (H, B, L, 2 * L - 1) if permuted else (B, H, L, 2 * L - 1)
    like = torch.empty(shape).transpose(0, 1) if permuted else torch.empty(shape)
    layout = (like.shape, like.stride())
    monkeypatch.setattr(attention, "_empty", lambda lay, t: torch.empty_strided(*lay).fill_(float("nan")))
    g = torch.randn(B, H, L, L)
    want = torch.zeros(B, H, L, 2 * L - 1)
    _band(want).copy_(g)
    got = _band_grad(layout, g)
    assert got.stride() == like.stride() and torch.equal(got, want)


def test_bias_gradients_of_an_expanded_table_do_not_alias():
    """A [B,H,L,W] table input that is a broadcast view (stride 0 over B) gets a contiguous gradient buffer, not
    one with its aliasing strides, in both BandBias and RelBias."""
    from vegalm.model.attention import _layout

    torch.manual_seed(0)
    L = 5
    base = torch.randn(1, 2, L, 2 * L - 1, dtype=torch.float64, requires_grad=True)
    assert _layout(base.expand(3, 2, L, 2 * L - 1))[1] == (2 * L * (2 * L - 1), L * (2 * L - 1), 2 * L - 1, 1)
    assert torch.autograd.gradcheck(lambda t: BandBias.apply(t.expand(3, -1, -1, -1), None), (base,))
    idx = torch.randint(0, 2 * L - 1, (L, L))
    assert torch.autograd.gradcheck(lambda t: RelBias.apply(t.expand(3, -1, -1, -1), None, idx), (base,))
