"""`--tricks reinit`: re-initialise the top encoder layers (and a pretrained pooler) before fine-tuning.

Paper: Zhang et al. 2021, "Revisiting Few-sample BERT Fine-tuning", ICLR, arXiv:2006.05987. Official code:
github.com/asappresearch/revisit-bert-finetuning (`--reinit_layers`, `--reinit_pooler`). The re-init is
vegalm.finetune.models.reinit_top_layers, what `reinit_top_layers=k` computes. Default: 1 layer (the
paper searches 1-6).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vegalm.config import ConfigError
from vegalm.finetune.models import reinit_top_layers
from vegalm.finetune.tricks.base import Trick, register_trick, unwrap


@dataclass
class ReinitArgs:
    layers: int = field(default=1, metadata={"help": "how many top encoder layers start fresh"})

    def __post_init__(self) -> None:
        if self.layers < 0:
            raise ConfigError(f"reinit.layers={self.layers}: expected >= 0")


@register_trick
class Reinit(Trick):
    name = "reinit"
    Args = ReinitArgs
    priority = 0  # setup first: the copies other tricks take (EMA, teachers) must see the fresh layers

    def __init__(self, args=None, task_spec=None, num_labels=2):
        super().__init__(args, task_spec, num_labels)
        self.reinitialised: list[str] = []  # module names, for the run record

    def setup(self, model):
        self.reinitialised = reinit_top_layers(unwrap(model), self.args.layers) if self.args.layers else []
