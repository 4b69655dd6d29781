"""Self-calibrated fine-tuning: train on soft targets mixed from the gold label and the model's own past view.

    trick = SelfCalibration(SelfCalibration.Args(), TASKS["rte"], num_labels=2)    # PS-KD, alpha_T 0.3
    loss, logs = trick.loss(model, batch, out, loss)   # clean CE -> CE against (1-a_t) onehot + a_t p_prev
    trick.on_step_end(model, step, max_steps)          # a_t = alpha_T * step / max_steps

Default, mode "pskd": progressive self-knowledge distillation (Kim et al. 2021, "Self-Knowledge
Distillation with Progressive Refinement of Targets", ICCV, arXiv:2006.12000). The target of training
example i at progress t is

    q_i = (1 - a_t) onehot(y_i) + a_t p_prev(i),     a_t = alpha_T * t / T,

where p_prev(i) is the softmax the model gave example i the previous time it was trained on (one epoch
ago with a shuffled epoch sampler): the model is its own teacher, one epoch behind. PS-KD moves alpha
per epoch; we move it per optimizer step, a smooth version of the same linear schedule. An example seen
for the first time keeps its one-hot target. Cost: no extra forward; memory N x C floats (QQP: 364k x 2).
Examples are identified by batch["index"], which must be unique within the training set.

Mode "ema": the teacher is an EMA of the weights (decay `ema_decay`), q = (1 - a_t) onehot + a_t
softmax(f_ema(x)). One extra no-grad forward per step and a weight copy; no index needed.

Regression (STS-B, num_labels 1), `regression="soft"`: the same mix on the score,
y~ = (1 - a_t) y + a_t y_prev, with MSE: the model is pulled towards its own earlier, smoother estimate.
`regression="off"` makes the trick a no-op on regression tasks.

Only batch["labels"] is read, i.e. the training labels (gold, or pseudo-labels from transductive.py);
dev and test labels never reach this code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vegalm.config import ConfigError
from vegalm.errors import VegaError
from vegalm.finetune.tricks.base import (
    SOFT_TARGETS,
    Trick,
    clean_weight,
    logits_of,
    model_inputs,
    register_trick,
    task_loss,
)
from vegalm.finetune.tricks.craft import EMAWeights


@dataclass
class SelfCalArgs:
    mode: str = "pskd"  # "pskd" (past predictions, free) or "ema" (EMA-weight teacher, +1 forward)
    # final teacher weight. PS-KD uses 0.8 (long image/MT training); on MiniLM-L6 CoLA (seed 0, dev) 0.8
    # cost 4.1 MCC alone and collapsed to the majority class with adv (12.6 vs 32.0), 0.3 gave +0.8:
    # docs/tricks.md, "What the tricks buy"
    alpha_T: float = 0.3
    ema_decay: float = 0.999  # mode "ema": teacher momentum (window ~1000 updates)
    regression: str = "soft"  # STS-B: "soft" (mix the score) or "off" (no-op)

    def __post_init__(self) -> None:
        if self.mode not in ("pskd", "ema"):
            raise ConfigError(f"selfcal.mode={self.mode!r}: expected 'pskd' or 'ema'")
        if not 0.0 <= self.alpha_T <= 1.0:
            raise ConfigError(f"selfcal.alpha_T={self.alpha_T}: expected a number in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"selfcal.ema_decay={self.ema_decay}: expected 0 <= decay < 1")
        if self.regression not in ("soft", "off"):
            raise ConfigError(f"selfcal.regression={self.regression!r}: expected 'soft' or 'off'")


@register_trick
class SelfCalibration(Trick):
    name = "selfcal"
    Args = SelfCalArgs
    priority = 10  # before the regularisers, so that FreeLB's perturbed losses use the soft targets

    def __init__(self, args: Any = None, task_spec: Any = None, num_labels: int = 2):
        super().__init__(args, task_spec, num_labels)
        self.progress = 0.0  # t / T, set by on_step_end
        self.store: torch.Tensor | None = None  # [N, C] past predictions (pskd)
        self.seen: torch.Tensor | None = None  # [N] bool
        self.teacher: EMAWeights | None = None

    @property
    def alpha(self) -> float:
        return self.args.alpha_T * self.progress

    def setup(self, model: nn.Module) -> None:
        if self.args.mode == "ema" and self.teacher is None:
            self.teacher = EMAWeights(model, self.args.ema_decay, warmup=True)

    # ---- PS-KD memory
    def _ensure(self, n: int, width: int, device: torch.device) -> None:
        rows = 0 if self.store is None else self.store.shape[0]
        if n <= rows:
            return
        new_rows = max(n, 2 * rows)
        store = torch.zeros(new_rows, width, device=device)
        seen = torch.zeros(new_rows, dtype=torch.bool, device=device)
        if self.store is not None:
            store[:rows] = self.store.to(device)
            seen[:rows] = self.seen.to(device)
        self.store, self.seen = store, seen

    def _past(self, batch: dict, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(previous predictions [B, W], seen mask [B]) for the batch; then remember `current`."""
        idx = batch.get("index")
        if idx is None:
            raise VegaError("selfcal mode 'pskd' needs batch['index'] (each training example's unique id)")
        idx = idx.to(current.device).long()
        self._ensure(int(idx.max()) + 1, current.shape[1], current.device)
        if self.store.device != current.device:  # e.g. after load_state_dict on CPU
            self.store, self.seen = self.store.to(current.device), self.seen.to(current.device)
        prev, seen = self.store[idx].clone(), self.seen[idx].clone()
        self.store[idx] = current
        self.seen[idx] = True
        return prev, seen

    def loss(self, model, batch, out, loss):
        if self.regression and self.args.regression == "off":
            return loss, {}
        logits = logits_of(out)
        current = logits.detach().float()
        current = current.reshape(-1, 1) if self.regression else F.softmax(current, dim=-1)
        if self.args.mode == "pskd":
            prev, seen = self._past(batch, current)
        else:
            if self.teacher is None:
                self.setup(model)
            with torch.no_grad():
                t = logits_of(self.teacher.module(**model_inputs(batch))).float()
            prev = t.reshape(-1, 1) if self.regression else F.softmax(t, dim=-1)
            seen = torch.ones(prev.shape[0], dtype=torch.bool, device=prev.device)
        a = self.alpha * seen.to(prev.dtype).unsqueeze(-1)  # [B, 1]; 0 for first-seen examples
        labels = batch["labels"].to(prev.device)
        if self.regression:
            target = ((1 - a) * labels.float().reshape(-1, 1) + a * prev).reshape(-1)
        else:
            target = (1 - a) * F.one_hot(labels.long(), self.num_labels).float() + a * prev
        w = clean_weight(batch)
        old = task_loss(logits, batch, self.num_labels)
        new = task_loss(logits, batch, self.num_labels, targets=target)
        batch[SOFT_TARGETS] = target
        return loss + w * (new - old), {"selfcal/alpha": self.alpha, "selfcal/loss": float(new.detach())}

    def on_step_end(self, model, step, max_steps):
        self.progress = min(1.0, step / max(1, max_steps))
        if self.teacher is not None:
            self.teacher.update(model)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"progress": self.progress}
        if self.store is not None:
            state.update(store=self.store.cpu(), seen=self.seen.cpu())
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.progress = float(state.get("progress", 0.0))
        if "store" in state:
            self.store, self.seen = state["store"].clone(), state["seen"].clone()
        if "teacher" in state and self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
