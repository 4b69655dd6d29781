"""The TAPT stage: task-adaptive continued RTD (vegalm.pretrain.tapt) before the first fine-tune.

It hands back the continued discriminator as the encoder to fine-tune. Only our own encoders have the RTD
generator it needs; pretrain/tapt.py has the recipe and its cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from vegalm.config import deep_merge
from vegalm.finetune.stages import StageOutput, Teacher


@dataclass
class Tapt:
    task: str
    model: str  # a `vegalm pretrain` output or its discriminator/ folder
    out: str  # the TAPT run folder (shared by every fine-tune that starts from it)
    glue_dir: str
    seed: int = 0
    progress: bool = True
    settings: dict = field(default_factory=dict)  # TaptConfig keys (train.epochs=3, ...); the fields above win
    name: ClassVar[str] = "tapt"
    needs_teacher: ClassVar[bool] = False

    def run(self, teacher: Teacher | None = None) -> StageOutput:
        from vegalm.pretrain.tapt import run_tapt

        fixed = {"task": self.task, "model": self.model, "out": self.out, "glue_dir": self.glue_dir,
                 "train": {"seed": self.seed, "progress": self.progress}}
        t = run_tapt(deep_merge(self.settings or {}, fixed))
        part = {"timing": {"wall_s": t["wall_s"]}, "cached": t["cached"], "train": {"steps": t["train"]["step"]}}
        return StageOutput(model=t["model_path"], info=part)


__all__ = ["Tapt"]
