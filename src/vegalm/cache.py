"""Content digests, config hashes and stage keys: the one place that decides when a result can be reused.

A stage (tokenizer, packing, a pretraining phase, a fine-tune) writes `vegalm_stage.json` holding its key (the
settings and input fingerprints that determine it) once it has finished. `check_stage` compares a rerun's key
with it: the same key reuses the stage; another key retrains it when asked to, else stops with one line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vegalm.errors import VegaError
from vegalm.io import atomic_write_json

# The files that define a model folder (weights may be sharded) and a tokenizer folder.
WEIGHT_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "*.model")
STAGE_FILE = "vegalm_stage.json"
_SHOWN_CHANGES = 3  # changed keys named in a StaleStageError; the rest are counted
_SHOWN_CHARS = 40  # longest value shown in a StaleStageError, per side

_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (16 hex digits), remembered per (path, size, mtime) within the process:
    a 1.3B model's 5 GB of weights take seconds to hash, and a sweep resolves the same model many times."""
    path = Path(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[memo] = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    return _DIGESTS[memo]


def fingerprint(path: Path, patterns: tuple[str, ...] = WEIGHT_FILES) -> list:
    """[name, size, sha256] of the files in a folder that match `patterns`, sorted by name."""
    path = Path(path)
    files = sorted({f for pat in patterns for f in path.glob(pat) if f.is_file()})
    return [[f.name, f.stat().st_size, file_digest(f)] for f in files]


def config_hash(resolved: dict[str, Any], exclude: Iterable[str] = ()) -> str:
    """sha256 (16 hex digits) of a JSON-able dict with sorted keys, leaving out the top-level keys in `exclude`."""
    skip = set(exclude)
    keyed = {k: v for k, v in resolved.items() if k not in skip}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StaleStageError(VegaError):
    """A finished stage was made with other settings or inputs, and no retrain was allowed."""


def stage_key(**parts: Any) -> dict:
    """A stage's key: its settings and input fingerprints, normalised to plain JSON (tuples -> lists, Paths -> str)."""
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


def read_stage(stage_dir: str | Path) -> dict | None:
    """The key recorded by `write_stage` in `stage_dir`, or None when there is none (or it cannot be read)."""
    try:
        record = json.loads((Path(stage_dir) / STAGE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    key = record.get("key") if isinstance(record, dict) else None
    return key if isinstance(key, dict) else None


def write_stage(stage_dir: str | Path, key: dict) -> None:
    """Mark `stage_dir` as finished with `key` (atomically). Call it after everything else in the stage is written."""
    key = stage_key(**key)
    atomic_write_json(Path(stage_dir) / STAGE_FILE, {"key": key, "hash": config_hash(key)})


def clear_stage(stage_dir: str | Path) -> None:
    """Unmark `stage_dir` before rewriting it in place, so that a crash half-way never leaves it marked finished."""
    (Path(stage_dir) / STAGE_FILE).unlink(missing_ok=True)


def _changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where `old` and `new` differ, each as "path: old -> new", in key order."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{name}: (none) → {_short(new[k])}")
            elif k not in new:
                out.append(f"{name}: {_short(old[k])} → (none)")
            else:
                out.extend(_changes(old[k], new[k], name))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in _changes(a, b, f"{prefix}[{i}]")]
    return [] if old == new else [f"{prefix or 'key'}: {_short(old)} → {_short(new)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    half = (_SHOWN_CHARS - 3) // 2  # keep both ends: a path's file name is at its end
    return text if len(text) <= _SHOWN_CHARS else text[:half] + "..." + text[-half:]


def check_stage(stage_dir: str | Path, key: dict, *, retrain: bool, flag: str = "--retrain") -> str:
    """"missing" (no finished stage in `stage_dir`), "done" (finished with this key: reuse it) or "retrain"
    (finished with another key, and `retrain` allows building it again).

    With another key and `retrain` False: StaleStageError naming the folder, the first changed keys and `flag`.
    """
    old = read_stage(stage_dir)
    if old is None:
        return "missing"
    new = stage_key(**key)
    if old == new:
        return "done"
    if retrain:
        return "retrain"
    changes = _changes(old, new)
    more = len(changes) - _SHOWN_CHANGES
    shown = "; ".join(changes[:_SHOWN_CHANGES]) + (f"; and {more} more" if more > 0 else "")
    raise StaleStageError(f"{stage_dir} was made with other settings ({shown}); pass {flag} to build it again")
