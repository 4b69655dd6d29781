"""Read and write transformers DebertaV2 checkpoint folders (config.json + model.safetensors).

Weights are only ever read with safetensors: a folder holding only `pytorch_model.bin`
is refused rather than unpickled. Every problem names the file and the key:

- missing config.json / weights, or an unsupported config (conv layers, model type)
- an encoder weight that is missing, has the wrong shape, or is not ours

Heads are forgiving in the documented HF way: loading a task model from an encoder-only
checkpoint initialises the head fresh (and says so); `reinit_head=True` also replaces a
head whose shape differs (e.g. MNLI's 3 labels -> RTE's 2, for intermediate-task transfer).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vegalm.errors import VegaError
from vegalm.io import atomic_write_text
from vegalm.model.config import EncoderConfig

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"

# Legacy HF MLM layout (`legacy=True`, the default of DebertaV2Config) -> DeBERTa layout.
_LEGACY_MLM = {
    "cls.predictions.transform.dense.": "lm_predictions.lm_head.dense.",
    "cls.predictions.transform.LayerNorm.": "lm_predictions.lm_head.LayerNorm.",
    "cls.predictions.bias": "lm_predictions.lm_head.bias",
}
# Keys that are legitimately present but unused by a given model (tied copies, other heads, buffers).
_IGNORABLE = re.compile(
    r"(^|\.)position_ids$|^cls\.predictions\.decoder\.|^lm_predictions\.|^mask_predictions\.|^pooler\.|^classifier\."
)


class CheckpointError(VegaError):
    pass


def _read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: no such model directory")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (a model directory needs config.json and {WEIGHTS})")
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}:{e.lineno}: invalid JSON ({e.msg})") from None


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return (state dict, key -> file it came from)."""
    files: list[Path]
    if (path / WEIGHTS).is_file():
        files = [path / WEIGHTS]
    elif (path / INDEX).is_file():
        index = json.loads((path / INDEX).read_text())
        files = [path / f for f in sorted(set(index["weight_map"].values()))]
    elif any((path / f).exists() for f in ("pytorch_model.bin", "model.pt")):
        raise CheckpointError(
            f"{path}: only a pickled pytorch_model.bin is present; vegalm loads safetensors only "
            "(convert it once with transformers: AutoModel.from_pretrained(dir).save_pretrained(dir))"
        )
    else:
        raise CheckpointError(f"{path / WEIGHTS}: missing (no weights in {path})")
    state, origin = {}, {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {INDEX})")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    state[k] = sf.get_tensor(k)
                    origin[k] = f.name
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return state, origin


