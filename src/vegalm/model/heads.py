"""Task heads: tied MLM head, token-level RTD head, pooled classification / regression head."""

from __future__ import annotations

import torch
from torch import nn

from vegalm.model.config import EncoderConfig
from vegalm.model.encoder import ACTIVATIONS


class MLMHead(nn.Module):
    """dense -> act -> LayerNorm -> tied decoder (word embedding matrix) + bias.

    Checkpoint names: `lm_predictions.lm_head.{dense,LayerNorm,bias}` (DeBERTa / HF `legacy=False`).
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.emb_size)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.LayerNorm = nn.LayerNorm(cfg.emb_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(h))) @ word_embeddings.t() + self.bias


class RTDHead(nn.Module):
    """Replaced-token-detection head: dense -> act -> LayerNorm -> 1 logit per token (ELECTRA's discriminator)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.classifier = nn.Linear(cfg.hidden_size, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.LayerNorm(self.act(self.dense(h)))).squeeze(-1)


class ContextPooler(nn.Module):
    """[CLS] -> dropout -> dense -> act (DeBERTa's pooler; names `pooler.dense.*`)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.pooler_dropout)
        self.act = ACTIVATIONS[cfg.pooler_hidden_act]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(self.dropout(h[:, 0])))
