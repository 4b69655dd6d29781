"""`--tricks adv`: one of the four embedding-perturbation methods, picked by `method`, configured by `params`.

Default SiFT: DeBERTa's own adversarial fine-tuning (made for its 1.5B model, the closest relative of
Vega's 1.3B disentangled-attention encoder); its perturbation is relative to the embedding scale, so it
survives bf16, and it needs no teacher copy. Why not the others: docs/tricks.md. With dropout on, every
method but FreeLB compares a perturbed pass with the clean pass under fresh dropout masks, as their official
code does, so its divergence includes an R-Drop (dropout-consistency) part; the `rdrop` trick is that part alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vegalm.config import ConfigError, from_dict
from vegalm.finetune.tricks.base import Trick, register_trick
from vegalm.finetune.tricks.freelb import FreeLB
from vegalm.finetune.tricks.perturb import EmbeddingAdversary
from vegalm.finetune.tricks.r3f import R3F
from vegalm.finetune.tricks.sift import SIFT
from vegalm.finetune.tricks.smart import SMART

METHODS: dict[str, type[EmbeddingAdversary]] = {"smart": SMART, "freelb": FreeLB, "r3f": R3F, "sift": SIFT}


@dataclass
class AdvArgs:
    method: str = field(default="sift", metadata={"help": f"one of {', '.join(METHODS)}"})
    params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the chosen method's Args, e.g. {vat_lambda: 3}"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"adv.method={self.method!r}: expected one of {', '.join(METHODS)}")
        self.params = dict(self.params)
        try:
            from_dict(METHODS[self.method].Args, self.params)
        except ConfigError as e:
            raise ConfigError(f"adv.params: {e}") from None


@register_trick
class Adversarial(Trick):
    """Delegates every hook to `self.inner`, the chosen method's trick."""

    name = "adv"
    Args = AdvArgs
    priority = 50
    revision = 2  # 2: the methods' issue-17 fixes (sites, defaults, FreeLB's dropout mask)

    def __init__(self, args: Any = None, task_spec: Any = None, num_labels: int = 2):
        super().__init__(args, task_spec, num_labels)
        cls = METHODS[self.args.method]
        self.inner = cls(from_dict(cls.Args, self.args.params), task_spec, num_labels)

    @property
    def last_delta(self):
        return self.inner.last_delta

    def setup(self, model):
        self.inner.setup(model)

    def loss(self, model, batch, out, loss, state):
        return self.inner.loss(model, batch, out, loss, state)

    def on_step_end(self, model, step, max_steps):
        self.inner.on_step_end(model, step, max_steps)

    def eval_model(self, model):
        return self.inner.eval_model(model)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)
