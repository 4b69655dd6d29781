"""AdamW with a weight-decay split, layer-wise LR decay, and warm-up + decay schedules.

    groups = layerwise_lr_groups(model, base_lr=2e-5, decay=0.8)      # optional (fine-tuning)
    opt = build_optimizer(model, cfg, param_groups=groups)            # cfg: vegalm.train.trainer.TrainConfig
    sched = build_scheduler(opt, cfg, max_steps=1000)

Weight decay rule: no decay on biases and on every parameter of a normalisation module
(LayerNorm, RMSNorm, GroupNorm, BatchNorm, or any module whose class name ends in "Norm");
everything else, embeddings included, is decayed by `cfg.weight_decay`.

Schedule (lr multiplier used by the update of step `s`, 0-based, W warm-up steps, T = max_steps):
warm-up `(s + 1) / W` for s < W (the first update is never wasted at lr 0), then
`linear`: 1 - p, `cosine`: (1 + cos(pi p)) / 2, `constant`: 1, with p = (s - W) / (T - W).
The multiplier reaches 0 at s = T, i.e. just after the last update.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vegalm.errors import VegaError

SCHEDULES = ("linear", "cosine", "constant")


def _is_norm(module: nn.Module) -> bool:
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)
    return isinstance(module, norms) or type(module).__name__.endswith("Norm")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay: biases and normalisation weights."""
    out = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "bias" or p_name.endswith("_bias") or _is_norm(module):
                out.add(full)
    return out


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    skip = no_decay_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n not in skip], "weight_decay": weight_decay, "group": "decay"},
        {"params": [p for n, p in named if n in skip], "weight_decay": 0.0, "group": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


_LAYER_RE = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def default_layer_id(name: str) -> int | None:
    """Transformer layer of a parameter: N for `...layer.N.` / `...layers.N.`, -1 for embeddings, None above.

    "Embeddings" means any dotted name component starting with "embed" (`embeddings.`, `embed_tokens.`).
    """
    m = _LAYER_RE.search(name)
    if m:
        return int(m.group(1))
    if any(part.startswith("embed") for part in name.split(".")[:-1]):
        return -1
    return None


def layerwise_lr_groups(
    model: nn.Module,
    base_lr: float,
    decay: float,
    layer_name_fn: Callable[[str], int | None] | None = None,
    weight_decay: float = 0.01,
) -> list[dict[str, Any]]:
    """Parameter groups with layer-wise LR decay (ELECTRA / DeBERTa-v3 fine-tuning).

    `layer_name_fn(param_name)` gives the layer index (0-based), -1 for embeddings, None for
    everything above the encoder (heads, pooler); default `default_layer_id`. With L layers,
    depth = index + 1 (embeddings 0, heads L + 1) and lr = base_lr * decay ** (L + 1 - depth):
    the head trains at base_lr, the top layer at base_lr * decay, embeddings at base_lr * decay ** (L + 1).
    Each depth is split again into decay / no-decay groups (see `no_decay_names`).
    """
    if not 0.0 < decay <= 1.0:
        raise VegaError(f"layer-wise lr decay must be in (0, 1], got {decay}")
    fn = layer_name_fn or default_layer_id
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ids = {n: fn(n) for n, _ in named}
    num_layers = max([i + 1 for i in ids.values() if i is not None and i >= 0], default=0)
    skip = no_decay_names(model)
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for n, p in named:
        depth = num_layers + 1 if ids[n] is None else ids[n] + 1
        buckets.setdefault((depth, n in skip), []).append(p)
    groups = []
    for (depth, no_wd), params in sorted(buckets.items()):
        groups.append(
            {
                "params": params,
                "lr": base_lr * decay ** (num_layers + 1 - depth),
                "weight_decay": 0.0 if no_wd else weight_decay,
                "group": f"depth{depth}{'_no_decay' if no_wd else ''}",
            }
        )
    return groups


def build_optimizer(model: nn.Module, cfg, param_groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """torch AdamW; groups without their own lr / weight_decay use cfg.lr / cfg.weight_decay."""
    groups = param_groups if param_groups is not None else default_param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.fused_adamw:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            pass  # device or dtype without a fused kernel: fall back to the default (foreach) path
    return torch.optim.AdamW(groups, **kwargs)


def lr_multiplier(step: int, max_steps: int, warmup: int, schedule: str) -> float:
    """LR multiplier for the update of step `step` (0-based); see the module docstring."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise VegaError(f"train.schedule: expected one of {list(SCHEDULES)}, got {schedule!r}")


def warmup_steps(cfg, max_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(round(cfg.warmup_ratio * max_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    if cfg.schedule not in SCHEDULES:
        raise VegaError(f"train.schedule: expected one of {list(SCHEDULES)}, got {cfg.schedule!r}")
    warm, schedule = warmup_steps(cfg, max_steps), cfg.schedule

    def fn(step: int) -> float:  # a plain function: LambdaLR's state_dict then stores no copy of its settings,
        return lr_multiplier(step, max_steps, warm, schedule)  # so a resume with a new max_steps uses the new one

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
