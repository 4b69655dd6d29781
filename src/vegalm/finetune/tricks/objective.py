"""The fine-tuning objective: the clean forward, `task_loss`, then each trick's `loss` in order.

    objective = build_objective(num_labels, forward_inputs(model), sort_tricks(pairs))
    loss, logs = objective(model, batch)        # what the Trainer calls
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vegalm.finetune.tricks.base import LossState, Trick, task_loss

Objective = Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


def build_objective(num_labels: int, keys: tuple[str, ...], tricks: list[tuple[str, Trick]]) -> Objective:
    """`objective(model, batch) -> (loss, logs)`: the model sees `keys` only; `tricks` are (name, trick) pairs,
    already sorted. Logs: "task_loss", "tokens" (real tokens of the batch) and "<name>/<key>" per trick."""

    def objective(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        # `index` stays in the batch: self-calibration keys its per-example memory on it.
        out = model(**{k: batch[k] for k in keys if k in batch})
        loss = task_loss(out.logits, batch["labels"], num_labels)
        logs = {"task_loss": float(loss.detach()), "tokens": float(batch["attention_mask"].sum())}
        state = LossState()
        for name, trick in tricks:
            loss, extra = trick.loss(model, batch, out, loss, state)
            logs.update({f"{name}/{k}": float(v) for k, v in extra.items()})
        return loss, logs

    return objective
