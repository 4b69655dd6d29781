"""Unpadded encoder passes: the token-wise work (projections, FFN, LayerNorm, GELU, dropout) skips padding.

A padded batch [B, L] is packed into its T real tokens. Attention, the only op that mixes tokens, runs per
length group (`Packing.attend`: sequences sorted by length, cut into ATTN_GROUPS groups, each padded to its own
longest) with padding keys masked, so each example sees exactly its own tokens and the loss and gradients are
those of the padded batch (tests/test_kernels_unpad.py). The batches themselves are unchanged.
`enable_unpadding(model)` switches it on for our encoder and for transformers encoders whose self-attention goes
through `ALL_ATTENTION_FUNCTIONS` (BERT, RoBERTa, ELECTRA, ALBERT, ...); fine-tuning's `unpad` calls it
(finetune/models.py). The switch survives `copy.deepcopy` (EMA and SMART teachers): a copy runs its own weights,
packed. The embeddings (lookup, LayerNorm, dropout) still run on [B, L].
"""

from __future__ import annotations

import functools
import sys
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from vegalm.model.attention import FusedAttention
from vegalm.model.dropout import FastDropout

ATTN_NAME = "vegalm_unpad"


ATTN_GROUPS = 4  # attention groups per batch: sequences sorted by length, each group padded to its own longest


class Packing:
    """Index maps between a padded batch [B, L, ...] and its packed real tokens [T, ...]."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask.bool()
        self.shape = tuple(mask.shape)
        self.index = self.mask.flatten().nonzero().squeeze(-1)  # [T] flat positions of real tokens
        self._groups = None
        self._contiguous = None

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [T, ...]"""
        return x.flatten(0, 1).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, L, ...], zeros at padding (differentiable in x)."""
        out = x.new_zeros((self.shape[0] * self.shape[1], *x.shape[1:]))
        return out.index_copy(0, self.index, x).unflatten(0, self.shape)

    def contiguous(self) -> bool:
        """Whether every row's real tokens form one run (right or left padding, as tokenizers make). Groups put a
        sequence's tokens side by side, which keeps the distance between two of them only then."""
        if self._contiguous is None:  # once per batch, not per layer
            m = self.mask
            starts = m[:, :1].sum(1) + (m[:, 1:] & ~m[:, :-1]).sum(1)  # runs of real tokens per row
            self._contiguous = bool((starts <= 1).all())
        return self._contiguous

    def groups(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Attention groups: the sequences sorted by length and cut into ATTN_GROUPS runs, each padded to its own
        longest, so that a batch with one long sequence does not pad every row's [L, L] scores to it. Returns
        ([(gather [b_g * L_g] packed positions (0 at padding), real [b_g, L_g])], inverse [T]): `inverse` puts the
        groups' real tokens back in packed order. Which examples share the batch is unchanged."""
        if self._groups is None:
            lengths = self.mask.sum(1)
            offsets = torch.cumsum(lengths, 0) - lengths  # packed position of each sequence's first token
            groups, order = [], []
            for rows in torch.argsort(lengths, stable=True).tensor_split(min(ATTN_GROUPS, len(lengths))):
                longest = int(lengths[rows].max()) if len(rows) else 0
                if longest == 0:
                    continue
                t = torch.arange(longest, device=lengths.device)
                real = t[None, :] < lengths[rows][:, None]  # [b_g, L_g]
                at = offsets[rows][:, None] + t[None, :]
                groups.append((at.where(real, 0).flatten(), real))
                order.append(at[real])
            self._groups = (groups, torch.argsort(torch.cat(order)))
        return self._groups

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fn) -> torch.Tensor:
        """Attention on packed q/k/v [T, H, D], group by group: `fn(q, k, v, real)` gets [b_g, H, L_g, D] tensors
        and the [b_g, L_g] real-token mask and returns [b_g, H, L_g, D]; the result is [T, H, D], packed. Padding
        slots hold copies of token 0: their keys must be masked (they then get exactly zero gradient) and their
        query rows are dropped here."""
        if not self.contiguous():  # a row with a hole: its padded layout is what relative positions are measured in
            out = fn(*(self.pad(x).transpose(1, 2) for x in (q, k, v)), self.mask)  # [B, H, L, D]
            return self.unpad(out.transpose(1, 2))
        groups, inverse = self.groups()
        outs = []
        for at, real in groups:
            b, n = real.shape
            qg, kg, vg = (x.index_select(0, at).unflatten(0, (b, n)).transpose(1, 2) for x in (q, k, v))
            out = fn(qg, kg, vg, real).transpose(1, 2).flatten(0, 1)  # [b_g * L_g, H, D]
            outs.append(out[real.flatten()])
        return torch.cat(outs).index_select(0, inverse)


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """transformers attention interface on packed tokens: q/k/v [1, H, T, D], `attention_mask` a Packing.
    Returns [1, T, H, D] like transformers' own kernels."""
    packing: Packing = attention_mask
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5

    def attend(q, k, v, real):
        keys = real[:, None, None, :]
        if torch.is_grad_enabled():  # training: our kernel (cheap dropout bits, keeps only P for backward)
            bias = torch.zeros(keys.shape, dtype=q.dtype, device=q.device).masked_fill_(~keys, torch.finfo(q.dtype).min)
            return FusedAttention.apply(q, k, v, bias, scale, dropout)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=dropout, scale=scale)

    out = packing.attend(*(t[0].transpose(0, 1) for t in (query, key, value)), attend)  # [T, H, D]
    return out[None], None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _packed_attention)


