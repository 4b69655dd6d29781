"""`FinetuneConfig`: one fine-tuning run, nesting the shared `TrainConfig` as pretraining does (`train.lr`).

The short keys of earlier versions (`lr=`, `seed=`, `checkpoint_every=`, ...) stay as aliases of their
`train.` place (`KEY_ALIASES`). `resolve` fills every default in; its result is what the run cache hashes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from vegalm.cache import TOKENIZER_FILES, file_digest, fingerprint
from vegalm.cache import config_hash as _hash
from vegalm.config import ConfigError, from_dict, option, to_dict
from vegalm.data.glue import TaskSpec, get_task, resolve_glue_dir, split_path
from vegalm.errors import VegaError
from vegalm.finetune.models import BACKENDS, has_tokenizer, read_model_config, resolve_model_dir
from vegalm.finetune.tasks import DEFAULT_SETS, SET_OPTIM, task_defaults
from vegalm.finetune.stages.wnli import TREATMENTS as WNLI_TREATMENTS
from vegalm.model.pooling import POOLINGS
from vegalm.model.unpad import hf_type_unpads
from vegalm.train.hardware import native_bf16
from vegalm.train.trainer import TrainConfig

PER_TASK = "unset: the per-task default (finetune/tasks.py)"


@dataclass
class FinetuneTrain(TrainConfig):
    """TrainConfig with fine-tuning's defaults: None takes the per-task value of `defaults` (vega | run_glue)."""

    lr: float | None = option(f"peak learning rate; {PER_TASK}", None)
    epochs: float | None = option(f"passes over the train set; {PER_TASK}", None)
    batch_size: int | None = option(f"examples per optimizer step; {PER_TASK}", None)
    warmup_ratio: float | None = option(f"share of steps warmed up; {PER_TASK}", None)
    max_steps: int | None = option("optimizer steps; if set, replaces epochs", None)
    weight_decay: float | None = option("AdamW decay; unset: 0.01 (vega), 0 (run_glue)", None)
    adam_eps: float | None = option("AdamW eps; unset: 1e-6 (vega), 1e-8 (run_glue)", None)
    save_final: bool = option("checkpoint the last step (a fine-tune keeps its weights in out/model instead)", False)
    keep_last: int = option("checkpoints kept; each holds weights + Adam state (~270 MB for MiniLM-L6)", 1)
    mixed_precision: str = option("no | bf16 | auto (bf16 where the device runs it in hardware: a CUDA GPU with "
                                  "bf16, a CPU with AMX or AVX512-BF16; else no)", "auto")

    def precision(self) -> str:
        """mixed_precision with `auto` decided for this machine."""
        if self.mixed_precision != "auto":
            return self.mixed_precision
        return "bf16" if native_bf16() else "no"

    def check(self) -> None:
        """TrainConfig's rules on the values that are set, plus fine-tuning's own."""
        unset = {f.name: f.default for f in dataclasses.fields(TrainConfig) if getattr(self, f.name) is None}
        if self.mixed_precision not in ("no", "bf16", "auto"):
            raise ConfigError(f"train.mixed_precision: expected one of no, bf16, auto, got {self.mixed_precision!r}")
        TrainConfig.check(dataclasses.replace(self, **unset, mixed_precision=self.precision()))
        for key in ("lr", "epochs", "batch_size", "max_steps"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"train.{key}: expected > 0, got {value!r}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay: expected >= 0, got {self.weight_decay!r}")


# the training keys of a run's cache key, under the flat names they had before TrainConfig was nested, so that
# keys of earlier runs stay valid; another train.* field is keyed (as train.<name>) only when it is not default
FLAT_TRAIN = ("lr", "epochs", "batch_size", "warmup_ratio", "max_steps", "weight_decay", "adam_eps", "schedule",
              "grad_accum", "max_grad_norm", "seed", "mixed_precision", "progress")
