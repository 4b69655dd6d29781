"""`--tricks ema`: evaluate (and predict with) an exponential moving average of the weights.

Polyak averaging (Polyak & Juditsky 1992) with TensorFlow's ExponentialMovingAverage warm-up,
d_t = min(decay, (1 + t) / (10 + t)); the averaging itself is vegalm.train.ema, as in Composer's
`algorithms/ema` (a function and a thin class). Defaults: decay 0.999, warm-up on, an update every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vegalm.config import ConfigError
from vegalm.finetune.tricks.base import Trick, register_trick
from vegalm.train.ema import EMA


@dataclass
class EMAArgs:
    decay: float = field(default=0.999, metadata={"help": "averaging window ~ 1 / (1 - decay) = 1000 updates"})
    warmup: bool = field(default=True, metadata={"help": "d_t = min(decay, (1+t)/(10+t)): a short run is "
                                                         "not stuck near the init"})
    every: int = field(default=1, metadata={"help": "update every N optimizer steps"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"ema.decay={self.decay}: expected 0 <= decay < 1")
        if self.every < 1:
            raise ConfigError(f"ema.every={self.every}: expected >= 1")


@register_trick
class EMATrick(Trick):
    name = "ema"
    Args = EMAArgs
    priority = 90  # after every trick that changes the weights' training

    def __init__(self, args: Any = None, task_spec: Any = None, num_labels: int = 2):
        super().__init__(args, task_spec, num_labels)
        self.ema: EMA | None = None

    def setup(self, model):
        self.ema = EMA(model, self.args.decay, self.args.warmup, copy=True)

    def on_step_end(self, model, step, max_steps):
        if step % self.args.every == 0:
            self.ema.update(model)

    def eval_model(self, model):
        return self.ema.averaged(model) if self.ema is not None else model

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.ema.load_state_dict(state)
