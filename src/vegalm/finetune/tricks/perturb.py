"""What the embedding-perturbation tricks (smart, freelb, r3f, sift) share: divergences, norms and
projections, and `EmbeddingAdversary`, the base class that runs forwards on `inputs_embeds = x + delta`.

Divergences are computed in fp32 with autocast off. Each trick keeps its latest perturbation in
`trick.last_delta` (fp32, in the unit its bound is stated in) for inspection and tests.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vegalm.config import ConfigError
from vegalm.finetune.tricks.base import Trick, logits_of, model_inputs

TINY = 1e-30  # guards a norm of exactly zero; above fp32's smallest normal (1.2e-38)


# ------------------------------------------------------------------------------------------ divergences


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P||Q) + KL(Q||P) = sum_i (p_i - q_i)(log p_i - log q_i), batch mean, in fp32 with autocast off.

    Symmetric in its arguments by construction and exactly 0 when they are equal. Gradients flow into
    both arguments (detach one to make it a fixed target).
    """
    with torch.autocast(device_type=p_logits.device.type, enabled=False):
        lp = F.log_softmax(p_logits.float(), dim=-1)
        lq = F.log_softmax(q_logits.float(), dim=-1)
        return ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1).mean()


def squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference in fp32: SMART's l_s for regression (STS-B)."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        return (a.float().reshape(a.shape[0], -1) - b.float().reshape(b.shape[0], -1)).pow(2).sum(-1).mean()


def smoothness(a: torch.Tensor, b: torch.Tensor, regression: bool) -> torch.Tensor:
    return squared_error(a, b) if regression else symmetric_kl(a, b)


# ------------------------------------------------------------------------------------------ norms and balls


def token_mask(batch: dict, emb: torch.Tensor) -> torch.Tensor:
    """[B, L, 1] fp32 mask of real tokens: the perturbation is zero on padding."""
    am = batch.get("attention_mask")
    if am is None:
        return torch.ones(emb.shape[:2] + (1,), device=emb.device)
    return am.to(device=emb.device, dtype=torch.float32).unsqueeze(-1)


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-example l2 norm over (tokens, hidden), shaped [B, 1, 1]."""
    return x.flatten(1).norm(dim=1).view(-1, 1, 1)


def linf_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).abs().amax(dim=1).view(-1, 1, 1)


def direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    """The ascent direction g / ||g|| (per example), NaN-safe."""
    g = torch.nan_to_num(g.float())
    n = l2_norm(g) if norm == "l2" else linf_norm(g)
    return g / n.clamp_min(TINY)


def project(delta: torch.Tensor, radius: float, norm: str) -> torch.Tensor:
    """Euclidean projection onto the per-example ball ||delta|| <= radius."""
    if norm == "linf":
        return delta.clamp(-radius, radius)
    n = l2_norm(delta)
    return delta * torch.where(n > radius, radius / n.clamp_min(TINY), torch.ones_like(n))


def check_norm(name: str, norm: str) -> None:
    if norm not in ("l2", "linf"):
        raise ConfigError(f"{name}: norm {norm!r}, expected 'l2' or 'linf'")


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero) or not math.isfinite(value):
        raise ConfigError(f"{key}={value}: expected a {'non-negative' if allow_zero else 'positive'} number")


class EmbeddingAdversary(Trick):
    """Embedding lookup and `inputs_embeds` forwards: works with our encoder and any transformers classifier."""

    priority = 50

    def __init__(self, args: Any = None, task_spec: Any = None, num_labels: int = 2):
        super().__init__(args, task_spec, num_labels)
        self.last_delta: torch.Tensor | None = None

    @staticmethod
    def embed(net: nn.Module, batch: dict) -> torch.Tensor:
        if "input_ids" not in batch:
            raise ValueError("adversarial tricks need batch['input_ids'] to look up the embeddings")
        return net.get_input_embeddings()(batch["input_ids"])

    @staticmethod
    def forward_embeds(net: nn.Module, batch: dict, embeds: torch.Tensor) -> torch.Tensor:
        kw = {k: v for k, v in model_inputs(batch).items() if k != "input_ids"}
        return logits_of(net(inputs_embeds=embeds, **kw))

    @staticmethod
    def add(emb: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return emb + delta.to(emb.dtype)
