"""SiFT: scale-invariant adversarial fine-tuning on the normalised embeddings (DeBERTa's).

Paper: He et al. 2021, "DeBERTa: Decoding-enhanced BERT with Disentangled Attention", ICLR, section 4.3,
arXiv:2006.03654. Official code: github.com/microsoft/DeBERTa, `DeBERTa/sift/sift.py`. We follow
`hook_sift_layer` + `PerturbationLayer` + `AdversarialLearner.loss`:
  * the perturbation replaces the input u of `embeddings.LayerNorm` (the summed word + position + type
    embedding, after our encoder's projection) by LN0(u) + delta, LN0 a LayerNorm without affine weights and
    eps 1e-7; the clean part LN0(u) is detached, as DeBERTa's `self.input.detach()`. On BERT-style backbones
    (MiniLM) this normalises the same sum DeBERTa's hook sees, so delta has its intended size there too;
  * delta_0 ~ N(0, init^2) clipped to +-2 init; one ascent step delta += lr g/||g||_inf per token, g the
    gradient of the symmetric KL against the detached clean logits;
  * the term is vat_lambda x symmetric KL(f(perturbed), f(clean)), gradients into both.
Where we depart: DeBERTa hooks the normaliser into every forward (the clean pass also runs LN(LN0(u)), which
differs from LN(u) only through the epsilons); we hook only the perturbed passes. DeBERTa's symmetric KL is
written as two cross-entropies with detached probabilities; ours is the KL itself (perturb.py), whose value
and gradient differ. Regression (STS-B): DeBERTa's loss is a KL over logits, which for one output is 0; our
extension, `regression: mse`, uses the squared error instead (`regression: off` makes the trick a no-op).
Our default step is 0.15, not DeBERTa's 1e-4: with 1e-4 against a 1e-2 start, delta is its random start,
and its KL with dropout off was 1.6e-6 on MiniLM-L6 (15 millionths of the two-dropout-pass KL; docs/tricks.md),
so the trick was R-Drop at weight 5. A step of 0.15 gives the ascent the larger share of delta (KL 0.49).
With dropout on, the perturbed pass draws fresh masks (as in DeBERTa), so the KL includes a
dropout-consistency part: `rdrop` measures that part alone. DeBERTa's SiFT scripts also train ~3x the epochs.
Defaults: vat_lambda 5 (the DeBERTa-v3 small/large SiFT scripts; 3 for xsmall), step 0.15 (ours), init 1e-2,
one step, regression mse (ours).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vegalm.config import ConfigError
from vegalm.finetune.tricks.base import logits_of, register_trick, unwrap
from vegalm.finetune.tricks.perturb import EmbeddingAdversary, check_positive, direction, smoothness


@dataclass
class SIFTArgs:
    vat_lambda: float = field(default=5.0, metadata={"help": "weight of the adversarial KL term"})
    # DeBERTa's 1e-4 leaves delta at its 1e-2 start: a KL of 1.6e-6 on MiniLM-L6 with dropout off (docs/tricks.md)
    vat_learning_rate: float = field(default=0.15, metadata={"help": "ascent step on the per-token l_inf-"
                                                                     "normalised gradient (DeBERTa: 1e-4)"})
    vat_init_perturbation: float = field(default=1e-2, metadata={"help": "delta_0 ~ N(0, init^2) clipped to "
                                                                         "+-2 init"})
    steps: int = field(default=1, metadata={"help": "ascent steps (DeBERTa does one)"})
    regression: str = field(default="mse", metadata={"help": "STS-B: mse (our extension: squared error between "
                                                             "the perturbed and clean scores) or off (no-op)"})

    def __post_init__(self) -> None:
        check_positive("sift.vat_lambda", self.vat_lambda, allow_zero=True)
        check_positive("sift.vat_learning_rate", self.vat_learning_rate, allow_zero=True)
        check_positive("sift.vat_init_perturbation", self.vat_init_perturbation)
        if self.steps < 1:
            raise ConfigError(f"sift.steps={self.steps}: expected >= 1")
        if self.regression not in ("mse", "off"):
            raise ConfigError(f"sift.regression={self.regression!r}: expected 'mse' or 'off'")


@register_trick
class SIFT(EmbeddingAdversary):
    """delta lives on n = LN0(u), u the input of the embedding LayerNorm: that LayerNorm sees n + delta.
    One ascent step on KL_sym against the detached clean logits, then vat_lambda * KL_sym(f(n + delta), f(x))
    is added (the squared error for regression, our extension)."""

    name = "sift"
    Args = SIFTArgs
    site = "normalised"
    revision = 2  # 2: delta on the normalised summed embedding (was: on x scaled by the word-embedding std)

    def loss(self, model, batch, out, loss, state):
        a, net = self.args, unwrap(model)
        if self.regression and a.regression == "off":
            return loss, {}
        clean = logits_of(out)
        mask = self.mask(net, batch)
        init = a.vat_init_perturbation
        delta = (torch.randn(self.delta_shape(net, batch), device=mask.device) * init).clamp(-2 * init, 2 * init)
        delta = delta * mask
        for _ in range(a.steps):
            delta.requires_grad_(True)
            adv = self.perturbed(net, batch, delta, detach_input=True)
            (g,) = torch.autograd.grad(smoothness(adv, clean.detach(), self.regression), delta)
            self.last_ascent = direction(g, "linf", per_token=True) * mask  # DeBERTa's g / max|g| per token
            delta = (delta.detach() + a.vat_learning_rate * self.last_ascent).detach()
        self.last_delta = delta
        reg = smoothness(self.perturbed(net, batch, delta, detach_input=True), clean, self.regression)
        return loss + a.vat_lambda * reg, {"sift/kl": float(reg.detach())}
