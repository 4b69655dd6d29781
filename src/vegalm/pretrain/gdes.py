"""Embedding sharing between the RTD generator and discriminator.

DeBERTa-v3 (He et al. 2021, arXiv 2111.09543, sec. 3) found that plain sharing (ELECTRA) drags
the token embeddings in two directions: MLM pulls semantically close tokens together, RTD pushes
them apart. Gradient-disentangled embedding sharing (GDES) keeps one table E trained by MLM only
and gives the discriminator

    E_D = sg(E_G) + E_delta,      E_delta initialised to 0, trained by the RTD loss only.

At export E_delta is folded back: E_D = E_G + E_delta, a plain embedding table.

Modes (`embedding_sharing`): "gdes" (default), "shared" (ELECTRA: one table, both losses),
"none" (two independent tables). Only the word embeddings are shared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GDESEmbedding(nn.Module):
    """Looks up sg(E_G)[ids] + E_delta[ids]. Two lookups, so E_G + E_delta is never materialised
    (a 128k x 1536 sum per step would cost more than the lookups)."""

    def __init__(self, source: nn.Embedding):
        super().__init__()
        self._source = [source]  # a list hides it from module registration: E_G belongs to the generator
        self.delta = nn.Parameter(torch.zeros_like(source.weight))
        self.padding_idx = source.padding_idx
        self.num_embeddings, self.embedding_dim = source.weight.shape

    @property
    def source(self) -> nn.Embedding:
        return self._source[0]

    @property
    def weight(self) -> torch.Tensor:
        """The effective table E_G + E_delta (gradients reach E_delta only)."""
        return self.source.weight.detach() + self.delta

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        base = F.embedding(ids, self.source.weight.detach(), self.padding_idx)
        return base + F.embedding(ids, self.delta, self.padding_idx)

    def folded(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        with torch.no_grad():
            emb.weight.copy_(self.weight)
        return emb


def share_embeddings(generator, discriminator, mode: str) -> None:
    """Wire the discriminator's word embeddings to the generator's according to `mode`."""
    g_emb = generator.deberta.embeddings
    d_emb = discriminator.deberta.embeddings
    if mode == "none":
        return
    if g_emb.word_embeddings.weight.shape != d_emb.word_embeddings.weight.shape:
        raise ValueError(
            f"embedding_sharing={mode} needs equal embedding tables, got generator "
            f"{tuple(g_emb.word_embeddings.weight.shape)} vs discriminator {tuple(d_emb.word_embeddings.weight.shape)}"
            " (set the generator's embedding_size to the discriminator's)"
        )
    if mode == "shared":
        d_emb.word_embeddings = g_emb.word_embeddings
    elif mode == "gdes":
        d_emb.word_embeddings = GDESEmbedding(g_emb.word_embeddings)
    else:
        raise ValueError(f"embedding_sharing={mode!r}: expected gdes, shared or none")


def reshare_embeddings(generator, discriminator, mode: str) -> None:
    """Share again the tables of an exported pair without changing what either model computes.

    gdes: E_delta := E_D - E_G (the export folded E_G + E_delta into E_D). shared: the discriminator
    takes the generator's table, which is only function-preserving if the pair was trained "shared"
    (then both tables are equal); a difference is reported. none: nothing to do."""
    if mode == "none":
        return
    d_weight = discriminator.deberta.embeddings.word_embeddings.weight.detach().clone()
    share_embeddings(generator, discriminator, mode)
    d_emb = discriminator.deberta.embeddings.word_embeddings
    if mode == "gdes":
        with torch.no_grad():
            d_emb.delta.copy_(d_weight - d_emb.source.weight)
    elif not torch.equal(d_weight, d_emb.weight):
        import logging

        diff = (d_weight - d_emb.weight).abs().max().item()
        logging.getLogger(__name__).warning(
            "embedding_sharing=shared: the discriminator's table differed from the generator's (max |diff| %.3g); "
            "it now uses the generator's (use gdes to keep the discriminator's own table)", diff)


def unshare(discriminator) -> None:
    """Give the discriminator a plain, independent embedding table (GDES folded; shared copied)."""
    d_emb = discriminator.deberta.embeddings
    w = d_emb.word_embeddings
    if isinstance(w, GDESEmbedding):
        d_emb.word_embeddings = w.folded()
    else:
        new = nn.Embedding(*w.weight.shape, padding_idx=w.padding_idx)
        with torch.no_grad():
            new.weight.copy_(w.weight)
        d_emb.word_embeddings = new
