"""R3F: random-noise regularisation of the embeddings, L + lambda KL_sym(f(x), f(x + z)).

Paper: Aghajanyan et al. 2021, "Better Fine-Tuning by Reducing Representational Collapse", ICLR,
arXiv:2008.03156. Official code: fairseq `examples/rxf/rxf_src/sentence_prediction_r3f.py`. Defaults are
fairseq's: r3f_lambda 1, eps 1e-5, uniform noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vegalm.config import ConfigError
from vegalm.finetune.tricks.base import logits_of, register_trick, unwrap
from vegalm.finetune.tricks.perturb import EmbeddingAdversary, check_positive, smoothness, token_mask


@dataclass
class R3FArgs:
    r3f_lambda: float = field(default=1.0, metadata={"help": "weight of the KL term (paper: 0.1, 0.5, 1 or 5)"})
    eps: float = field(default=1e-5, metadata={"help": "noise scale: std (normal) or half-width (uniform)"})
    noise_type: str = field(default="uniform", metadata={"help": "uniform or normal"})

    def __post_init__(self) -> None:
        check_positive("r3f.r3f_lambda", self.r3f_lambda, allow_zero=True)
        check_positive("r3f.eps", self.eps)
        if self.noise_type not in ("normal", "uniform"):
            raise ConfigError(f"r3f.noise_type={self.noise_type!r}: expected 'normal' or 'uniform'")


@register_trick
class R3F(EmbeddingAdversary):
    """z ~ N(0, eps^2 I) or U(-eps, eps) on the real tokens, one extra forward, no ascent."""

    name = "r3f"
    Args = R3FArgs

    def loss(self, model, batch, out, loss, state):
        a, net = self.args, unwrap(model)
        clean = logits_of(out)
        emb = self.embed(net, batch)
        mask = token_mask(batch, emb)
        if a.noise_type == "normal":
            z = torch.randn(emb.shape, device=emb.device) * a.eps
        else:
            z = (torch.rand(emb.shape, device=emb.device) * 2 - 1) * a.eps
        z = z * mask
        self.last_delta = z
        noised = self.forward_embeds(net, batch, self.add(emb, z))
        reg = smoothness(noised, clean, self.regression)
        return loss + a.r3f_lambda * reg, {"r3f/kl": float(reg.detach())}