UNKEYED_TRAIN = ("log_every", "save_final", "keep_last", "num_workers", "max_bad_steps")  # same numbers either way


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Field names are the YAML / `key=value` names (`train.lr`, or its alias `lr`)."""

    KEY_ALIASES: ClassVar[dict[str, str]] = {**{k: f"train.{k}" for k in FLAT_TRAIN},
                                             "checkpoint_every": "train.save_every"}

    task: str = option("cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli", default="")
    model: str = option("a model folder (config.json + weights), the alias minilm-l6, or a Hub id", default="")
    out: str = option("the run's output folder", default="")
    glue_dir: str | None = option("GLUE TSV folder; unset: $VEGALM_GLUE_DIR or ../shared/data/glue", default=None)
    tokenizer: str | None = option("unset: the tokenizer saved with the weights (init_from, else model)", default=None)
    backend: str = option("auto | vegalm | hf (auto: vegalm for deberta-v2 configs)", default="auto")
    defaults: str = option("per-task hyperparameter set: vega | run_glue", default="vega")
    max_length: int | None = option(f"tokens per example; {PER_TASK}", default=None)
    layerwise_lr_decay: float = option("1.0 = off; e.g. 0.8 (ELECTRA small/base): the llrd trick", default=1.0)
    reinit_top_layers: int = option("re-initialise the top k encoder layers (and a pretrained pooler)", default=0)
    ema_decay: float = option("0 = off; e.g. 0.999: evaluate a moving average of the weights", default=0.0)
    init_from: str | None = option("a fine-tuned model folder to start from (intermediate-task transfer)", default=None)
    tricks: list[str] = option("registered tricks, e.g. adv,selfcal (docs/tricks.md)", default_factory=list)
    trick_args: dict[str, dict] = option("per-trick Args, e.g. trick_args.adv.eps=1e-3", default_factory=dict)
    group_by_length: bool = option("length-grouped batches: faster, but other batches", default=False)
    eval_batch_size: int = option("examples per evaluation batch", default=64)
    eval_test: bool = option("predict the test split(s)", default=True)
    save_model: bool = option("write the evaluated model to out/model", default=True)
    max_train_samples: int | None = option("a fixed random train subset (seed 0, the same for every run seed)",
                                       default=None)
    extra_train: str | None = option("JSONL of extra labelled rows appended to train (self-training's pseudo-labels)",
                                 default=None)
    wnli_treatment: str = option("WNLI only: none | groups | groups+train | majority (docs/finetuning.md)",
                                 default="none")
    allow_new_weights: bool = option("start encoder weights the model folder lacks fresh instead of stopping",
                                 default=False)
    unpad: bool | None = option("pack the real tokens through the layers (model/unpad.py): the same batches, no "
                                "padding in the token-wise work; backend vegalm, or hf models with transformers' "
                                "attention interface (BERT, RoBERTa, MiniLM). Unset: on where supported",
                                default=None)
    pooling: str = option("what the classification head reads: cls (the first token, as the model's own head) | "
                          "mean (the mean of the last layer over the real tokens; the pooling sentence-transformers "
                          "models such as minilm-l6 were trained with). Not saved in out/model's config: see "
                          "docs/finetuning.md", default="cls")
    train: FinetuneTrain = field(default_factory=FinetuneTrain)

    @classmethod
    def of(cls, **settings: Any) -> FinetuneConfig:
        """From keyword settings as a recipe would give them (aliases allowed: `lr=`, `seed=`), checked."""
        return from_dict(cls, settings)

    def check(self) -> None:
        """Raise ConfigError naming the key of an impossible value."""
        for key in ("task", "model", "out"):
            if not getattr(self, key):
                raise ConfigError(f"{key}: required (e.g. task=rte model=minilm-l6 out=runs/ft/rte)")
        rules = [
            ("backend", self.backend in BACKENDS, f"one of {', '.join(BACKENDS)}"),
            ("defaults", self.defaults in DEFAULT_SETS, f"one of {', '.join(DEFAULT_SETS)}"),
            ("wnli_treatment", self.wnli_treatment in WNLI_TREATMENTS, f"one of {', '.join(WNLI_TREATMENTS)}"),
            ("pooling", self.pooling in POOLINGS, f"one of {', '.join(POOLINGS)}"),
            ("layerwise_lr_decay", 0.0 < self.layerwise_lr_decay <= 1.0, "in (0, 1]"),
            ("reinit_top_layers", self.reinit_top_layers >= 0, ">= 0"),
            ("ema_decay", 0.0 <= self.ema_decay < 1.0, "in [0, 1)"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
            *((k, getattr(self, k) is None or getattr(self, k) > 0, "> 0")
              for k in ("max_length", "max_train_samples")),
        ]
        for key, ok, want in rules:
            if not ok:
                raise ConfigError(f"{key}: expected {want}, got {getattr(self, key)!r}")
        self.train.check()
        if len(set(self.tricks)) != len(self.tricks):
            raise ConfigError(f"tricks: a trick is listed twice ({', '.join(self.tricks)})")
        extra = sorted(set(self.trick_args) - set(self.tricks))
        if extra:
            raise ConfigError(f"trick_args.{extra[0]}: trick {extra[0]!r} is not enabled (tricks={self.tricks})")


# Fields that do not change what a run computes: left out of the cache key. The input paths (model,
# init_from, tokenizer, glue_dir, extra_train) are left out too: their contents are hashed instead.
UNHASHED = ("out", "progress", "save_model", "eval_batch_size", "extra_train", "checkpoint_every",
            "model", "init_from", "tokenizer", "glue_dir")


def flat_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings with each aliased `train.<key>` at its short top-level name (`train.seed` -> `seed`), so that a
    sweep can read or refuse a key whichever way the user wrote it; giving both spellings is an error."""
    train = settings.get("train")
    if not isinstance(train, dict):
        return settings
    short_of = {v.split(".", 1)[1]: k for k, v in FinetuneConfig.KEY_ALIASES.items()}
    out, rest = dict(settings), {}
    for key, value in train.items():
        short = short_of.get(key)
        if short is None:
            rest[key] = value
        elif short in settings:
            raise ConfigError(f"{short} and train.{key}: the same setting given twice")
        else:
            out[short] = value
    out.pop("train")
    if rest:
        out["train"] = rest
    return out


