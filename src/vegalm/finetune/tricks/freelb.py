"""FreeLB: free large-batch adversarial training on the word embeddings.

Paper: Zhu et al. 2020, "FreeLB: Enhanced Adversarial Training for Natural Language Understanding", ICLR,
arXiv:1909.11764 (Algorithm 1). Official code: github.com/zhuchen03/FreeLB (`huggingface-transformers/
examples/run_glue_freelb.py`). We follow the official code's perturbation of the word embeddings, its init
(uniform, scaled to ||delta_0||_2 <= adv_init_mag; U(-mag, mag) for linf) and its steps: g/||g||_2, or
g/||g||_inf for linf (not sign(g)), per example. As the paper (section 3.2, "When adversarial training meets
dropout"), the K ascent steps share one dropout mask (the RNG is replayed before each perturbed forward).
Departure: the K graphs are kept for the runner's one backward instead of K backward calls (same gradient).
Defaults: K = 2 ascent steps (the official GLUE scripts use 2-3), step 0.1, init magnitude 0.1, no
projection (adv_max_norm 0, their usual value), l2 norm, no clean loss kept. The perturbed losses are task
losses, not a divergence against the clean pass, so FreeLB has no R-Drop term of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vegalm.config import ConfigError
from vegalm.finetune.tricks.base import logits_of, register_trick, task_loss, unwrap
from vegalm.finetune.tricks.perturb import DropoutReplay, EmbeddingAdversary, check_norm, check_positive, direction, project


@dataclass
class FreeLBArgs:
    adv_steps: int = field(default=2, metadata={"help": "K ascent steps, each one perturbed loss"})
    adv_lr: float = field(default=0.1, metadata={"help": "ascent step size alpha on the normalised gradient"})
    adv_init_mag: float = field(default=0.1, metadata={"help": "||delta_0|| <= adv_init_mag (uniform init)"})
    adv_max_norm: float = field(default=0.0, metadata={"help": "projection radius epsilon; 0 = no projection"})
    norm_type: str = field(default="l2", metadata={"help": "l2, or linf (steps g/||g||_inf)"})
    clean_weight: float = field(default=0.0, metadata={"help": "share of the clean loss kept; 0 = the paper"})

    def __post_init__(self) -> None:
        if self.adv_steps < 1:
            raise ConfigError(f"freelb.adv_steps={self.adv_steps}: expected >= 1")
        check_positive("freelb.adv_lr", self.adv_lr, allow_zero=True)
        check_positive("freelb.adv_init_mag", self.adv_init_mag, allow_zero=True)
        check_positive("freelb.adv_max_norm", self.adv_max_norm, allow_zero=True)
        check_norm("freelb.norm_type", self.norm_type)
        if not 0.0 <= self.clean_weight <= 1.0:
            raise ConfigError(f"freelb.clean_weight={self.clean_weight}: expected a number in [0, 1]")


@register_trick
class FreeLB(EmbeddingAdversary):
    """min_theta (1/K) sum_{t<K} L(f(x + delta_t), y), delta_0 ~ U scaled to ||delta_0|| <= adv_init_mag,
    delta_{t+1} = Proj_{adv_max_norm}(delta_t + adv_lr g_t / ||g_t||), g_t = grad_delta L(f(x + delta_t), y),
    every f(x + delta_t) with the same dropout mask.

    The K perturbed graphs are kept and back-propagated by the runner's single backward (no hidden backward
    calls, so loss scaling, gradient accumulation and DDP keep working); the price is K graphs in memory.
    The clean task term of the incoming loss is swapped for them (share `clean_weight` kept).
    """

    name = "freelb"
    Args = FreeLBArgs
    revision = 2  # 2: one dropout mask for the K steps; linf steps g/||g||_inf (was sign(g))

    def _init_delta(self, shape: tuple[int, ...], mask: torch.Tensor) -> torch.Tensor:
        a = self.args
        u = (torch.rand(shape, device=mask.device) * 2 - 1) * mask
        if a.norm_type == "l2":
            dims = (mask.flatten(1).sum(1) * shape[-1]).clamp_min(1).view(-1, 1, 1)
            return u * (a.adv_init_mag / dims.sqrt())  # every |entry| <= mag/sqrt(dims), so ||delta||_2 <= mag
        return u * a.adv_init_mag

    def loss(self, model, batch, out, loss, state):
        a, net = self.args, unwrap(model)
        targets = state.targets(batch)
        mask = self.mask(net, batch)
        delta = self._init_delta(self.delta_shape(net, batch), mask)
        if a.adv_max_norm > 0:
            delta = project(delta, a.adv_max_norm, a.norm_type)
        masks = DropoutReplay(mask.device)
        adv_losses = []
        for t in range(a.adv_steps):
            delta.requires_grad_(True)
            masks.replay()
            adv_loss = task_loss(self.perturbed(net, batch, delta), targets, self.num_labels)
            adv_losses.append(adv_loss)
            self.last_delta = delta.detach()
            if t == a.adv_steps - 1:
                break
            (g,) = torch.autograd.grad(adv_loss, delta, retain_graph=True)
            self.last_ascent = direction(g, a.norm_type) * mask
            delta = delta.detach() + a.adv_lr * self.last_ascent
            if a.adv_max_norm > 0:
                delta = project(delta, a.adv_max_norm, a.norm_type)
            delta = delta.detach()
        adv_mean = torch.stack(adv_losses).mean()
        w = state.clean_weight
        shift = w * (1.0 - a.clean_weight)
        total = loss - shift * task_loss(logits_of(out), targets, self.num_labels) + shift * adv_mean
        state.clean_weight = w * a.clean_weight
        return total, {"freelb/adv_loss": float(adv_mean.detach())}
