"""SiFT: scale-invariant adversarial fine-tuning on the normalised word embeddings (DeBERTa's).

Paper: He et al. 2021, "DeBERTa: Decoding-enhanced BERT with Disentangled Attention", ICLR, section 4.3,
arXiv:2006.03654. Official code: github.com/microsoft/DeBERTa, `DeBERTa/sift/sift.py` (AdversarialLearner,
one ascent step). Defaults: vat_lambda 5 (the DeBERTa-v3 small/large SiFT scripts; 3 for xsmall), step
1e-4, init perturbation 1e-2, one step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vegalm.config import ConfigError
from vegalm.finetune.tricks.base import logits_of, register_trick, unwrap
from vegalm.finetune.tricks.perturb import TINY, EmbeddingAdversary, check_positive, smoothness, token_mask


@dataclass
class SIFTArgs:
    vat_lambda: float = field(default=5.0, metadata={"help": "weight of the adversarial KL term"})
    vat_learning_rate: float = field(default=1e-4, metadata={"help": "ascent step on the per-token "
                                                                     "l_inf-normalised gradient"})
    vat_init_perturbation: float = field(default=1e-2, metadata={"help": "delta_0 ~ N(0, init^2) clipped to "
                                                                         "+-2 init"})
    steps: int = field(default=1, metadata={"help": "ascent steps (DeBERTa does one)"})

    def __post_init__(self) -> None:
        check_positive("sift.vat_lambda", self.vat_lambda, allow_zero=True)
        check_positive("sift.vat_learning_rate", self.vat_learning_rate, allow_zero=True)
        check_positive("sift.vat_init_perturbation", self.vat_init_perturbation)
        if self.steps < 1:
            raise ConfigError(f"sift.steps={self.steps}: expected >= 1")


@register_trick
class SIFT(EmbeddingAdversary):
    """The perturbation lives on n = (x - mean(x)) / std(x) per token, applied as `x + std(x) * delta`:
    LayerNorm ignores a per-token shift and scale, so LN(x + std(x) delta) = LN(n + delta), the input
    DeBERTa's hook produces. x is detached in the perturbed branch (the term trains the network, not the
    embedding table). One ascent step on KL_sym against the detached clean logits, then
    vat_lambda * KL_sym(f(perturbed), f(x)) is added.
    """

    name = "sift"
    Args = SIFTArgs

    def loss(self, model, batch, out, loss, state):
        a, net = self.args, unwrap(model)
        clean = logits_of(out)
        emb = self.embed(net, batch).detach()
        mask = token_mask(batch, emb)
        # 1e-7: the LayerNorm epsilon of DeBERTa's SiFT normaliser.
        std = (emb.float().var(dim=-1, unbiased=False, keepdim=True) + 1e-7).sqrt()
        init = a.vat_init_perturbation
        delta = (torch.randn(emb.shape, device=emb.device) * init).clamp(-2 * init, 2 * init) * mask
        for _ in range(a.steps):
            delta.requires_grad_(True)
            adv = self.forward_embeds(net, batch, self.add(emb, std * delta))
            (g,) = torch.autograd.grad(smoothness(adv, clean.detach(), self.regression), delta)
            g = torch.nan_to_num(g.float())
            step = g / g.abs().amax(dim=-1, keepdim=True).clamp_min(TINY)  # per-token l_inf normalisation
            delta = (delta.detach() + a.vat_learning_rate * step * mask).detach()
        self.last_delta = delta
        adv = self.forward_embeds(net, batch, self.add(emb, std * delta))
        reg = smoothness(adv, clean, self.regression)
        return loss + a.vat_lambda * reg, {"sift/kl": float(reg.detach())}
