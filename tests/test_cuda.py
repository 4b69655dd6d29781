"""The attention kernels on a CUDA device against their eager twin (skipped on machines without CUDA).

    python -m pytest -q tests/test_cuda.py          # on a GPU machine (tools/gpu_sweep.py's call 1 runs it)

On CPU the kernels are compared in tests/test_model_parity.py and test_model_misc.py; on CUDA, `sdpa` is
the default (its memory-efficient kernel takes the bias with a gradient) and `flex` can train, so both
are checked here in forward and backward, fp32 and bf16, with padding.
"""

from __future__ import annotations

import pytest
import torch

from vegalm.model import EncoderConfig, VegaModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda"

SMALL = EncoderConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, position_buckets=16, max_relative_positions=64,
                      max_position_embeddings=128, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)  # fmt: skip


def _pair(impl: str) -> tuple[VegaModel, VegaModel]:
    torch.manual_seed(0)
    ref = VegaModel(SMALL).to(DEVICE).train()
    fast = VegaModel(SMALL).to(DEVICE).train()
    fast.load_state_dict(ref.state_dict())
    for model, name in ((ref, "eager"), (fast, impl)):
        for mod in model.modules():
            if hasattr(mod, "impl"):
                mod.impl = name
    return ref, fast


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (3, 37), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[2, 5:] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("impl", ["fused", "sdpa", "flex"])
def test_kernel_matches_eager_fp32_forward_and_backward(impl):
    torch.backends.cuda.matmul.allow_tf32 = False
    ref, fast = _pair(impl)
    ids, mask = _batch()
    outs = []
    for model in (ref, fast):
        h = model(ids, attention_mask=mask).last_hidden_state
        (h * mask.unsqueeze(-1)).pow(2).mean().backward()
        outs.append(h.detach())
    assert torch.allclose(outs[0], outs[1], atol=2e-5), (outs[0] - outs[1]).abs().max()
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_kernel_bf16_autocast_close_to_eager_fp32(impl):
    ref, fast = _pair(impl)
    ids, mask = _batch()
    want = ref(ids, attention_mask=mask).last_hidden_state
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = fast(ids, attention_mask=mask).last_hidden_state
        loss = got.float().pow(2).mean()
    loss.backward()
    valid = mask.bool()
    assert (got.float() - want)[valid].abs().max().item() < 0.1  # LayerNorm'd outputs, bf16 keeps 8 bits
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)
