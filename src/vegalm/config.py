"""Dataclass configs, YAML recipes and `key=value` command-line overrides.

Dataclasses are the source of truth. A recipe is a YAML mapping whose keys are exactly the dataclass
field names (nested dataclasses are nested mappings), and an override uses the same dotted names:

    vegalm pretrain --recipe recipes/tiny.yaml --out runs/x phase1.train.lr=3e-4 model.num_hidden_layers=2

Scalars follow YAML 1.2 (`3e-4` is a number, `no` a string); unknown keys (with a "did you mean"), duplicate
keys, wrong types and impossible values (a dataclass's `check()`) raise `ConfigError` at load time, naming
the dotted key and the recipe file. Field metadata: `path` (resolved against the recipe file that sets it),
`merge: replace` (a child recipe's section replaces its base's whole instead of being merged key by key),
`rest` (a dict field that takes the section's other keys, written flat; the dataclass's `check()` checks them).
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vegalm.errors import VegaError

T = TypeVar("T")


class ConfigError(VegaError, ValueError):
    """A recipe or override that does not fit the dataclasses."""


# ------------------------------------------------------------------------------------------- YAML 1.2
class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's SafeLoader with YAML 1.2 core-schema scalars (bool: true/false only; 3e-4, .5e-4, 1E-5 are
    floats; 010 is ten; no timestamps) and duplicate keys refused. Set `where` to name the source in errors."""

    where = "YAML"

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first != line:
                raise ConfigError(f"{self.where}: duplicate key {key!r} (lines {first} and {line})")
        return super().construct_mapping(node, deep)


