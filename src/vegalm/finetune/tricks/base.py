"""The fine-tuning trick interface and the helpers every trick shares.

A trick is one class with its hyperparameters declared next to it as a dataclass (`Args`, whose
defaults are the source paper's). The runner drives it like this:

    trick = SIFT(from_dict(SIFT.Args, {"lambda_": 3.0}), TASKS["rte"], num_labels=2)
    trick.setup(model)                                   # once, before training
    out = model(**model_inputs(batch))                   # the clean forward
    loss = task_loss(out.logits, batch, 2)               # the plain task loss
    loss, logs = trick.loss(model, batch, out, loss)     # each enabled trick, in `sort_tricks` order
    loss.backward(); optimizer.step()
    trick.on_step_end(model, step, max_steps)
    eval_net = trick.eval_model(model)                   # e.g. an EMA copy

Composition. Tricks see the loss built so far and return a new one. A regulariser adds a term. A trick
that changes what the *clean task term* is (selfcal's soft targets, FreeLB's swap of the clean loss for
adversarial ones) does it through two reserved batch keys, so the others stay consistent:

    batch[SOFT_TARGETS]  soft targets ([B, C] probabilities, or [B] scores for regression) that
                         `task_loss` uses instead of batch["labels"]
    batch[CLEAN_WEIGHT]  the weight the clean task term currently has inside the loss (absent = 1.0)

Neither key is a model input: always build model inputs with `model_inputs(batch)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
SOFT_TARGETS = "soft_targets"
CLEAN_WEIGHT = "clean_task_weight"


@dataclasses.dataclass
class NoArgs:
    """For a trick without hyperparameters."""


class Trick:
    """Base class: a no-op trick. Subclasses override what they need."""

    name: ClassVar[str] = ""
    Args: ClassVar[type] = NoArgs
    # Order in which the runner should call `loss` (lower first; see `sort_tricks`): target-changing
    # tricks before regularisers, so that regularisers see the final targets.
    priority: ClassVar[int] = 50

    def __init__(self, args: Any = None, task_spec: Any = None, num_labels: int = 2):
        self.args = args if args is not None else self.Args()
        self.task_spec = task_spec
        self.num_labels = int(num_labels)
        self.regression = self.num_labels == 1

    def setup(self, model: nn.Module) -> None:
        """Called once before training (after the model is on its device)."""

    def loss(self, model: nn.Module, batch: dict, out: Any,
             loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The new total loss and floats to log; `out` is the clean forward's output."""
        return loss, {}

    def on_step_end(self, model: nn.Module, step: int, max_steps: int) -> None:
        """Called after each optimizer step; `step` counts from 1."""

    def eval_model(self, model: nn.Module) -> nn.Module:
        return model

    # Optional, for checkpoint resume: tricks with state (EMA weights, PS-KD's stored predictions) fill these.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.args})"


# ------------------------------------------------------------------------------------------ helpers


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / FSDP-style `.module` wrappers and `torch.compile`'s `_orig_mod`.

    Extra forwards go through the unwrapped module: DDP allows one wrapped forward per backward, and the
    gradients of the extra forwards still land on the same parameters within the runner's one backward.
    """
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """The keys of `batch` a sequence-classification forward takes (never labels, index or trick keys)."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch and batch[k] is not None}


def logits_of(out: Any) -> torch.Tensor:
    """`out.logits` of an HF-style output, or a bare tensor / tuple's first element."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def clean_weight(batch: dict) -> float:
    return float(batch.get(CLEAN_WEIGHT, 1.0))


def task_loss(logits: torch.Tensor, batch: dict, num_labels: int, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Mean task loss in fp32: cross-entropy (soft targets if present) or MSE for regression (num_labels 1).

    `targets` overrides both batch["labels"] and batch[SOFT_TARGETS].
    """
    if targets is None:
        targets = batch.get(SOFT_TARGETS)
    if targets is None:
        targets = batch["labels"]
    x = logits.float()
    if num_labels == 1:
        return F.mse_loss(x.reshape(-1), targets.float().reshape(-1))
    if targets.dim() == 2:  # soft targets: -sum q log p
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
    """Tricks (instances, classes or registry names) in the order their `loss` should run; stable."""

    def prio(t: Any) -> int:
        cls = TRICKS[t] if isinstance(t, str) else (t if isinstance(t, type) else type(t))
        return getattr(cls, "priority", 50)

    return sorted(tricks, key=prio)
