"""Adversarial / noise-based fine-tuning on the input embeddings: SMART, FreeLB, R3F, SiFT, and "adv".

All four share one mechanism: look up the word embeddings, `x = model.get_input_embeddings()(input_ids)`,
and run extra forwards with `inputs_embeds = x + delta` (plus the batch's attention_mask /
token_type_ids), so they work with our encoder and with any transformers sequence classifier. The
divergences are computed in fp32 with autocast off. The perturbation of the latest step is kept in
`trick.last_delta` (fp32, the unit its bound is stated in) for inspection and tests.

    trick = TRICKS["smart"](SMART.Args(), TASKS["rte"], num_labels=2); trick.setup(model)
    loss, logs = trick.loss(model, batch, model(**model_inputs(batch)), ce)   # ce + lambda_s R + mu D

Per method (paper; bound on delta; what is added to the loss):
  smart   Jiang et al. 2020, arXiv:1911.03437; ||delta||_inf <= eps per example;
          lambda_s R_s + mu D_Breg (EMA teacher)
  freelb  Zhu et al. 2020, arXiv:1909.11764; ||delta||_2 <= adv_max_norm, else adv_init_mag + (K-1) adv_lr;
          swaps the clean task loss for the mean over the K perturbed ones
  r3f     Aghajanyan et al. 2021, arXiv:2008.03156; uniform ||z||_inf <= eps, normal std eps;
          r3f_lambda KL_sym(f(x), f(x+z))
  sift    He et al. 2021, arXiv:2006.03654 (DeBERTa); ||delta||_inf <= 2 init + K lr in normalised units;
          vat_lambda KL_sym

Precision note: eps = 1e-5 (SMART, R3F) is far below bf16 resolution; under bf16 autocast the first
matmul rounds such a perturbation away and the regulariser mostly measures dropout noise. SiFT's
perturbation (1e-2 of a unit-variance vector) survives bf16. See docs/tricks.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vegalm.config import ConfigError, from_dict
from vegalm.finetune.tricks.base import (
    CLEAN_WEIGHT,
    Trick,
    clean_weight,
    logits_of,
    model_inputs,
    register_trick,
    task_loss,
    unwrap,
)
from vegalm.finetune.tricks.craft import EMAWeights

_TINY = 1e-30  # guards a norm of exactly zero; above fp32's smallest normal (1.2e-38)


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


# ------------------------------------------------------------------------------------------ shared mechanics


def _token_mask(batch: dict, emb: torch.Tensor) -> torch.Tensor:
    """[B, L, 1] fp32 mask of real tokens: the perturbation is zero on padding."""
    am = batch.get("attention_mask")
    if am is None:
        return torch.ones(emb.shape[:2] + (1,), device=emb.device)
    return am.to(device=emb.device, dtype=torch.float32).unsqueeze(-1)


def _l2(x: torch.Tensor) -> torch.Tensor:
    """Per-example l2 norm over (tokens, hidden), shaped [B, 1, 1]."""
    return x.flatten(1).norm(dim=1).view(-1, 1, 1)


def _linf(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).abs().amax(dim=1).view(-1, 1, 1)


def _direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    """The ascent direction g / ||g|| (per example), NaN-safe."""
    g = torch.nan_to_num(g.float())
    n = _l2(g) if norm == "l2" else _linf(g)
    return g / n.clamp_min(_TINY)


def _project(delta: torch.Tensor, radius: float, norm: str) -> torch.Tensor:
    """Euclidean projection onto the per-example ball ||delta|| <= radius."""
    if norm == "linf":
        return delta.clamp(-radius, radius)
    n = _l2(delta)
    return delta * torch.where(n > radius, radius / n.clamp_min(_TINY), torch.ones_like(n))


def _check_norm(name: str, norm: str) -> None:
    if norm not in ("l2", "linf"):
        raise ConfigError(f"{name}: norm {norm!r}, expected 'l2' or 'linf'")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero) or not math.isfinite(value):
        raise ConfigError(f"{key}={value}: expected a {'non-negative' if allow_zero else 'positive'} number")


class _EmbeddingAdversary(Trick):
    """Embedding lookup and `inputs_embeds` forwards shared by the four methods."""

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
    def _add(emb: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return emb + delta.to(emb.dtype)


# ------------------------------------------------------------------------------------------ SMART


@dataclass
class SMARTArgs:
    lambda_s: float = 1.0  # weight of the smoothness regulariser; the paper searches {1, 3, 5}
    eps: float = 1e-5  # perturbation radius epsilon (l_inf ball)
    sigma: float = 1e-5  # std of the Gaussian noise the ascent starts from
    eta: float = 1e-3  # ascent step size (on the normalised gradient)
    steps: int = 1  # T_x: ascent steps per update (the paper uses 1)
    norm: str = "linf"  # the paper's projection ball
    mu: float = 1.0  # weight of the Bregman proximal point term; 0 turns the teacher off
    beta: float = 0.99  # teacher momentum for the first `beta_switch` of training ...
    beta_late: float = 0.999  # ... and after it
    beta_switch: float = 0.1

    def __post_init__(self) -> None:
        _positive("smart.lambda_s", self.lambda_s, allow_zero=True)
        _positive("smart.eps", self.eps)
        _positive("smart.sigma", self.sigma, allow_zero=True)
        _positive("smart.eta", self.eta)
        _positive("smart.mu", self.mu, allow_zero=True)
        if self.steps < 1:
            raise ConfigError(f"smart.steps={self.steps}: expected >= 1")
        _check_norm("smart.norm", self.norm)
        for key in ("beta", "beta_late", "beta_switch"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"smart.{key}={getattr(self, key)}: expected a number in [0, 1]")


@register_trick
class SMART(_EmbeddingAdversary):
    """Smoothness-inducing adversarial regularisation + momentum Bregman proximal point (Jiang et al. 2020).

    F(theta) = L(theta) + lambda_s R_s(theta) + mu D_Breg(theta, theta~), where
      R_s = mean_i max_{||x~_i - x_i||_inf <= eps} l_s(f(x~_i; theta), f(x_i; theta)), approximated by
            x~ = x + N(0, sigma^2), then `steps` times x~ <- Proj_eps(x~ + eta g / ||g||_inf),
            g = grad_x~ l_s(f(x~), stopgrad f(x));
      D    = mean_i l_s(f(x_i; theta), f(x_i; theta~)), theta~ the momentum teacher
            theta~ <- beta theta~ + (1 - beta) theta after each step;
      l_s  = symmetric KL for classification, squared error for regression.
    """

    name = "smart"
    Args = SMARTArgs

    def __init__(self, args: Any = None, task_spec: Any = None, num_labels: int = 2):
        super().__init__(args, task_spec, num_labels)
        self.teacher: EMAWeights | None = None

    def setup(self, model: nn.Module) -> None:
        # theta~_0 = theta_0: the teacher starts as a copy of the model being fine-tuned.
        self.teacher = EMAWeights(model, self.args.beta, warmup=False) if self.args.mu > 0 else None

    def loss(self, model, batch, out, loss):
        a, net = self.args, unwrap(model)
        if self.teacher is None and a.mu > 0:
            self.setup(model)
        clean = logits_of(out)
        emb = self.embed(net, batch)
        mask = _token_mask(batch, emb)
        delta = torch.randn(emb.shape, device=emb.device) * a.sigma * mask
        for _ in range(a.steps):
            delta.requires_grad_(True)
            adv = self.forward_embeds(net, batch, self._add(emb.detach(), delta))
            (g,) = torch.autograd.grad(smoothness(adv, clean.detach(), self.regression), delta)
            delta = (_project(delta.detach() + a.eta * _direction(g, a.norm), a.eps, a.norm) * mask).detach()
        self.last_delta = delta
        adv = self.forward_embeds(net, batch, self._add(emb, delta))
        reg = smoothness(adv, clean, self.regression)
        total = loss + a.lambda_s * reg
        logs = {"smart/smooth": float(reg.detach())}
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = logits_of(self.teacher.module(**model_inputs(batch)))
            breg = smoothness(clean, t_logits, self.regression)
            total = total + a.mu * breg
            logs["smart/bregman"] = float(breg.detach())
        return total, logs

    def on_step_end(self, model, step, max_steps):
        if self.teacher is not None:
            a = self.args
            beta = a.beta if step <= a.beta_switch * max_steps else a.beta_late
            self.teacher.update(model, decay=beta)

    def state_dict(self):
        return {"teacher": self.teacher.state_dict()} if self.teacher is not None else {}

    def load_state_dict(self, state):
        if state.get("teacher") is not None and self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])


# ------------------------------------------------------------------------------------------ FreeLB


@dataclass
class FreeLBArgs:
    adv_steps: int = 2  # K ascent steps (the official GLUE scripts use 2-3)
    adv_lr: float = 0.1  # ascent step size alpha, on the l2-normalised gradient
    adv_init_mag: float = 0.1  # ||delta_0||_2 <= adv_init_mag (uniform init scaled by 1/sqrt(tokens*hidden))
    adv_max_norm: float = 0.0  # projection radius epsilon; 0 = no projection (the official scripts' usual value)
    norm_type: str = "l2"
    clean_weight: float = 0.0  # share of the clean loss kept; 0 = the paper (only the K perturbed losses)

    def __post_init__(self) -> None:
        if self.adv_steps < 1:
            raise ConfigError(f"freelb.adv_steps={self.adv_steps}: expected >= 1")
        _positive("freelb.adv_lr", self.adv_lr, allow_zero=True)
        _positive("freelb.adv_init_mag", self.adv_init_mag, allow_zero=True)
        _positive("freelb.adv_max_norm", self.adv_max_norm, allow_zero=True)
        _check_norm("freelb.norm_type", self.norm_type)
        if not 0.0 <= self.clean_weight <= 1.0:
            raise ConfigError(f"freelb.clean_weight={self.clean_weight}: expected a number in [0, 1]")


@register_trick
class FreeLB(_EmbeddingAdversary):
    """Free Large-Batch adversarial training (Zhu et al. 2020).

    min_theta (1/K) sum_{t=0}^{K-1} L(f(x + delta_t), y), delta_0 ~ U scaled to ||delta_0|| <= adv_init_mag,
    delta_{t+1} = Proj_{adv_max_norm}(delta_t + adv_lr g_t / ||g_t||_2), g_t = grad_delta L(f(x + delta_t), y).
    The parameter gradient is the average over the K ascent steps ("free" accumulation). Here the K
    perturbed graphs are kept and back-propagated by the runner's single backward (no hidden backward
    calls, so loss scaling, gradient accumulation and DDP keep working); the price is K graphs in memory.
    The clean task term of the incoming loss is swapped for these (share `clean_weight` kept).
    """

    name = "freelb"
    Args = FreeLBArgs

    def _init_delta(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.args
        u = (torch.rand(emb.shape, device=emb.device) * 2 - 1) * mask
        if a.norm_type == "l2":
            dims = (mask.flatten(1).sum(1) * emb.shape[-1]).clamp_min(1).view(-1, 1, 1)
            return u * (a.adv_init_mag / dims.sqrt())  # every |entry| <= mag/sqrt(dims), so ||delta||_2 <= mag
        return u * a.adv_init_mag

    def loss(self, model, batch, out, loss):
        a, net = self.args, unwrap(model)
        emb = self.embed(net, batch)
        mask = _token_mask(batch, emb)
        delta = self._init_delta(emb, mask)
        if a.adv_max_norm > 0:
            delta = _project(delta, a.adv_max_norm, a.norm_type)
        adv_losses = []
        for t in range(a.adv_steps):
            delta.requires_grad_(True)
            adv_loss = task_loss(self.forward_embeds(net, batch, self._add(emb, delta)), batch, self.num_labels)
            adv_losses.append(adv_loss)
            self.last_delta = delta.detach()
            if t == a.adv_steps - 1:
                break
            (g,) = torch.autograd.grad(adv_loss, delta, retain_graph=True)
            step = _direction(g, "l2") if a.norm_type == "l2" else torch.sign(torch.nan_to_num(g.float()))
            delta = delta.detach() + a.adv_lr * step * mask
            if a.adv_max_norm > 0:
                delta = _project(delta, a.adv_max_norm, a.norm_type)
            delta = delta.detach()
        adv_mean = torch.stack(adv_losses).mean()
        w = clean_weight(batch)
        shift = w * (1.0 - a.clean_weight)
        total = loss - shift * task_loss(logits_of(out), batch, self.num_labels) + shift * adv_mean
        batch[CLEAN_WEIGHT] = w * a.clean_weight
        return total, {"freelb/adv_loss": float(adv_mean.detach())}


# ------------------------------------------------------------------------------------------ R3F


@dataclass
class R3FArgs:
    r3f_lambda: float = 1.0  # weight of the KL term (fairseq default; the paper searches {0.1, 0.5, 1, 5})
    eps: float = 1e-5  # noise scale: std (normal) or half-width (uniform)
    noise_type: str = "uniform"  # fairseq's default; "normal" also in the paper

    def __post_init__(self) -> None:
        _positive("r3f.r3f_lambda", self.r3f_lambda, allow_zero=True)
        _positive("r3f.eps", self.eps)
        if self.noise_type not in ("normal", "uniform"):
            raise ConfigError(f"r3f.noise_type={self.noise_type!r}: expected 'normal' or 'uniform'")


@register_trick
class R3F(_EmbeddingAdversary):
    """Random noise regularisation (Aghajanyan et al. 2021): L + r3f_lambda KL_sym(f(x) || f(x + z)).

    z ~ N(0, eps^2 I) or U(-eps, eps), one extra forward, no ascent.
    """

    name = "r3f"
    Args = R3FArgs

    def loss(self, model, batch, out, loss):
        a, net = self.args, unwrap(model)
        clean = logits_of(out)
        emb = self.embed(net, batch)
        mask = _token_mask(batch, emb)
        if a.noise_type == "normal":
            z = torch.randn(emb.shape, device=emb.device) * a.eps
        else:
            z = (torch.rand(emb.shape, device=emb.device) * 2 - 1) * a.eps
        z = z * mask
        self.last_delta = z
        noised = self.forward_embeds(net, batch, self._add(emb, z))
        reg = smoothness(noised, clean, self.regression)
        return loss + a.r3f_lambda * reg, {"r3f/kl": float(reg.detach())}


# ------------------------------------------------------------------------------------------ SiFT


@dataclass
class SIFTArgs:
    vat_lambda: float = 5.0  # weight of the adversarial loss (DeBERTa-v3 small/large SiFT scripts; 3 for xsmall)
    vat_learning_rate: float = 1e-4  # ascent step on the per-token l_inf-normalised gradient
    vat_init_perturbation: float = 1e-2  # delta_0 ~ N(0, init^2) clipped to +-2 init
    steps: int = 1  # ascent steps (DeBERTa's AdversarialLearner does one)

    def __post_init__(self) -> None:
        _positive("sift.vat_lambda", self.vat_lambda, allow_zero=True)
        _positive("sift.vat_learning_rate", self.vat_learning_rate, allow_zero=True)
        _positive("sift.vat_init_perturbation", self.vat_init_perturbation)
        if self.steps < 1:
            raise ConfigError(f"sift.steps={self.steps}: expected >= 1")


@register_trick
class SIFT(_EmbeddingAdversary):
    """Scale-invariant fine-tuning (He et al. 2021, DeBERTa section 4.3).

    The perturbation lives on the normalised word embeddings n = (x - mean(x)) / std(x) (per token, as a
    LayerNorm without affine): DeBERTa feeds n + delta to the embedding LayerNorm. We apply it through
    `inputs_embeds = x + std(x) * delta`; since LayerNorm ignores a per-token shift and scale,
    LN(x + std(x) delta) = LN(n + delta), the same input DeBERTa's hook produces, for our encoder (whose
    embedding LayerNorm sees the word embeddings alone), and a scale-invariant perturbation for any other
    encoder. As in DeBERTa, x is detached in the perturbed branch (the term trains the network, not the
    embedding table). One ascent step on KL_sym against the detached clean logits, then
    vat_lambda * KL_sym(f(perturbed), f(x)) is added.
    """

    name = "sift"
    Args = SIFTArgs

    def loss(self, model, batch, out, loss):
        a, net = self.args, unwrap(model)
        clean = logits_of(out)
        emb = self.embed(net, batch).detach()
        mask = _token_mask(batch, emb)
        # 1e-7: the LayerNorm epsilon of DeBERTa's SiFT normaliser.
        std = (emb.float().var(dim=-1, unbiased=False, keepdim=True) + 1e-7).sqrt()
        init = a.vat_init_perturbation
        delta = (torch.randn(emb.shape, device=emb.device) * init).clamp(-2 * init, 2 * init) * mask
        for _ in range(a.steps):
            delta.requires_grad_(True)
            adv = self.forward_embeds(net, batch, self._add(emb, std * delta))
            (g,) = torch.autograd.grad(smoothness(adv, clean.detach(), self.regression), delta)
            g = torch.nan_to_num(g.float())
            step = g / g.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY)  # per-token l_inf normalisation
            delta = (delta.detach() + a.vat_learning_rate * step * mask).detach()
        self.last_delta = delta
        adv = self.forward_embeds(net, batch, self._add(emb, std * delta))
        reg = smoothness(adv, clean, self.regression)
        return loss + a.vat_lambda * reg, {"sift/kl": float(reg.detach())}


# ------------------------------------------------------------------------------------------ umbrella

METHODS: dict[str, type[_EmbeddingAdversary]] = {"smart": SMART, "freelb": FreeLB, "r3f": R3F, "sift": SIFT}


@dataclass
class AdvArgs:
    # SiFT by default: it is DeBERTa's own adversarial fine-tuning (made for its 1.5B model, the closest
    # relative of Vega's 1.3B disentangled-attention encoder), its perturbation is relative to the
    # embedding scale and survives bf16, and it needs no teacher copy. See docs/tricks.md.
    method: str = "sift"
    params: dict[str, Any] = field(default_factory=dict)  # the chosen method's Args, e.g. {"vat_lambda": 3}

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"adv.method={self.method!r}: expected one of {', '.join(METHODS)}")
        self.params = dict(self.params)
        try:
            from_dict(METHODS[self.method].Args, self.params)
        except ConfigError as e:
            raise ConfigError(f"adv.params: {e}") from None


@register_trick
class Adversarial(Trick):
    """`--tricks adv`: the adversarial method named by `method`, configured by `params`."""

    name = "adv"
    Args = AdvArgs
    priority = 50

    def __init__(self, args: Any = None, task_spec: Any = None, num_labels: int = 2):
        super().__init__(args, task_spec, num_labels)
        cls = METHODS[self.args.method]
        self.inner = cls(from_dict(cls.Args, self.args.params), task_spec, num_labels)

    @property
    def last_delta(self) -> torch.Tensor | None:
        return self.inner.last_delta

    def setup(self, model):
        self.inner.setup(model)

    def loss(self, model, batch, out, loss):
        return self.inner.loss(model, batch, out, loss)

    def on_step_end(self, model, step, max_steps):
        self.inner.on_step_end(model, step, max_steps)

    def eval_model(self, model):
        return self.inner.eval_model(model)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)
