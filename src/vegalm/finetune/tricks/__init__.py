"""Fine-tuning tricks as plug-ins: one class per trick, hyperparameters in its `Args` dataclass, each
registered in `TRICKS` (tricks/base.py) by `@register_trick`; importing this package loads them all.

    from vegalm.config import from_dict
    from vegalm.finetune.tricks import TRICKS, sort_tricks
    names = sort_tricks(["adv", "selfcal", "ema"])                  # selfcal, adv, ema
    tricks = [TRICKS[n](from_dict(TRICKS[n].Args, cfg.trick_args.get(n, {})), spec, spec.num_labels)
              for n in names]

Registry names (the CLI's `--tricks` values): adv (umbrella, `method` picks one of the four below),
smart, freelb, r3f, sift, selfcal, ema. See docs/tricks.md for formulas, sources, defaults and costs.
"""

from __future__ import annotations

from vegalm.finetune.tricks.adversarial import (
    METHODS,
    R3F,
    SIFT,
    SMART,
    Adversarial,
    FreeLB,
    smoothness,
    symmetric_kl,
)
from vegalm.finetune.tricks.base import (
    CLEAN_WEIGHT,
    SOFT_TARGETS,
    TRICKS,
    Trick,
    model_inputs,
    register_trick,
    sort_tricks,
    task_loss,
    unwrap,
)
from vegalm.finetune.tricks.craft import (
    EMA,
    EMAWeights,
    ensemble_logits,
    find_layers,
    layerwise_lr_groups,
    reinit_top_layers,
)
from vegalm.finetune.tricks.selfcal import SelfCalibration

__all__ = [
    "CLEAN_WEIGHT",
    "EMA",
    "EMAWeights",
    "METHODS",
    "R3F",
    "SIFT",
    "SMART",
    "SOFT_TARGETS",
    "TRICKS",
    "Adversarial",
    "FreeLB",
    "SelfCalibration",
    "Trick",
    "ensemble_logits",
    "find_layers",
    "layerwise_lr_groups",
    "model_inputs",
    "register_trick",
    "reinit_top_layers",
    "smoothness",
    "sort_tricks",
    "symmetric_kl",
    "task_loss",
    "unwrap",
]
