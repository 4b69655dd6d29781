"""SMART: smoothness-inducing adversarial regularisation + a momentum Bregman proximal point teacher.

Paper: Jiang et al. 2020, "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language Models
through Principled Regularized Optimization", ACL, arXiv:1911.03437 (Algorithm 1). Official code: the
authors' mt-dnn (github.com/namisan/mt-dnn, `mt_dnn/perturbation.py`). Defaults are the paper's:
lambda_s 1, eps = sigma = 1e-5 (l_inf ball), eta 1e-3, one ascent step, mu 1, teacher momentum 0.99 for
the first 10% of training, then 0.999.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vegalm.config import ConfigError
from vegalm.finetune.tricks.base import logits_of, model_inputs, register_trick, unwrap
from vegalm.finetune.tricks.perturb import (
    EmbeddingAdversary,
    check_norm,
    check_positive,
    direction,
    project,
    smoothness,
    token_mask,
)
from vegalm.train.ema import EMA


@dataclass
class SMARTArgs:
    lambda_s: float = field(default=1.0, metadata={"help": "weight of the smoothness term R_s (paper: 1, 3 or 5)"})
    eps: float = field(default=1e-5, metadata={"help": "radius of the perturbation ball"})
    sigma: float = field(default=1e-5, metadata={"help": "std of the Gaussian noise the ascent starts from"})
    eta: float = field(default=1e-3, metadata={"help": "ascent step size on the normalised gradient"})
    steps: int = field(default=1, metadata={"help": "ascent steps T_x per update"})
    norm: str = field(default="linf", metadata={"help": "ball of the projection: linf (the paper) or l2"})
    mu: float = field(default=1.0, metadata={"help": "weight of the Bregman proximal term; 0 = no teacher"})
    beta: float = field(default=0.99, metadata={"help": "teacher momentum for the first beta_switch of training"})
    beta_late: float = field(default=0.999, metadata={"help": "teacher momentum after beta_switch"})
    beta_switch: float = field(default=0.1, metadata={"help": "share of training with momentum beta"})

    def __post_init__(self) -> None:
        check_positive("smart.lambda_s", self.lambda_s, allow_zero=True)
        check_positive("smart.eps", self.eps)
        check_positive("smart.sigma", self.sigma, allow_zero=True)
        check_positive("smart.eta", self.eta)
        check_positive("smart.mu", self.mu, allow_zero=True)
        if self.steps < 1:
            raise ConfigError(f"smart.steps={self.steps}: expected >= 1")
        check_norm("smart.norm", self.norm)
        for key in ("beta", "beta_late", "beta_switch"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"smart.{key}={getattr(self, key)}: expected a number in [0, 1]")


@register_trick
class SMART(EmbeddingAdversary):
    """F(theta) = L(theta) + lambda_s R_s(theta) + mu D_Breg(theta, theta~), where
      R_s = mean_i max_{||x~_i - x_i|| <= eps} l_s(f(x~_i; theta), f(x_i; theta)), approximated by
            x~ = x + N(0, sigma^2), then `steps` times x~ <- Proj_eps(x~ + eta g / ||g||),
            g = grad_x~ l_s(f(x~), stopgrad f(x));
      D    = mean_i l_s(f(x_i; theta), f(x_i; theta~)), theta~ <- beta theta~ + (1 - beta) theta per step;
      l_s  = symmetric KL for classification, squared error for regression.
    """

    name = "smart"
    Args = SMARTArgs

    def __init__(self, args: Any = None, task_spec: Any = None, num_labels: int = 2):
        super().__init__(args, task_spec, num_labels)
        self.teacher: EMA | None = None

    def setup(self, model):
        # theta~_0 = theta_0: the teacher starts as a copy of the model being fine-tuned.
        self.teacher = EMA(model, self.args.beta, warmup=False, copy=True) if self.args.mu > 0 else None

    def loss(self, model, batch, out, loss, state):
        a, net = self.args, unwrap(model)
        if self.teacher is None and a.mu > 0:
            self.setup(model)
        clean = logits_of(out)
        emb = self.embed(net, batch)
        mask = token_mask(batch, emb)
        delta = torch.randn(emb.shape, device=emb.device) * a.sigma * mask
        for _ in range(a.steps):
            delta.requires_grad_(True)
            adv = self.forward_embeds(net, batch, self.add(emb.detach(), delta))
            (g,) = torch.autograd.grad(smoothness(adv, clean.detach(), self.regression), delta)
            delta = (project(delta.detach() + a.eta * direction(g, a.norm), a.eps, a.norm) * mask).detach()
        self.last_delta = delta
        adv = self.forward_embeds(net, batch, self.add(emb, delta))
        reg = smoothness(adv, clean, self.regression)
        total = loss + a.lambda_s * reg
        logs = {"smart/smooth": float(reg.detach())}
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = logits_of(self.teacher.averaged(model)(**model_inputs(batch)))
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
