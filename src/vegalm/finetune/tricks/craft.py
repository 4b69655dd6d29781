"""Standard fine-tuning craft: weight EMA (a trick), layer-wise LR decay, top-layer re-init, ensembling.

    from vegalm.finetune.tricks.craft import EMA, layerwise_lr_groups, reinit_top_layers, ensemble_logits
    reinit_top_layers(model, 2)                                    # fresh top 2 layers + pooler
    opt = torch.optim.AdamW(layerwise_lr_groups(model, lr=2e-5, decay=0.9, weight_decay=0.01))
    probs = ensemble_logits([logits_seed1, logits_seed2, logits_seed3])   # mean over runs

The encoder layers are found as `deberta.encoder.layer` (ours / HF DeBERTa), `bert.encoder.layer`,
`roberta.encoder.layer`, ... or any `*encoder.layer` ModuleList, so the helpers work for our encoder
and for transformers' BERT-family `AutoModelForSequenceClassification` models.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vegalm.config import ConfigError
from vegalm.errors import VegaError
from vegalm.finetune.tricks.base import Trick, register_trick, unwrap


class EMAWeights:
    """An fp32 exponential moving average of a model's weights, kept as a full module copy.

    theta_ema <- d * theta_ema + (1 - d) * theta after each update. With `warmup`, d_t =
    min(decay, (1 + t) / (10 + t)) (the TensorFlow ExponentialMovingAverage `num_updates` rule), so the
    average is not dominated by the initial weights in short runs. Buffers are copied as they are.
    The copy is fp32 whatever the model's dtype: an update of (1 - 0.999) x a small change is below
    bf16 resolution and would be lost.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(unwrap(model)).float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
            p.grad = None  # deepcopy copies .grad too

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        d = self.current_decay() if decay is None else float(decay)
        src = dict(unwrap(model).named_parameters())
        for name, e in self.module.named_parameters():
            e.lerp_(src[name].detach().float(), 1.0 - d)
        src_buf = dict(unwrap(model).named_buffers())
        for name, b in self.module.named_buffers():
            if name in src_buf:
                b.copy_(src_buf[name])
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["weights"])


@dataclass
class EMAArgs:
    decay: float = 0.999  # averaging window ~ 1 / (1 - decay) = 1000 updates, a few GLUE epochs
    warmup: bool = True  # d_t = min(decay, (1+t)/(10+t)) so a short run is not stuck near the init
    every: int = 1  # update every N optimizer steps

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"ema.decay={self.decay}: expected 0 <= decay < 1")
        if self.every < 1:
            raise ConfigError(f"ema.every={self.every}: expected >= 1")


@register_trick
class EMA(Trick):
    """Evaluate (and predict with) an exponential moving average of the weights (Polyak averaging)."""

    name = "ema"
    Args = EMAArgs
    priority = 90

    def setup(self, model: nn.Module) -> None:
        self.ema = EMAWeights(model, self.args.decay, self.args.warmup)

    def on_step_end(self, model: nn.Module, step: int, max_steps: int) -> None:
        if step % self.args.every == 0:
            self.ema.update(model)

    def eval_model(self, model: nn.Module) -> nn.Module:
        ema = getattr(self, "ema", None)
        return ema.module if ema is not None else model

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict() if hasattr(self, "ema") else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.ema.load_state_dict(state)


# ------------------------------------------------------------------------------------------ layers

_KNOWN_LAYER_PATHS = ("deberta.encoder.layer", "bert.encoder.layer", "roberta.encoder.layer",
                      "electra.encoder.layer", "encoder.layer")


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the transformer layers: a known path, else any `*encoder.layer`."""
    model = unwrap(model)
    modules = dict(model.named_modules())
    for path in _KNOWN_LAYER_PATHS:
        if isinstance(modules.get(path), nn.ModuleList):
            return path, modules[path]
    for name, m in modules.items():
        if isinstance(m, nn.ModuleList) and re.search(r"(^|\.)encoder\.layers?$", name):
            return name, m
    raise VegaError(f"{type(model).__name__}: no encoder layer list found (looked for {', '.join(_KNOWN_LAYER_PATHS)})")


def _init_std(model: nn.Module) -> float:
    cfg = getattr(unwrap(model), "config", None)
    return float(getattr(cfg, "initializer_range", 0.02))


@torch.no_grad()
def _reinit(module: nn.Module, std: float) -> None:
    """BERT/DeBERTa initialisation: N(0, std) matrices, zero biases, identity LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()