def as_config(cfg: FinetuneConfig | dict) -> FinetuneConfig:
    return cfg if isinstance(cfg, FinetuneConfig) else from_dict(FinetuneConfig, cfg)


def _tokenizer_fingerprint(tokenizer: str) -> list | str:
    """The tokenizer's files by content; a Hub id stays a name (transformers fetches its files later)."""
    path = Path(tokenizer)
    if path.is_dir():
        return fingerprint(path, TOKENIZER_FILES)
    return [[path.name, path.stat().st_size, file_digest(path)]] if path.is_file() else tokenizer


def _data_fingerprint(spec: TaskSpec, glue_dir: str, eval_test: bool) -> dict[str, Any]:
    """split -> sha256 of each TSV a run reads (train, dev splits, test splits when predicted; None if absent)."""
    splits = ["train", *spec.dev_splits, *(spec.test_splits if eval_test else ())]
    out: dict[str, Any] = {}
    for split in splits:
        f = split_path(spec.name, split, glue_dir)
        out[split] = file_digest(f) if f.is_file() else None
    if spec.name == "mnli" and eval_test:  # an MNLI run also predicts AX
        f = split_path("ax", "test", glue_dir)
        out["ax"] = file_digest(f) if f.is_file() else None
    return out


def _train_key(train: FinetuneTrain) -> dict[str, Any]:
    """The train.* settings under their flat names, plus train.<name> for any other non-default field."""
    out = {k: getattr(train, k) for k in FLAT_TRAIN}
    out["mixed_precision"] = train.precision()  # the decided value: auto on a bf16 machine runs (and keys) as bf16
    out["checkpoint_every"] = train.save_every
    plain = FinetuneTrain()
    for f in dataclasses.fields(train):
        name = f.name
        if name not in FLAT_TRAIN and name not in UNKEYED_TRAIN and name != "save_every":
            if getattr(train, name) != getattr(plain, name):
                out[f"train.{name}"] = getattr(train, name)
    return out


