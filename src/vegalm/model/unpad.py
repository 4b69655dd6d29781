"""Unpadded encoder passes: the token-wise work (projections, FFN, LayerNorm, GELU, dropout) skips padding.

A padded batch [B, L] is packed into its T real tokens. Attention, the only op that mixes tokens,
re-pads q/k/v per sequence and masks padding keys, so each example sees exactly its own tokens and
the loss and gradients are those of the padded batch (tests/test_kernels_unpad.py). The batches
themselves are unchanged. `enable_unpadding(model)` switches it on for our encoder and for
transformers encoders whose self-attention goes through `ALL_ATTENTION_FUNCTIONS` (BERT, RoBERTa, ELECTRA,
ALBERT, ...); fine-tuning's `unpad=true` calls it (finetune/models.py). The switch survives `copy.deepcopy`
(EMA and SMART teachers): a copy runs its own weights, packed. The embeddings (lookup, LayerNorm,
dropout) still run on [B, L], and attention on the re-padded [B, H, L, L] scores.
"""

from __future__ import annotations

import sys
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from vegalm.model.attention import FusedAttention
from vegalm.model.dropout import FastDropout

ATTN_NAME = "vegalm_unpad"


class Packing:
    """Index maps between a padded batch [B, L, ...] and its packed real tokens [T, ...]."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask.bool()
        self.shape = tuple(mask.shape)
        self.index = self.mask.flatten().nonzero().squeeze(-1)  # [T] flat positions of real tokens

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [T, ...]"""
        return x.flatten(0, 1).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, L, ...], zeros at padding (differentiable in x)."""
        out = x.new_zeros((self.shape[0] * self.shape[1], *x.shape[1:]))
        return out.index_copy(0, self.index, x).unflatten(0, self.shape)


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """transformers attention interface on packed tokens: q/k/v [1, H, T, D], `attention_mask` a Packing.
    Returns [1, T, H, D] like transformers' own kernels."""
    packing: Packing = attention_mask
    q, k, v = (packing.pad(t[0].transpose(0, 1)).transpose(1, 2) for t in (query, key, value))  # [B, H, L, D]
    keys = packing.mask[:, None, None, :]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if torch.is_grad_enabled():  # training: our kernel (cheap dropout bits, keeps only P for backward)
        bias = torch.zeros(keys.shape, dtype=q.dtype, device=q.device).masked_fill_(~keys, torch.finfo(q.dtype).min)
        out = FusedAttention.apply(q, k, v, bias, scale, dropout)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=dropout, scale=scale)
    return packing.unpad(out.transpose(1, 2))[None], None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _packed_attention)


def _hf_supported(encoder: nn.Module) -> bool:
    """True when the encoder's attention dispatches through transformers' ALL_ATTENTION_FUNCTIONS."""
    mod = sys.modules.get(type(encoder).__module__)
    return mod is not None and "ALL_ATTENTION_FUNCTIONS" in vars(mod)


def _stash_mask(base: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the base model: keep its 2-D attention_mask for the encoder (the encoder itself
    receives transformers' 4-D additive mask). A module-level function of the module it gets, not a
    closure, so a deepcopy of the model (EMA and SMART teachers) stashes into its own encoder."""
    base.encoder._vegalm_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)


def _drop_mask(base: nn.Module, *_) -> None:
    base.encoder._vegalm_mask = None


def _packed_encoder_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """The encoder's own forward (its class's, so a deepcopy runs its own weights) on the packed tokens."""
    padded_forward = type(self).forward
    mask = getattr(self, "_vegalm_mask", None)
    if mask is None or bool(mask.all()) or tuple(mask.shape) != tuple(hidden_states.shape[:2]):
        return padded_forward(self, hidden_states, attention_mask, *args, **kwargs)
    packing = Packing(mask)
    config = self._vegalm_config
    before = config._attn_implementation
    config._attn_implementation = ATTN_NAME  # read by each layer at call time; restored below
    try:
        out = padded_forward(self, packing.unpad(hidden_states)[None], packing, *args, **kwargs)
    finally:
        config._attn_implementation = before
    out.last_hidden_state = packing.pad(out.last_hidden_state[0])
    return out


def _enable_hf(model: nn.Module) -> bool:
    base = getattr(model, "base_model", model)
    encoder = getattr(base, "encoder", None)
    config = getattr(base, "config", None)
    if encoder is None or config is None or getattr(config, "is_decoder", False) or not _hf_supported(encoder):
        return False
    if getattr(encoder, "_vegalm_unpadded", False):
        return True
    _register()
    encoder._vegalm_config = config  # the layers' config (a deepcopy copies both to one new object)
    base.register_forward_pre_hook(_stash_mask, with_kwargs=True)
    base.register_forward_hook(_drop_mask)
    encoder._vegalm_mask = None
    encoder.forward = MethodType(_packed_encoder_forward, encoder)
    encoder._vegalm_unpadded = True
    return True


def use_fast_dropout(model: nn.Module) -> int:
    """Replace every `nn.Dropout` of `model` by model/dropout.py's FastDropout (same rate up to 2^-16, ~10x
    cheaper masks on CPU); returns how many were replaced."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Dropout]
    for parent, name, child in found:
        setattr(parent, name, FastDropout(child.p))
    return len(found)


def enable_unpadding(model: nn.Module) -> bool:
    """Switch `model` to unpadded passes in place; False (model untouched) when its architecture is not
    supported. Outputs at real positions, the loss and the gradients are unchanged; hidden states at
    padding positions are zero instead of the padded pass's (unused) values."""
    ours = [m for m in model.modules() if hasattr(m, "unpad") and isinstance(getattr(m, "unpad"), bool)]
    if ours:
        for m in ours:
            m.unpad = True
        return True
    return _enable_hf(model)