def _hf_supported(encoder: nn.Module) -> bool:
    """True when the encoder's attention dispatches through transformers' ALL_ATTENTION_FUNCTIONS."""
    mod = sys.modules.get(type(encoder).__module__)
    return mod is not None and "ALL_ATTENTION_FUNCTIONS" in vars(mod)


@functools.lru_cache(maxsize=None)
def hf_type_unpads(model_type: str | None) -> bool:
    """Whether `enable_unpadding` supports transformers' model for `model_type` (checked on a default-config model
    built on the meta device, so nothing is allocated): what `unpad` unset decides for backend hf."""
    from transformers import AutoConfig, AutoModel

    try:
        with torch.device("meta"):
            model = AutoModel.from_config(AutoConfig.for_model(model_type))
    except Exception:  # an unknown model_type, or one transformers cannot build by default: not known to unpad
        return False
    return _hf_parts(model) is not None


def stash_mask_on_encoder(base: nn.Module) -> None:
    """Hooks that put the base model's 2-D attention_mask on `base.encoder._vegalm_mask` for the length of each
    forward (None between calls); idempotent. The packed path and mean pooling (model/pooling.py) read it."""
    if getattr(base, "_vegalm_mask_kept", False):
        return
    base.register_forward_pre_hook(_stash_mask, with_kwargs=True)
    base.register_forward_hook(_drop_mask)
    base.encoder._vegalm_mask = None
    base._vegalm_mask_kept = True


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


def _hf_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, object] | None:
    """(base model, encoder, config) of a transformers encoder the packed path supports, else None."""
    base = getattr(model, "base_model", model)
    encoder = getattr(base, "encoder", None)
    config = getattr(base, "config", None)
    if encoder is None or config is None or getattr(config, "is_decoder", False) or not _hf_supported(encoder):
        return None
    return base, encoder, config


def _enable_hf(model: nn.Module) -> bool:
    parts = _hf_parts(model)
    if parts is None:
        return False
    base, encoder, config = parts
    if getattr(encoder, "_vegalm_unpadded", False):
        return True
    _register()
    encoder._vegalm_config = config  # the layers' config (a deepcopy copies both to one new object)
    stash_mask_on_encoder(base)
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