def resolve(cfg: FinetuneConfig | dict) -> dict[str, Any]:
    """The config with every default filled in and paths made absolute: what the cache key hashes."""
    cfg = as_config(cfg)
    cfg.check()
    spec = get_task(cfg.task)
    if spec.name == "ax":
        raise ConfigError("task: AX has no training data; fine-tune task=mnli (its run also predicts AX)")
    model_dir = resolve_model_dir(cfg.model)
    init_dir = resolve_model_dir(cfg.init_from, "init_from") if cfg.init_from else None
    model_type = read_model_config(init_dir or model_dir).get("model_type")
    backend = cfg.backend if cfg.backend != "auto" else ("vegalm" if model_type == "deberta-v2" else "hf")
    if cfg.tokenizer is not None:
        tok = Path(cfg.tokenizer).expanduser()
        tokenizer = str(tok.resolve()) if tok.exists() else cfg.tokenizer
    else:
        tok_dir = init_dir if init_dir is not None and has_tokenizer(init_dir) else model_dir
        if not has_tokenizer(tok_dir):
            raise VegaError(f"model={cfg.model}: {tok_dir} has no tokenizer (tokenizer.json); pass tokenizer=PATH")
        tokenizer = str(tok_dir)
    glue_dir = str(resolve_glue_dir(cfg.glue_dir).resolve())
    d, optim, t = task_defaults(spec.name, cfg.defaults), SET_OPTIM[cfg.defaults], cfg.train
    out = {k: v for k, v in to_dict(cfg).items() if k != "train"}
    out.update(_train_key(t))
    out.update(
        task=spec.name, model=str(model_dir), model_fingerprint=fingerprint(model_dir), model_type=model_type,
        init_from=str(init_dir) if init_dir else None, init_fingerprint=fingerprint(init_dir) if init_dir else None,
        tokenizer=tokenizer, tokenizer_fingerprint=_tokenizer_fingerprint(tokenizer), backend=backend,
        glue_dir=glue_dir, data_fingerprint=_data_fingerprint(spec, glue_dir, cfg.eval_test),
        lr=t.lr if t.lr is not None else d.lr,
        epochs=t.epochs if t.epochs is not None else d.epochs,
        batch_size=t.batch_size if t.batch_size is not None else d.batch_size,
        warmup_ratio=t.warmup_ratio if t.warmup_ratio is not None else d.warmup_ratio,
        max_length=cfg.max_length if cfg.max_length is not None else d.max_length,
        weight_decay=t.weight_decay if t.weight_decay is not None else optim["weight_decay"],
        adam_eps=t.adam_eps if t.adam_eps is not None else optim["adam_eps"],
        trick_args={name: to_dict(args) for name, (_, args) in trick_classes(cfg).items()},
    )
    out["unpad"] = cfg.unpad if cfg.unpad is not None else (backend == "vegalm" or hf_type_unpads(model_type))
    out.update(_extra_train_key(cfg.extra_train))
    revised = {n: cls.revision for n, (cls, _) in trick_classes(cfg).items() if getattr(cls, "revision", 1) != 1}
    if revised:  # a trick whose computation changed at the same Args bumps its `revision`: older caches go stale
        out["trick_revisions"] = revised
    if t.grad_accum > 1:
        # micro-batches are length-sorted slices of each batch; named in the key only here, so keys of
        # grad_accum=1 runs made before sorting existed stay valid
        out["micro_batch_order"] = "length"
    if not cfg.allow_new_weights:
        out.pop("allow_new_weights")
    if not out["unpad"]:
        out.pop("unpad")  # on, it changes the dropout stream (masks over packed tokens); off, older keys stay valid
    if cfg.pooling == "cls":
        out.pop("pooling")  # the models' own head; older keys stay valid
    if spec.name != "wnli" or cfg.wnli_treatment == "none":
        out.pop("wnli_treatment")  # only a WNLI run is changed by it; older keys stay valid
    return out


def train_config(resolved: dict[str, Any], cfg: FinetuneConfig) -> TrainConfig:
    """The Trainer's config: cfg.train with the per-task defaults of `resolved` filled in."""
    fill = {k: resolved[k] for k in ("lr", "batch_size", "warmup_ratio", "weight_decay", "adam_eps")}
    steps = cfg.train.max_steps
    tcfg = dataclasses.replace(cfg.train, **fill, max_steps=steps or 1, mixed_precision=resolved["mixed_precision"],
                               epochs=None if steps else float(resolved["epochs"]))
    return TrainConfig(**{f.name: getattr(tcfg, f.name) for f in dataclasses.fields(TrainConfig)})


def _extra_train_key(path: str | None) -> dict[str, Any]:
    """extra_train: its absolute path (not hashed) and a digest of its content (hashed); unset, no key."""
    if path is None:
        return {}
    f = Path(path).expanduser()
    if not f.is_file():
        raise ConfigError(f"extra_train: no such file {path}")
    return {"extra_train": str(f.resolve()), "extra_train_sha256": file_digest(f)}


def config_hash(resolved: dict[str, Any]) -> str:
    """The run cache key: the resolved config without the UNHASHED fields."""
    return _hash(resolved, UNHASHED)


def trick_classes(cfg: FinetuneConfig) -> dict[str, tuple[type, Any]]:
    """name -> (trick class, parsed Args) for the enabled tricks, in order."""
    if not cfg.tricks:
        return {}
    from vegalm.finetune.tricks import TRICKS as registry

    out = {}
    for name in cfg.tricks:
        if name not in registry:
            raise ConfigError(f"tricks: unknown trick {name!r} (available: {', '.join(sorted(registry)) or 'none'})")
        cls = registry[name]
        out[name] = (cls, from_dict(cls.Args, dict(cfg.trick_args.get(name, {})), prefix=f"trick_args.{name}."))
    return out


__all__ = ["FinetuneConfig", "FinetuneTrain", "flat_settings", "resolve", "config_hash", "train_config", "trick_classes",
           "UNHASHED", "as_config"]
