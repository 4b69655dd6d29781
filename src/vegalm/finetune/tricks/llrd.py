"""`--tricks llrd`: layer-wise learning-rate decay, lr * decay^(depth from the top) per parameter group.

Paper: Clark et al. 2020, "ELECTRA: Pre-training Text Encoders as Discriminators Rather Than Generators",
ICLR, arXiv:2003.10555 (appendix, fine-tuning). Official code: google-research/electra
`model/optimization.py` (`_get_layer_lrs`). The groups are vegalm.train.optim.layerwise_lr_groups with
finetune.models.layer_id, what `layerwise_lr_decay` computes. Default decay 0.8 (ELECTRA small and base).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vegalm.config import ConfigError
from vegalm.finetune.models import layer_id
from vegalm.finetune.tricks.base import Trick, register_trick, unwrap
from vegalm.train.optim import layerwise_lr_groups


@dataclass
class LLRDArgs:
    decay: float = field(default=0.8, metadata={"help": "lr factor per layer down from the head, in (0, 1] "
                                                        "(ELECTRA: 0.8 small/base, 0.9 large)"})

    def __post_init__(self) -> None:
        if not 0.0 < self.decay <= 1.0:
            raise ConfigError(f"llrd.decay={self.decay}: expected 0 < decay <= 1")


@register_trick
class LLRD(Trick):
    name = "llrd"
    Args = LLRDArgs

    def param_groups(self, model, lr, weight_decay):
        return layerwise_lr_groups(unwrap(model), lr, self.args.decay, layer_id, weight_decay=weight_decay)
