"""The one exponential moving average of weights: `ema_update_` (a plain function) and `EMA` (a thin class).

    ema = EMA(model, decay=0.999)            # fp32 shadow of the trainable parameters, beside them
    ema.update(model)                        # after each optimizer step: s <- d s + (1 - d) theta
    ema.copy_to(model)                       # evaluate the average in place; or ema.averaged(model), a copy

Warm-up: d_t = min(decay, (1 + t) / (10 + t)) (TensorFlow's ExponentialMovingAverage `num_updates` rule), so
a run of a few hundred steps is not dominated by its initial weights. Composer's `algorithms/ema` has the
same split of a function and a class.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / FSDP-style `.module` wrappers and torch.compile's `_orig_mod`."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def warmup_decay(decay: float, t: int) -> float:
    """min(decay, (1 + t) / (10 + t)): 0.1 at t = 0, 0.5 at t = 8, `decay` (0.999) from t = 8991 on."""
    return min(decay, (1.0 + t) / (10.0 + t))


@torch.no_grad()
def ema_update_(shadow: dict[str, torch.Tensor], named_params: Iterable[tuple[str, torch.Tensor]], decay: float,
                lerp: bool = True) -> None:
    """shadow[n] <- decay * shadow[n] + (1 - decay) * p for each (n, p) with n in shadow, in fp32.

    Two float orders of the same formula, kept so that runs from before the merge reproduce bit for bit:
    `lerp` (s + (1 - d)(p - s), torch.lerp_; the tricks' teachers and the `ema` trick) and not `lerp`
    (d s + (1 - d) p, mul_ then add_; the runner's `ema_decay`). They differ in the last bit of ~30% of
    the entries.
    """
    for n, p in named_params:
        s = shadow.get(n)
        if s is None:
            continue
        if lerp:
            s.lerp_(p.detach().float(), 1.0 - decay)
        else:
            s.mul_(decay).add_(p.detach().float(), alpha=1 - decay)


class EMA:
    """fp32 moving average of a model's trainable parameters, kept on the parameters' device.

    fp32 whatever the model's dtype: (1 - 0.999) x a small change is below bf16 resolution. With
    `copy=True` the shadow lives in a frozen fp32 copy of the whole module (buffers copied on each update)
    that can run forwards: a teacher, or the model to evaluate. `warmup` applies `warmup_decay` with t =
    the `step` passed to `update`, else the number of updates so far. The tensors follow the model to
    its device on each `update` / `averaged` (a copy made before the model moved to the GPU moves too).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, copy: bool = False, lerp: bool = True):
        net = unwrap(model)
        self.decay, self.warmup, self.lerp = float(decay), warmup, lerp
        self.num_updates = 0
        self.module: nn.Module | None = None
        if copy:
            self.module = _frozen_copy(net)
            self.shadow = dict(self.module.named_parameters())
        else:
            self.shadow = {n: p.detach().float().clone() for n, p in net.named_parameters() if p.requires_grad}

    def current_decay(self, step: int | None = None) -> float:
        if not self.warmup:
            return self.decay
        return warmup_decay(self.decay, self.num_updates if step is None else step)

    def _follow(self, net: nn.Module) -> None:
        """Move the shadow (or the copy) to the device of the model's parameters if it is elsewhere."""
        p = next(net.parameters(), None)
        if p is None or not self.shadow or next(iter(self.shadow.values())).device == p.device:
            return
        if self.module is not None:
            self.module.to(p.device)
            self.shadow = dict(self.module.named_parameters())
        else:
            self.shadow = {n: s.to(p.device) for n, s in self.shadow.items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None, decay: float | None = None) -> None:
        """One averaging step; `decay` overrides the schedule (SMART's two-phase teacher momentum)."""
        net = unwrap(model)
        self._follow(net)
        d = self.current_decay(step) if decay is None else float(decay)
        ema_update_(self.shadow, net.named_parameters(), d, self.lerp)
        if self.module is not None:
            src = dict(net.named_buffers())
            for n, b in self.module.named_buffers():
                if n in src:
                    b.copy_(src[n])
        self.num_updates += 1

    def averaged(self, model: nn.Module) -> nn.Module:
        """The averaged fp32 module (`copy=True`), on the model's device."""
        if self.module is None:
            raise ValueError("EMA.averaged needs EMA(..., copy=True)")
        self._follow(unwrap(model))
        return self.module

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the average into the model's own parameters (cast to their dtype)."""
        for n, p in unwrap(model).named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        weights = self.module.state_dict() if self.module is not None else dict(self.shadow)
        return {"num_updates": self.num_updates, "weights": weights}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        if self.module is not None:
            self.module.load_state_dict(state["weights"])
        else:
            for n, t in state["weights"].items():
                self.shadow[n].copy_(t)


def _frozen_copy(net: nn.Module) -> nn.Module:
    module = copy.deepcopy(net).float().eval()
    for p in module.parameters():
        p.requires_grad_(False)
        p.grad = None  # deepcopy copies .grad too
    return module
