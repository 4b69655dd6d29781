"""Average the predictions of several runs (seeds, checkpoints) on the same examples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vegalm.errors import VegaError


def ensemble_logits(arrays: Sequence[Any], mode: str = "logits") -> np.ndarray:
    """The members' mean: of the raw logits (regression scores too) in the members' own float dtype (fp32 as
    saved: `np.mean(arrays, axis=0)` exactly), or with mode "probs" of the softmax probabilities, in fp64,
    the better-calibrated choice when the members' logit scales differ."""
    if not arrays:
        raise VegaError("ensemble_logits: no arrays given")
    xs = [np.asarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a) for a in arrays]
    if not all(np.issubdtype(x.dtype, np.floating) for x in xs):
        xs = [x.astype(np.float64) for x in xs]
    shape = xs[0].shape
    for i, x in enumerate(xs):
        if x.shape != shape:
            raise VegaError(f"ensemble_logits: member {i} has shape {x.shape}, member 0 has {shape}")
    stack = np.stack(xs)
    if mode == "probs":
        if stack.ndim < 3 or stack.shape[-1] < 2:
            raise VegaError("ensemble_logits mode='probs' needs class logits [N, C] with C >= 2")
        stack = stack.astype(np.float64)
        stack = np.exp(stack - stack.max(-1, keepdims=True))
        stack = stack / stack.sum(-1, keepdims=True)
    elif mode != "logits":
        raise VegaError(f"ensemble_logits: mode={mode!r}, expected 'logits' or 'probs'")
    return stack.mean(0)
