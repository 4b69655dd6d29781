"""`--tricks selfcal`: train on soft targets mixed from the gold label and the model's own earlier view.

Paper: Kim et al. 2021, "Self-Knowledge Distillation with Progressive Refinement of Targets" (PS-KD), ICCV,
arXiv:2006.12000. Official code: github.com/lgcnsai/PS-KD-Pytorch. The target of example i at progress t is
q_i = (1 - a_t) onehot(y_i) + a_t p_prev(i), a_t = alpha_T t / T, p_prev(i) its softmax the previous time
it was trained on (PS-KD moves alpha per epoch; we move it per step). Defaults: mode pskd, alpha_T 0.3
(not PS-KD's 0.8: docs/tricks.md, "What the tricks buy"). Mode "ema" (an EMA-weight teacher) and
regression (STS-B): docs/tricks.md. Only batch["labels"] (the training labels) is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vegalm.config import ConfigError
from vegalm.errors import VegaError
from vegalm.finetune.tricks.base import Trick, logits_of, model_inputs, register_trick, task_loss
from vegalm.train.ema import EMA


@dataclass
class SelfCalArgs:
    mode: str = field(default="pskd", metadata={"help": "pskd (past predictions, free) or ema (EMA-weight "
                                                        "teacher, +1 forward)"})
    # PS-KD uses 0.8 (long image/MT training); on MiniLM-L6 CoLA (seed 0, dev) 0.8 cost 4.1 MCC alone and
    # collapsed to the majority class with adv (12.6 vs 32.0), 0.3 gave +0.8 (docs/tricks.md)
    alpha_T: float = field(default=0.3, metadata={"help": "final teacher weight a_T"})
    ema_decay: float = field(default=0.999, metadata={"help": "mode ema: teacher momentum (window ~1000 updates)"})
    regression: str = field(default="soft", metadata={"help": "STS-B: soft (mix the score) or off (no-op)"})

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
        self.teacher: EMA | None = None

    @property
    def alpha(self) -> float:
        return self.args.alpha_T * self.progress

    def setup(self, model: nn.Module) -> None:
        if self.args.mode == "ema" and self.teacher is None:
            self.teacher = EMA(model, self.args.ema_decay, warmup=True, copy=True)

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
        rows = int(idx.max()) + 1  # read where the index lives (a meta device holds no values)
        idx = idx.to(current.device).long()
        self._ensure(rows, current.shape[1], current.device)
        if self.store.device != current.device:  # e.g. after load_state_dict on CPU
            self.store, self.seen = self.store.to(current.device), self.seen.to(current.device)
        prev, seen = self.store[idx].clone(), self.seen[idx].clone()
        self.store[idx] = current
        self.seen[idx] = True
        return prev, seen

    def loss(self, model, batch, out, loss, state):
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
                t = logits_of(self.teacher.averaged(model)(**model_inputs(batch))).float()
            prev = t.reshape(-1, 1) if self.regression else F.softmax(t, dim=-1)
            seen = torch.ones(prev.shape[0], dtype=torch.bool, device=prev.device)
        a = self.alpha * seen.to(prev.dtype).unsqueeze(-1)  # [B, 1]; 0 for first-seen examples
        labels = batch["labels"].to(prev.device)
        if self.regression:
            target = ((1 - a) * labels.float().reshape(-1, 1) + a * prev).reshape(-1)
        else:
            target = (1 - a) * F.one_hot(labels.long(), self.num_labels).float() + a * prev
        w = state.clean_weight
        old = task_loss(logits, state.targets(batch), self.num_labels)
        new = task_loss(logits, target, self.num_labels)
        state.soft_targets = target
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
