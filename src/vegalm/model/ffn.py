"""The feed-forward block's second half, `output.dense(gelu(h))`, keeping `h` but not `gelu(h)` for backward.

Eager autograd keeps both [N, FFN] tensors of a layer: the GELU input (for GELU's backward) and its output (for
the weight gradient of output.dense). `gelu_linear` keeps the input only and recomputes the GELU in backward, one
elementwise pass over [N, FFN]. At the benchmark's B8 x S512 (FFN 1024, fp32) that is 16 MB less per layer, the
second-largest saved tensor after the attention probabilities. Values and gradients are eager's
(tests/test_model_misc.py); `attn_impl=eager` runs the eager twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

APPROXIMATE = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh"}  # hidden_act -> F.gelu(approximate=)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What autocast would run a linear layer in here: its dtype when enabled on x's device, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, approximate):
        dtype = _compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):  # the casts autocast would do, done here once
            act = F.gelu(h, approximate=approximate).to(dtype)  # GELU in h's dtype, as eager autocast runs it
            w = weight.to(dtype)
            out = F.linear(act, w, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(h, w)
        ctx.approximate, ctx.has_bias = approximate, bias is not None
        ctx.w_dtype, ctx.b_dtype = weight.dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        h, w = ctx.saved_tensors
        g = grad.to(w.dtype)
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.ops.aten.gelu_backward((g @ w).to(h.dtype), h, approximate=ctx.approximate)
        if ctx.needs_input_grad[1]:
            act = F.gelu(h, approximate=ctx.approximate).to(w.dtype)  # the recomputation
            grad_w = (g.reshape(-1, g.shape[-1]).t() @ act.reshape(-1, act.shape[-1])).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.b_dtype)
        return grad_h, grad_w, grad_b, None


def gelu_linear(h: torch.Tensor, linear: torch.nn.Linear, approximate: str = "none") -> torch.Tensor:
    """`linear(F.gelu(h, approximate=...))`, with GELU's output recomputed in backward instead of kept."""
    return _GeluLinear.apply(h, linear.weight, linear.bias, approximate)
