"""The DeBERTa-v2/v3 encoder body: embeddings, post-LN Transformer layers, shared relative embeddings.

Module and parameter names mirror the transformers checkpoint layout
(`embeddings.word_embeddings.weight`, `encoder.layer.3.attention.self.query_proj.weight`,
`encoder.rel_embeddings.weight`, ...), so checkpoints convert by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vegalm.model.attention import DisentangledSelfAttention, RelContext
from vegalm.model.config import EncoderConfig
from vegalm.model.dropout import FastDropout
from vegalm.model.ffn import APPROXIMATE, gelu_linear
from vegalm.model.relpos import RelIndexCache

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        e = cfg.emb_size
        # padding_idx keeps the [PAD] row's gradient at zero, as the reference does.
        self.word_embeddings = nn.Embedding(cfg.vocab_size, e, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, e) if cfg.position_biased_input else None
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, e) if cfg.type_vocab_size > 0 else None
        self.embed_proj = nn.Linear(e, cfg.hidden_size, bias=False) if e != cfg.hidden_size else None
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = FastDropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, mask=None, inputs_embeds=None):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        L = x.shape[1]
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(L, device=x.device)[None]
            x = x + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
            x = x + self.token_type_embeddings(token_type_ids)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = self.LayerNorm(x)
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        return self.dropout(x)


class _AddNorm(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): the post-LN sublayer output used twice per layer."""

    def __init__(self, d_in: int, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = FastDropout(cfg.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.norm(self.dense(x), residual)

    def norm(self, y, residual):
        """LayerNorm(dropout(y) + residual), for a `y` that `dense` already produced."""
        return self.LayerNorm(self.dropout(y) + residual)


class _Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.self = DisentangledSelfAttention(cfg)
        self.output = _AddNorm(cfg.hidden_size, cfg)

    def forward(self, x, pad, rel_emb, rel, packing=None):
        return self.output(self.self(x, pad, rel_emb, rel, packing), x)


class _Intermediate(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _AddNorm(cfg.intermediate_size, cfg)
        self.impl, self.act_name = cfg.attn_impl, cfg.hidden_act

    def forward(self, x, pad, rel_emb, rel, packing=None):
        a = self.attention(x, pad, rel_emb, rel, packing)
        approximate = APPROXIMATE.get(self.act_name) if self.impl != "eager" else None
        if approximate is None:  # attn_impl=eager (the twin) or a non-GELU activation: eager autograd
            return self.output(self.intermediate(a), a)
        # GELU recomputed in backward (model/ffn.py)
        return self.output.norm(gelu_linear(self.intermediate.dense(a), self.output.dense, approximate), a)


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.relative = cfg.relative_attention
        if self.relative:
            self.rel_embeddings = nn.Embedding(2 * cfg.att_span, cfg.hidden_size)
            self._rel = RelIndexCache(cfg.att_span, cfg.position_buckets, cfg.max_rel)
        norms = [x.strip() for x in cfg.norm_rel_ebd.lower().split("|")]
        self.LayerNorm = (
            nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if self.relative and "layer_norm" in norms else None
        )
        self.gradient_checkpointing = False

    def rel_embedding(self) -> torch.Tensor | None:
        if not self.relative:
            return None
        w = self.rel_embeddings.weight
        return self.LayerNorm(w) if self.LayerNorm is not None else w

    def forward(self, x, pad, output_hidden_states: bool = False, packing=None):
        """x [B, L, h]; with `packing` (model/unpad.py) the layers run on the packed real tokens only."""
        rel = None
        if self.relative:
            rel = RelContext(*self._rel.get(x.shape[1], x.device), cache=self._rel)
        rel_emb = self.rel_embedding()
        states = [x] if output_hidden_states else None
        if packing is not None:
            x = packing.unpad(x)
        for layer in self.layer:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, pad, rel_emb, rel, packing, use_reentrant=False)
            else:
                x = layer(x, pad, rel_emb, rel, packing)
            if states is not None:
                states.append(x if packing is None else packing.pad(x))
        return (x if packing is None else packing.pad(x)), states


def init_weights(module: nn.Module, std: float) -> None:
    """N(0, std) for matrices, zeros for biases, identity LayerNorm; the [PAD] embedding row is zero."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
