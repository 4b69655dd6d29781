"""Stages: steps around a fine-tune that are not tricks (teacher -> pseudo-labels -> student).

A stage runs before the first fine-tune (TAPT: a new encoder to start from) or after a teacher run
(self-training: pseudo-labelled rows for a student). wnli.py is a prediction rule used by predict.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class Teacher:
    """A finished fine-tune: its folder and `run_finetune`'s result."""

    run_dir: Path
    result: dict


@dataclass
class StageOutput:
    model: str | None = None  # fine-tune from this encoder instead of the given one (TAPT)
    rows: list = field(default_factory=list)  # pseudo-labelled rows for the student's extra_train
    info: dict[str, Any] = field(default_factory=dict)  # what the stage says about itself (kept in records)


class Stage(Protocol):
    name: str
    needs_teacher: bool  # False: runs before any fine-tune; True: gets the teacher run

    def run(self, teacher: Teacher | None) -> StageOutput: ...


__all__ = ["Stage", "StageOutput", "Teacher"]
