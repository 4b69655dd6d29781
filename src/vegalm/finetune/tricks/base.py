"""The fine-tuning trick interface (`Trick`), its registry (`TRICKS`, `@register_trick`) and shared helpers.

A trick sees the loss built so far and returns a new one; what one trick tells the next (selfcal's soft
targets, FreeLB's swap of the clean term) travels in the step's `LossState`. The call sequence, the
composition rules and each trick's sources: docs/tricks.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vegalm.config import ConfigError
from vegalm.train.ema import unwrap

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclasses.dataclass
class NoArgs:
    """For a trick without hyperparameters."""


@dataclasses.dataclass
class LossState:
    """What the tricks of one step tell each other; the objective makes a fresh one per step.

    soft_targets: the clean task term's targets when a trick replaced the labels (selfcal): [B, C]
                  probabilities, or [B] scores for regression; None = batch["labels"]
    clean_weight: the weight the clean task term still has inside the loss (FreeLB swaps it out)
    """

    soft_targets: torch.Tensor | None = None
    clean_weight: float = 1.0

    def targets(self, batch: dict) -> torch.Tensor:
        """The targets of the task term now: the soft targets if a trick set them, else the labels."""
        return self.soft_targets if self.soft_targets is not None else batch["labels"]


class Trick:
    """Base class: a no-op trick. Subclasses override what they need."""

    name: ClassVar[str] = ""
    Args: ClassVar[type] = NoArgs
    # Order of `setup` and `loss` (lower first; see `sort_tricks`): model surgery (reinit, 0) before the
    # copies other tricks take, target-changing tricks (selfcal, 10) before the regularisers (50) that use
    # the final targets, weight averaging (90) last.
    priority: ClassVar[int] = 50
    # Bumped when the trick computes something else at the same Args; enters the run cache key when != 1, so
    # runs cached by an earlier revision are retrained instead of reused.
    revision: ClassVar[int] = 1

    def __init__(self, args: Any = None, task_spec: Any = None, num_labels: int = 2):
        self.args = args if args is not None else self.Args()
        self.task_spec = task_spec
        self.num_labels = int(num_labels)
        self.regression = self.num_labels == 1

    def setup(self, model: nn.Module) -> None:
        """Called once before training, in `sort_tricks` order."""

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict] | None:
        """Optimizer parameter groups to train with (llrd), or None for the default ones."""
        return None

    def loss(self, model: nn.Module, batch: dict, out: Any, loss: torch.Tensor,
             state: LossState) -> tuple[torch.Tensor, dict[str, float]]:
        """The new total loss and floats to log; `out` is the clean forward's output."""
        return loss, {}

    def on_step_end(self, model: nn.Module, step: int, max_steps: int) -> None:
        """Called after each optimizer step; `step` counts from 1."""

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The model to evaluate and predict with; a trick that changes it overrides this (ema)."""
        return model

    # Optional, for checkpoint resume: tricks with state (EMA weights, PS-KD's stored predictions) fill these.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.args})"


def changes_eval_model(trick: Trick) -> bool:
    """Whether the trick evaluates another model than the trained one (its class overrides `eval_model`).

    A wrapper trick (adv) that delegates to `trick.inner` is asked about the inner trick.
    """
    inner = getattr(trick, "inner", None)
    if isinstance(inner, Trick):
        return changes_eval_model(inner)
    return type(trick).eval_model is not Trick.eval_model


def trick_param_groups(tricks: list[tuple[str, Trick]], model: nn.Module, lr: float,
                       weight_decay: float) -> list[dict] | None:
    """The optimizer parameter groups the one trick that sets them (llrd) asks for, else None (the default)."""
    found = [(name, g) for name, t in tricks if (g := t.param_groups(model, lr, weight_decay)) is not None]
    if len(found) > 1:
        raise ConfigError(f"tricks: {found[0][0]} and {found[1][0]} both set the optimizer's parameter groups")
    return found[0][1] if found else None


# ------------------------------------------------------------------------------------------ helpers


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """The keys of `batch` a sequence-classification forward takes (never labels or index)."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch and batch[k] is not None}


def logits_of(out: Any) -> torch.Tensor:
    """`out.logits` of an HF-style output, or a bare tensor / tuple's first element."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def task_loss(logits: torch.Tensor, targets: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Mean task loss in fp32: MSE for regression (num_labels 1), else cross-entropy on class ids [B] or
    soft targets [B, C] (-sum q log p)."""
    x = logits.float()
    if num_labels == 1:
        return F.mse_loss(x.reshape(-1), targets.float().reshape(-1))
    if targets.dim() == 2:
        return -(targets.float() * F.log_softmax(x, dim=-1)).sum(-1).mean()
    return F.cross_entropy(x, targets.long())


# ------------------------------------------------------------------------------------------ registry

TRICKS: dict[str, type[Trick]] = {}  # registry name -> class, filled by @register_trick as the modules load


def register_trick(cls: type[Trick]) -> type[Trick]:
    """Class decorator: add a Trick subclass to TRICKS under its `name` (the CLI's `--tricks` value)."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__}: a registered trick needs a `name`")
    known = TRICKS.get(cls.name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"trick name {cls.name!r}: taken by {known.__module__}.{known.__qualname__}")
    TRICKS[cls.name] = cls
    return cls


def sort_tricks(tricks: list) -> list:
    """Tricks in the order their `setup` and `loss` run (stable): registry names, classes, instances, or
    (name, instance) pairs, returned in the form given."""

    def prio(t: Any) -> int:
        if isinstance(t, tuple):
            t = t[1]
        cls = TRICKS[t] if isinstance(t, str) else (t if isinstance(t, type) else type(t))
        return getattr(cls, "priority", 50)

    return sorted(tricks, key=prio)


__all__ = ["LossState", "NoArgs", "TRICKS", "Trick", "changes_eval_model", "logits_of", "model_inputs",
           "register_trick", "sort_tricks", "task_loss", "trick_param_groups", "unwrap"]
