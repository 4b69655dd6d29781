"""R3F: random-noise regularisation of the embeddings, L + lambda KL_sym(f(x), f(x + z)).

Paper: Aghajanyan et al. 2021, "Better Fine-Tuning by Reducing Representational Collapse", ICLR,
arXiv:2008.03156. Official code: fairseq `examples/rxf/rxf_src/sentence_prediction_r3f.py`, which we follow:
noise on the token embeddings (here `inputs_embeds`), uniform or normal, one extra forward, symmetric KL with
gradients into both sides. Departures: eps defaults to 0.1, not fairseq's 1e-5: with dropout off, 1e-5 gave a
KL of 3e-10 on MiniLM-L6 (issue 17), so the term measured only dropout (R-Drop); 0.1 gave 0.035, a third of
the two-dropout-pass KL (docs/tricks.md). Regression (STS-B) uses the squared error: our extension, fairseq's
R3F is classification-only. With dropout on, the noised pass draws fresh masks (as fairseq's), so the KL
includes a dropout-consistency part: `rdrop` measures that part alone. Defaults: r3f_lambda 1, eps 0.1,
uniform noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vegalm.config import ConfigError
from vegalm.finetune.tricks.base import logits_of, register_trick, unwrap
from vegalm.finetune.tricks.perturb import EmbeddingAdversary, check_positive, smoothness


@dataclass
class R3FArgs:
    r3f_lambda: float = field(default=1.0, metadata={"help": "weight of the KL term (paper: 0.1, 0.5, 1 or 5)"})
    eps: float = field(default=0.1, metadata={"help": "noise scale on the word embeddings: std (normal) or "
                                                      "half-width (uniform); fairseq: 1e-5"})
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
    revision = 2  # 2: default eps 0.1 (was fairseq's 1e-5)

    def loss(self, model, batch, out, loss, state):
        a, net = self.args, unwrap(model)
        clean = logits_of(out)
        mask = self.mask(net, batch)
        shape = self.delta_shape(net, batch)
        if a.noise_type == "normal":
            z = torch.randn(shape, device=mask.device) * a.eps
        else:
            z = (torch.rand(shape, device=mask.device) * 2 - 1) * a.eps
        z = z * mask
        self.last_delta = z
        reg = smoothness(self.perturbed(net, batch, z), clean, self.regression)
        return loss + a.r3f_lambda * reg, {"r3f/kl": float(reg.detach())}
