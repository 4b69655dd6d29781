"""R-Drop: consistency between two dropout passes of the same batch.

Paper: Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks", NeurIPS, arXiv:2106.14448.
Official code: github.com/dropreg/R-Drop (`huggingface_transformer_src`, the GLUE version), which we follow:
a second forward of the batch with fresh dropout masks, the task loss averaged over the two passes,
0.5 (CE_1 + CE_2), plus alpha x 0.5 (KL(P_1||P_2) + KL(P_2||P_1)), per-example KL summed over classes, batch
mean. Regression (STS-B), our extension (the paper has no regression task): 0.5 (MSE_1 + MSE_2) + alpha x the
squared difference of the two scores. Here so that the adversarial tricks' perturbation can be measured apart
from the dropout consistency they also contain (docs/tricks.md). Defaults: alpha 1 (the paper's GLUE search
range is 0.1 to 1), regression on. Cost: one extra forward and its share of the backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vegalm.config import ConfigError
from vegalm.finetune.tricks.base import Trick, logits_of, model_inputs, register_trick, task_loss, unwrap
from vegalm.finetune.tricks.perturb import check_positive, smoothness


@dataclass
class RDropArgs:
    alpha: float = field(default=1.0, metadata={"help": "weight of 0.5 x the symmetric KL of the two passes"})
    regression: str = field(default="mse", metadata={"help": "STS-B: mse (our extension: squared difference of "
                                                             "the two scores) or off (no-op)"})

    def __post_init__(self) -> None:
        check_positive("rdrop.alpha", self.alpha, allow_zero=True)
        if self.regression not in ("mse", "off"):
            raise ConfigError(f"rdrop.regression={self.regression!r}: expected 'mse' or 'off'")


@register_trick
class RDrop(Trick):
    """loss <- loss + w (0.5 (L(f_2) - L(f_1))) + alpha 0.5 l_s(f_1, f_2): the clean task term (weight w in the
    incoming loss) becomes the mean over both passes; f_1 is the runner's clean pass, f_2 a second one."""

    name = "rdrop"
    Args = RDropArgs
    priority = 50

    def loss(self, model, batch, out, loss, state):
        if self.regression and self.args.regression == "off":
            return loss, {}
        first = logits_of(out)
        second = logits_of(unwrap(model)(**model_inputs(batch)))
        targets = state.targets(batch)
        both = 0.5 * (task_loss(second, targets, self.num_labels) - task_loss(first, targets, self.num_labels))
        consistency = 0.5 * smoothness(first, second, self.regression)
        total = loss + state.clean_weight * both + self.args.alpha * consistency
        return total, {"rdrop/kl": float(consistency.detach())}