_TAG = "tag:yaml.org,2002:"
Yaml12Loader.yaml_implicit_resolvers = {  # drop YAML 1.1's bool / int / float / timestamp, add 1.2's below
    first: [(tag, rx) for tag, rx in resolvers if tag not in {_TAG + t for t in ("bool", "int", "float", "timestamp")}]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(_TAG + "bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# int before float, so that `3` stays an int
Yaml12Loader.add_implicit_resolver(_TAG + "int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                   list("-+0123456789"))  # fmt: skip
Yaml12Loader.add_implicit_resolver(
    _TAG + "float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"),
)


def _yaml12_int(loader: Yaml12Loader, node) -> int:
    text = loader.construct_scalar(node)
    base = {"0x": 16, "0o": 8}.get(text[:2])
    return int(text[2:], base) if base else int(text, 10)


def _yaml12_float(loader: Yaml12Loader, node) -> float:
    return float(loader.construct_scalar(node).lower().replace(".inf", "inf").replace(".nan", "nan"))


Yaml12Loader.add_constructor(_TAG + "int", _yaml12_int)
Yaml12Loader.add_constructor(_TAG + "float", _yaml12_float)


def parse_yaml(text: str, where: str = "YAML") -> Any:
    """Parse one YAML document with `Yaml12Loader`; `where` (a file name) prefixes duplicate-key errors."""
    loader = Yaml12Loader(text)
    loader.where = where
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------------- dataclasses
# Names people type for a field that has another name here (suggested when the alias's target exists).
ALIASES = {"learning_rate": "lr", "learningrate": "lr", "num_layers": "num_hidden_layers", "layers": "num_hidden_layers",
           "hidden": "hidden_size", "heads": "num_attention_heads", "steps": "max_steps", "train_steps": "max_steps",
           "warmup": "warmup_steps", "bs": "batch_size", "batch": "batch_size", "precision": "mixed_precision",
           "fp16": "mixed_precision", "bf16": "mixed_precision", "epoch": "epochs", "num_epochs": "epochs",
           "num_train_epochs": "epochs", "max_seq_length": "max_length", "seq_length": "seq_len"}  # fmt: skip


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _unknown_key(cls: type, prefix: str, name: str, valid: list[str]) -> ConfigError:
    alias = ALIASES.get(str(name).lower())
    guess = alias if alias in valid else next(iter(difflib.get_close_matches(str(name), valid, n=1)), None)
    hint = f": did you mean `{guess}`?" if guess else ""
    return ConfigError(f"unknown key {prefix}{name}{hint} (valid keys for {cls.__name__}: {', '.join(sorted(valid))})")


def _under(prefix: str, message: str) -> str:
    """Put the dotted `prefix` in front of the key a message names. A message that already starts with the
    section's own name (TrainConfig's `train.lr: ...`) keeps it once: phase1. + train.lr -> phase1.train.lr."""
    lead = "unknown key " if message.startswith("unknown key ") else ""
    rest = message[len(lead):]
    own = prefix.rstrip(".").rpartition(".")[2] + "."
    if prefix and rest.startswith(own):
        prefix = prefix[: -len(own)]
    return lead + prefix + rest


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; convert the lossless cases (int -> float, 1e3 -> int, str -> Path)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    raise  # the mapping was meant for this section: its own error says what is wrong
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):  # "a,b,c" from the command line
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        out = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer():  # 1e3 as people write it
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types, then run its `check()`
    (if it has one: it raises ConfigError naming the field, and the error gets the dotted `prefix`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
    aliases = {v: k for k, v in getattr(cls, "KEY_ALIASES", {}).items() if k in data}  # dotted place -> as given
    if aliases:
        try:
            return _from_dict(cls, move_aliases(cls, data, prefix), prefix)
        except ConfigError as e:  # name the key as the user wrote it (lr, not train.lr)
            msg = str(e)
            for place, short in aliases.items():
                msg = msg.replace(f"{prefix}{place}:", f"{prefix}{short}:")
            raise ConfigError(msg) from None
    return _from_dict(cls, data, prefix)


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in fields]
    rest = _rest_field(cls)
    if unknown and rest is not None:  # a section of its own keys plus another dataclass's, checked by check()
        data = {**{k: v for k, v in data.items() if k in fields}, rest: {**data.get(rest, {}), **{k: data[k] for k in unknown}}}
    elif unknown:
        raise _unknown_key(cls, prefix, unknown[0], fields + list(getattr(cls, "KEY_ALIASES", {})))
    obj = cls(**{name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()})
    if callable(getattr(obj, "check", None)):
        try:
            obj.check()
        except ConfigError as e:
            raise ConfigError(_under(prefix, str(e))) from None
    return obj


def option(help: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with its `--help` text in the metadata (SimCSE style): `lr: float = option("...", 1e-4)`."""
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def move_aliases(cls: type, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Rewrite the short keys a dataclass allows (its `KEY_ALIASES` ClassVar, e.g. `lr` -> `train.lr`) to their
    dotted place; giving both spellings is an error. Other classes' data is returned as it is."""
    aliases: dict[str, str] = getattr(cls, "KEY_ALIASES", {})
    if not any(k in aliases for k in data):
        return data
    out = {k: v for k, v in data.items() if k not in aliases}
    for short in (k for k in data if k in aliases):
        *sections, name = aliases[short].split(".")
        node = out
        for part in sections:
            child = node.get(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{prefix}{part}: expected a mapping, got {child!r}")
            node[part] = child = dict(child)  # a copy: the caller's data is never changed
            node = child
        if name in node:
            raise ConfigError(f"{prefix}{short} and {prefix}{aliases[short]}: the same setting given twice")
        node[name] = data[short]
    return out


def field_help(cls: type, prefix: str = "", skip: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field of `cls` with `metadata["help"]`, nested dataclasses
    included: what `--help` prints, so the help cannot drift from the dataclass."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        sub = next((t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)), None)
        if sub is not None:
            out += field_help(sub, f"{prefix}{f.name}.")
        elif "help" in f.metadata:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # fmt: skip
            out.append((prefix + f.name, "" if default in (None, "", [], {}) else str(default).lower()
                        if isinstance(default, bool) else str(default), f.metadata["help"]))
    return out


def _rest_field(cls: type) -> str | None:
    """The field (metadata `rest: True`, a dict) that takes the keys `cls` does not name itself, if any."""
    return next((f.name for f in dataclasses.fields(cls) if f.metadata.get("rest")), None)


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (Paths as strings), suitable for YAML/JSON; a `rest` field is written flat."""
    if dataclasses.is_dataclass(obj):
        rest = _rest_field(type(obj))
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != rest}
        return {**out, **to_dict(getattr(obj, rest))} if rest else out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _field_keys(cls: type, wanted, prefix: str = "") -> set[str]:
    """Dotted names of the fields of `cls` (nested dataclasses too) whose metadata satisfies `wanted`."""
    out: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if wanted(f.metadata):
            out.add(prefix + f.name)
        tp = hints[f.name]
        for sub in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(sub):
                out |= _field_keys(sub, wanted, f"{prefix}{f.name}.")
    return out


# ------------------------------------------------------------------------------- overrides and recipes
def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003). Values are parsed as YAML 1.2 scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = parse_yaml(raw, f"override {text!r}") if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy). Type checking happens later in `from_dict`."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return out


def _resolve_path(value: str, root: Path) -> str:
    """Each comma-separated part of a relative path or glob, as seen from `root` when it exists there."""
    parts = []
    for part in value.split(","):
        cand = Path(os.path.expanduser(part))
        if part and not cand.is_absolute():
            here = root / cand
            found = glob.glob(str(here)) if glob.has_magic(part) else here.exists()
            cand = Path(os.path.normpath(here)) if found else cand  # else: relative to the working directory
        parts.append(str(cand) if part else part)
    return ",".join(parts)


def _resolve_paths(data: dict[str, Any], keys: set[str], root: Path) -> None:
    for dotted in keys:
        *sections, name = dotted.split(".")
        node: Any = data
        for s in sections:
            node = node.get(s) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(name), str):
            node[name] = _resolve_path(node[name], root)


def load_yaml(path: str | Path, paths: set[str] = frozenset(), whole: set[str] = frozenset(),
              _chain: tuple[Path, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """A recipe as a dict, its `base:` chain merged in. `paths`: dotted keys resolved against the file that
    sets them; `whole`: top-level sections that a child recipe replaces instead of merging."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    if path.resolve() in _chain:
        names = " -> ".join(p.name for p in (*_chain, path.resolve()))
        raise ConfigError(f"{path}: `base:` includes a recipe that includes it ({names})")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    _resolve_paths(data, set(paths), path.parent.resolve())
    base = data.pop("base", None)  # a recipe may extend another: `base: tiny.yaml`
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base: expected a recipe file name, got {base!r}")
        parent = load_yaml(path.parent / base, paths, whole, (*_chain, path.resolve()))
        data = deep_merge({k: v for k, v in parent.items() if k not in whole or k not in data}, data)
    return data


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """`a` updated by `b`, nested mappings merged key by key (b wins); neither input is modified."""
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], recipe: str | Path | None, overrides: list[str] | None = None) -> T:
    """Recipe YAML (optional) + overrides -> dataclass `cls`, checked. Errors name the recipe file and key."""
    data = {}
    if recipe is not None:  # its errors name the file themselves
        whole = {k for k in _field_keys(cls, lambda m: m.get("merge") == "replace") if "." not in k}
        data = load_yaml(recipe, _field_keys(cls, lambda m: m.get("path")), whole)
    try:
        return from_dict(cls, apply_overrides(data, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{recipe}: {e}" if recipe is not None else str(e)) from None
