"""Fine-tuning tricks as plug-ins: one file per trick, registered in `TRICKS` (base.py) by `@register_trick`;
importing this package loads them all. The contract and each trick's sources and costs: docs/tricks.md.

Registry names (the `--tricks` values): adv (umbrella over smart, freelb, r3f, sift), smart, freelb, r3f,
sift, rdrop, selfcal, ema, llrd, reinit.
"""

from __future__ import annotations

from vegalm.finetune.tricks.adv import METHODS, Adversarial
from vegalm.finetune.tricks.base import (
    TRICKS,
    LossState,
    Trick,
    changes_eval_model,
    model_inputs,
    register_trick,
    sort_tricks,
    task_loss,
    trick_param_groups,
    unwrap,
)
from vegalm.finetune.tricks.ema import EMATrick
from vegalm.finetune.tricks.freelb import FreeLB
from vegalm.finetune.tricks.llrd import LLRD
from vegalm.finetune.tricks.objective import build_objective
from vegalm.finetune.tricks.perturb import smoothness, symmetric_kl
from vegalm.finetune.tricks.r3f import R3F
from vegalm.finetune.tricks.rdrop import RDrop
from vegalm.finetune.tricks.reinit import Reinit
from vegalm.finetune.tricks.selfcal import SelfCalibration
from vegalm.finetune.tricks.sift import SIFT
from vegalm.finetune.tricks.smart import SMART

__all__ = [
    "LLRD",
    "METHODS",
    "R3F",
    "RDrop",
    "SIFT",
    "SMART",
    "TRICKS",
    "Adversarial",
    "EMATrick",
    "FreeLB",
    "LossState",
    "Reinit",
    "SelfCalibration",
    "Trick",
    "build_objective",
    "changes_eval_model",
    "model_inputs",
    "register_trick",
    "smoothness",
    "sort_tricks",
    "symmetric_kl",
    "task_loss",
    "trick_param_groups",
    "unwrap",
]
