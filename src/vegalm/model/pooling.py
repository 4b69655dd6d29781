"""Mean pooling for a sequence classifier's head, on our encoder or a transformers one.

Every supported head reads the first token of the last layer ([CLS]): BERT's pooler, RoBERTa's and ELECTRA's
classification heads, DeBERTa's ContextPooler. `use_mean_pooling` makes that first position hold the mean of the
last layer over the real tokens instead, so the unchanged head (pooler or dense layers, dropout, classifier) reads
the sentence mean. Sentence-transformers models such as all-MiniLM-L6-v2 were trained with this mean, not [CLS].
The hooks are module-level functions of the module they get, so a deepcopy (EMA and SMART teachers) pools its own.
"""

from __future__ import annotations

import torch
from torch import nn

from vegalm.model.unpad import stash_mask_on_encoder

POOLINGS = ("cls", "mean")


def masked_mean(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, L, H], [B, L] (1 = real token; None = all real) -> [B, H], summed in fp32."""
    if mask is None:
        return h.float().mean(1).to(h.dtype)
    m = mask.to(torch.float32).unsqueeze(-1)
    return ((h.float() * m).sum(1) / m.sum(1).clamp_min(1.0)).to(h.dtype)  # clamp: an all-padding row gives 0


def _mean_first(encoder: nn.Module, args: tuple, output):
    """Forward hook of the encoder: its last hidden states with position 0 replaced by their masked mean."""
    h = output[0] if isinstance(output, tuple) else output.last_hidden_state
    pooled = torch.cat([masked_mean(h, getattr(encoder, "_vegalm_mask", None)).unsqueeze(1), h[:, 1:]], 1)
    if isinstance(output, tuple):  # our Encoder: (h, hidden_states)
        return (pooled, *output[1:])
    output.last_hidden_state = pooled
    return output


def _base(model: nn.Module) -> nn.Module | None:
    """The bare encoder model holding `.encoder`: transformers' `base_model`, or our `deberta`."""
    for base in (getattr(model, "deberta", None), getattr(model, "base_model", None)):
        if isinstance(base, nn.Module) and isinstance(getattr(base, "encoder", None), nn.Module):
            return base
    return None


def use_mean_pooling(model: nn.Module) -> bool:
    """Make `model`'s head read the masked mean of the last layer; False (model untouched) when the model has no
    `.encoder` below its base model (DistilBERT's is `.transformer`). Idempotent."""
    base = _base(model)
    if base is None:
        return False
    if not getattr(base.encoder, "_vegalm_mean_pooled", False):
        stash_mask_on_encoder(base)
        base.encoder.register_forward_hook(_mean_first)
        base.encoder._vegalm_mean_pooled = True
    return True
