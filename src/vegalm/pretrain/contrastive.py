"""Sentence-embedding contrastive loss for phase 2 (unsupervised SimCSE, Gao et al. 2021, arXiv 2104.08821).

Two forward passes of the same segment differ only by dropout; their pooled embeddings form the
positive pair and the other segments of the batch are the negatives:

    loss = CE( cos(z1_i, z2_j) / tau , j = i ),   tau = 0.05 (SimCSE's default)

Under DDP both views are gathered from every process. all_gather has no gradient, so the local
slice of each gathered tensor is replaced by the local tensor (gradients kept for the local part),
and every process computes the loss over the whole global batch (as open_clip does with
gather_with_grad=False): then every term that involves a local vector is computed locally, and
the sum over processes of the local gradients is the single-process gradient. DDP averages
instead of summing, so the backward pass is scaled by the world size while the loss value stays
the global-batch value (`loss + (W-1) * (loss - loss.detach())`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ValueError(f"cl_pooling={how!r}: expected cls or mean")


def gather_keep_local_grad(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather rows of z from every process; returns (gathered, offset of the local rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(z) for _ in range(world)]
    dist.all_gather(parts, z.detach().contiguous())
    parts[rank] = z
    return torch.cat(parts), rank * z.shape[0]


def simcse_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05) -> tuple[torch.Tensor, float]:
    """In-batch InfoNCE on cosine similarity, computed in fp32. Returns (loss, accuracy of the positive)."""
    z1, _ = gather_keep_local_grad(F.normalize(z1.float(), dim=-1))
    z2, _ = gather_keep_local_grad(F.normalize(z2.float(), dim=-1))
    sim = z1 @ z2.t() / temperature  # [B_global, B_global]
    target = torch.arange(z1.shape[0], device=z1.device)
    loss = F.cross_entropy(sim, target)
    acc = (sim.argmax(-1) == target).float().mean().item()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        loss = loss + (world - 1) * (loss - loss.detach())
    return loss, acc


class ProjectionHead(nn.Module):
    """SimCSE's training-only MLP (dense + tanh) over the pooled embedding; not exported."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))
