"""What the embedding-perturbation tricks (smart, freelb, r3f, sift) share: divergences, norms and
projections, and `EmbeddingAdversary`, the base class that runs forwards with a perturbation at one of three
sites of the embedding layer:

  "word"        inputs_embeds = E[input_ids] + delta (FreeLB, R3F: the word embeddings, as their official code)
  "normalised"  the input u of `embeddings.LayerNorm` replaced by LN0(u) + delta, LN0 a LayerNorm without
                affine weights (SiFT: DeBERTa's `hook_sift_layer`); u is the summed word + position + type embedding
  "output"      the embedding module's output (after its LayerNorm and dropout) + delta (SMART: mt-dnn's
                `embed_encode` output)

The two inner sites are reached by a forward hook on the module that owns `get_input_embeddings()` (HF BERT's
`embeddings`, our `Embeddings`); the hook lives only for that forward. delta is fp32 and is added in fp32
before the result is cast back; divergences are computed in fp32 with autocast off. Each trick keeps its
latest perturbation in `trick.last_delta` (fp32, in the unit its bound is stated in) and the latest ascent
direction in `trick.last_ascent` (None for R3F) for inspection and tests (tests/test_tricks_perturbation.py).
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


def direction(g: torch.Tensor, norm: str, per_token: bool = False) -> torch.Tensor:
    """g / ||g||, per example (over tokens and hidden) or `per_token` (over hidden), NaN-safe, fp32."""
    g = torch.nan_to_num(g.float())
    if per_token:
        n = g.norm(dim=-1, keepdim=True) if norm == "l2" else g.abs().amax(dim=-1, keepdim=True)
    else:
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


class DropoutReplay:
    """The RNG state at construction, restored by `replay()`: forwards started after each replay draw the same
    dropout masks (FreeLB's ascent steps share one mask, as its paper's Algorithm 1)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def replay(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def embedding_modules(net: nn.Module) -> tuple[nn.Module, nn.LayerNorm]:
    """(the module that owns `get_input_embeddings()`, its LayerNorm): HF BERT-style and our encoder."""
    word = net.get_input_embeddings()
    for _, module in net.named_modules():
        if any(child is word for child in module.children()):
            norm = getattr(module, "LayerNorm", None) or getattr(module, "layer_norm", None)
            if isinstance(norm, nn.LayerNorm):
                return module, norm
            break
    raise ValueError(f"{type(net).__name__}: no LayerNorm beside its input embeddings (needed by the "
                     "'normalised' and 'output' perturbation sites)")


def normalise(u: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine weights, in fp32; 1e-7 is the epsilon of DeBERTa's SiFT normaliser."""
    return F.layer_norm(u.float(), u.shape[-1:], eps=1e-7)


SITES = ("word", "normalised", "output")


class EmbeddingAdversary(Trick):
    """Perturbed forwards at `site` (see the module docstring); works with our encoder and any transformers
    classifier whose word embeddings sit beside the embedding LayerNorm."""

    priority = 50
    site = "word"

    def __init__(self, args: Any = None, task_spec: Any = None, num_labels: int = 2):
        super().__init__(args, task_spec, num_labels)
        self.last_delta: torch.Tensor | None = None
        self.last_ascent: torch.Tensor | None = None

    def delta_shape(self, net: nn.Module, batch: dict) -> tuple[int, int, int]:
        """[B, L, width] of the perturbed tensor: the word-embedding width, or the hidden size after it."""
        if "input_ids" not in batch:
            raise ValueError("adversarial tricks need batch['input_ids']")
        b, length = batch["input_ids"].shape
        if self.site == "word":
            return b, length, net.get_input_embeddings().embedding_dim
        return b, length, embedding_modules(net)[1].normalized_shape[-1]

    def mask(self, net: nn.Module, batch: dict) -> torch.Tensor:
        """[B, L, 1] fp32 mask of real tokens on the parameters' device."""
        like = net.get_input_embeddings().weight
        return token_mask(batch, like)

    def perturbed(self, net: nn.Module, batch: dict, delta: torch.Tensor, detach_input: bool = False) -> torch.Tensor:
        """Logits of the forward with `delta` at `site`; `detach_input` stops the gradient into the clean part
        of the perturbed tensor (SiFT: DeBERTa detaches its normalised input)."""
        inputs = model_inputs(batch)

        def plus(x: torch.Tensor) -> torch.Tensor:
            x = x.detach() if detach_input else x
            return (x.float() + delta).to(x.dtype)

        if self.site == "word":
            emb = net.get_input_embeddings()(inputs.pop("input_ids"))
            return logits_of(net(inputs_embeds=plus(emb), **inputs))
        emb_module, norm = embedding_modules(net)
        if self.site == "normalised":
            handle = norm.register_forward_pre_hook(lambda _m, args: (plus(normalise(args[0])).to(args[0].dtype),))
        else:
            handle = emb_module.register_forward_hook(lambda _m, _args, out: plus(out))
        try:
            return logits_of(net(**inputs))
        finally:
            handle.remove()