def reinit_top_layers(model: nn.Module, k: int, pooler: bool = True) -> list[str]:
    """Re-initialise the top `k` encoder layers (and the pooler) as at pretraining init; returns their names.

    Zhang et al. 2021 (Revisiting Few-sample BERT Fine-tuning, arXiv:2006.05987): the top layers of a
    pretrained encoder are specialised to the pretraining task; restarting them (typically k = 1..6)
    stabilises fine-tuning on small tasks. The classifier head is task-new already and is left alone.
    """
    path, layers = find_layers(model)
    if k < 0 or k > len(layers):
        raise VegaError(f"reinit k={k}: the model has {len(layers)} layers")
    std = _init_std(model)
    names = []
    for i in range(len(layers) - k, len(layers)):
        _reinit(layers[i], std)
        names.append(f"{path}.{i}")
    if pooler and k > 0:
        for name, m in unwrap(model).named_modules():
            if name.split(".")[-1] == "pooler" and isinstance(m, nn.Module):
                _reinit(m, std)
                names.append(name)
    return names


def layerwise_lr_groups(model: nn.Module, lr: float, decay: float = 0.9, weight_decay: float = 0.0,
                        no_decay: Sequence[str] = ("bias", "LayerNorm.weight", "layernorm.weight")) -> list[dict]:
    """Optimizer parameter groups with layer-wise LR decay (ELECTRA, Clark et al. 2020, arXiv:2003.10555).

    Depth 0 = embeddings and the encoder's shared parts (DeBERTa's relative embeddings, used by every
    layer), depth i+1 = layer i, depth L+1 = everything above (pooler, classifier). A parameter at depth
    d gets lr * decay^(L+1-d): the head trains at `lr`, lower layers progressively slower. ELECTRA used
    0.8 for base and 0.9 for large models. Biases and LayerNorm weights get no weight decay.
    """
    path, layers = find_layers(model)
    n = len(layers)
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    prefix = path + "."
    encoder_prefix = path.rsplit(".", 1)[0] + "."  # e.g. "deberta.encoder."
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(prefix):
            depth = int(name[len(prefix):].split(".", 1)[0]) + 1
        elif "embeddings" in name or name.startswith(encoder_prefix):
            depth = 0
        else:
            depth = n + 1
        wd = not any(nd in name for nd in no_decay)
        groups.setdefault((depth, wd), []).append(p)
    return [
        {"params": ps, "lr": lr * decay ** (n + 1 - depth), "weight_decay": weight_decay if wd else 0.0,
         "layer_depth": depth}
        for (depth, wd), ps in sorted(groups.items())
    ]


def ensemble_logits(arrays: Sequence[Any], mode: str = "logits") -> np.ndarray:
    """Average the predictions of several runs (seeds / checkpoints) on the same examples, in fp64.

    mode "logits" averages raw logits (regression scores too); "probs" averages softmax probabilities,
    which is the better-calibrated choice when the members' logit scales differ.
    """
    if not arrays:
        raise VegaError("ensemble_logits: no arrays given")
    xs = [np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64) for a in arrays]
    shape = xs[0].shape
    for i, x in enumerate(xs):
        if x.shape != shape:
            raise VegaError(f"ensemble_logits: member {i} has shape {x.shape}, member 0 has {shape}")
    stack = np.stack(xs)
    if mode == "probs":
        if stack.ndim < 3 or stack.shape[-1] < 2:
            raise VegaError("ensemble_logits mode='probs' needs class logits [N, C] with C >= 2")
        stack = np.exp(stack - stack.max(-1, keepdims=True))
        stack = stack / stack.sum(-1, keepdims=True)
    elif mode != "logits":
        raise VegaError(f"ensemble_logits: mode={mode!r}, expected 'logits' or 'probs'")
    return stack.mean(0)