def _normalise_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Map any DebertaV2 layout onto ours: add/strip the `deberta.` prefix, rename legacy MLM keys."""
    out = {}
    for k, v in state.items():
        for old, new in _LEGACY_MLM.items():
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        if prefix and (k.startswith("embeddings.") or k.startswith("encoder.")):
            k = prefix + k
        elif not prefix and k.startswith("deberta."):
            k = k[len("deberta.") :]
        out[k] = v
    return out


def load_pretrained(cls, path, reinit_head: bool = False, strict_head: bool = False, strict_encoder: bool = True,
                    **model_kwargs):
    """Build `cls` from a checkpoint folder. `model_kwargs` go to the constructor (e.g. num_labels).
    `strict_encoder=False` starts missing encoder weights fresh and skips unexpected ones (with a warning)."""
    path = Path(path)
    if not path.exists():
        from vegalm.hub import resolve_pretrained

        path = resolve_pretrained(str(path))  # a Hub id, through huggingface_hub's cache; else one line
    raw = _read_config(path)
    cfg = EncoderConfig.from_hf_dict(raw, source=str(path / "config.json"))
    if "num_labels" in _init_params(cls) and "num_labels" not in model_kwargs:
        n = raw.get("num_labels") or (len(raw["id2label"]) if raw.get("id2label") else None)
        if n:
            model_kwargs["num_labels"] = n
    model = cls(cfg, init=True, **model_kwargs)
    state, origin = _read_weights(path)
    if (path / "rtd_head.safetensors").is_file():
        with safe_open(str(path / "rtd_head.safetensors"), framework="pt") as sf:
            for k in sf.keys():
                state[k] = sf.get_tensor(k)
                origin[k] = "rtd_head.safetensors"
    state = _normalise_keys(state, cls.base_prefix)
    own = model.state_dict()
    head_keys = [k for k in own if not (k.startswith("deberta.") or k.startswith(("embeddings.", "encoder.")))]
    to_load, fresh = {}, []
    for k, want in own.items():
        src = origin.get(k, WEIGHTS)
        if k not in state:
            if (k in head_keys and not strict_head) or not strict_encoder:
                fresh.append(k)
                continue
            raise CheckpointError(f"{path / src}: missing weight {k!r} (shape {tuple(want.shape)})")
        got = state[k]
        if got.shape != want.shape:
            if k in head_keys and reinit_head:
                fresh.append(k)
                continue
            raise CheckpointError(
                f"{path / origin[k]}: {k!r} has shape {tuple(got.shape)}, config expects {tuple(want.shape)}"
                + (" (pass reinit_head=True to start a new head)" if k in head_keys else "")
            )
        to_load[k] = got.to(want.dtype)
    unexpected = [k for k in state if k not in own and not _IGNORABLE.search(k)]
    if unexpected and not strict_encoder:
        log.warning("%s: %d unexpected weights skipped, first %r", path, len(unexpected), unexpected[0])
    elif unexpected:
        k = unexpected[0]
        raise CheckpointError(f"{path / origin.get(k, WEIGHTS)}: unexpected weight {k!r} for {cls.__name__}")
    model.load_state_dict(to_load, strict=False)
    if fresh:
        log.warning("%s: newly initialised head weights: %s", path, ", ".join(sorted(fresh)))
    model.loaded_fresh_keys = fresh
    return model


def _init_params(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


def save_pretrained(model, path, tokenizer=None) -> None:
    """Write config.json + model.safetensors (+ rtd_head.safetensors for the discriminator)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    arch = model.hf_architecture
    extra = {}
    if arch == "DebertaV2Model":
        # The bare encoder layout: no `deberta.` prefix; heads that HF's DebertaV2Model lacks go to a side file.
        state = _normalise_keys(state, "")
        extra = {k: state.pop(k) for k in list(state) if not k.startswith(("embeddings.", "encoder."))}
    legacy = {}
    if arch == "DebertaV2ForMaskedLM" and model.config.embedding_size not in (None, model.config.hidden_size):
        # transformers' non-legacy MLM head is hidden x hidden; only its legacy layout projects to embedding_size
        state = {_to_legacy(k): v for k, v in state.items()}
        legacy = {"legacy": True}
    import transformers

    dtypes = {str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()}
    cfg = model.config.to_hf_dict(architectures=[arch], **{**model.hf_config_extra(), **legacy})
    cfg.pop("torch_dtype", None)  # transformers 5 reads `dtype`; the old key would only go stale
    cfg.update(dtype=dtypes.pop() if len(dtypes) == 1 else "float32", transformers_version=transformers.__version__)
    atomic_write_text(path / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    _atomic_save(state, path / WEIGHTS)
    if extra:
        _atomic_save(extra, path / "rtd_head.safetensors")
    if tokenizer is not None:
        save_tokenizer(tokenizer, path)


def _to_legacy(key: str) -> str:
    for legacy_prefix, ours in _LEGACY_MLM.items():
        if key.startswith(ours):
            return legacy_prefix + key[len(ours):]
    return key


# Loading arguments that transformers 5 records in tokenizer_config.json; they describe one load, not the tokenizer.
RUNTIME_TOKENIZER_KEYS = ("is_local", "local_files_only", "_commit_hash", "cache_dir", "force_download", "token",
                          "use_auth_token", "revision", "subfolder", "proxies", "resume_download", "trust_remote_code")


def save_tokenizer(tokenizer, path) -> None:
    """`tokenizer.save_pretrained(path)`, without the runtime keys in tokenizer_config.json."""
    tokenizer.save_pretrained(str(path))
    f = Path(path) / "tokenizer_config.json"
    if f.is_file():
        cfg = json.loads(f.read_text(encoding="utf-8"))
        if any(k in cfg for k in RUNTIME_TOKENIZER_KEYS):
            cleaned = {k: v for k, v in cfg.items() if k not in RUNTIME_TOKENIZER_KEYS}
            atomic_write_text(f, json.dumps(cleaned, indent=2, ensure_ascii=False) + "\n")


def _atomic_save(state: dict, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, target)


