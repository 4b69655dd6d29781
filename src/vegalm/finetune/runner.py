"""Fine-tune one encoder on one GLUE task with the shared Trainer; evaluate dev, predict test.

    from vegalm.finetune.runner import FinetuneConfig, run_finetune
    res = run_finetune(FinetuneConfig(task="rte", model="minilm-l6", out="runs/ft/rte"))

Resolved config and content-hash cache key, the trick wiring and the run itself; the model is built in
models.py, evaluated in predict.py and written out in outputs.py. Outputs, caching and resume: docs/finetuning.md.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vegalm.cache import TOKENIZER_FILES, file_digest, fingerprint
from vegalm.cache import config_hash as _hash
from vegalm.config import ConfigError, from_dict, to_dict
from vegalm.data.glue import TaskSpec, get_task, load_split, resolve_glue_dir, split_path
from vegalm.errors import VegaError
from vegalm.finetune.metrics import compute_metrics, task_score
from vegalm.finetune.models import (BACKENDS, MODEL_ALIASES, build_model, forward_inputs, has_tokenizer, layer_id,
                                    minilm_path, read_model_config, reinit_top_layers, resolve_model_dir)
from vegalm.finetune.outputs import (check_out_dir, claim_out_dir, prepare_checkpoints, remove_checkpoints,
                                     row_ranges, save_logits, save_model, write_results, write_tsv)
from vegalm.finetune.predict import class_predictions, metric_key, predict_logits, wnli_report
from vegalm.finetune.tasks import (DEFAULT_SETS, SET_OPTIM, Collator, GlueDataset, enable_length_grouping,
                                  enable_sorted_micro_batches, task_defaults)
from vegalm.finetune.wnli import TREATMENTS as WNLI_TREATMENTS
from vegalm.outdir import lock_dir

log = logging.getLogger(__name__)

# Fields that do not change what a run computes: left out of the cache key. The input paths (model,
# init_from, tokenizer, glue_dir, extra_train) are left out too: their contents are hashed instead
# (model_fingerprint, init_fingerprint, tokenizer_fingerprint, data_fingerprint, extra_train_sha256).
UNHASHED = ("out", "progress", "save_model", "eval_batch_size", "extra_train", "checkpoint_every",
            "model", "init_from", "tokenizer", "glue_dir")


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Field names are the YAML / `key=value` names; None = the per-task default."""

    task: str = ""
    model: str = ""  # a model folder (config.json + weights), the alias minilm-l6, or a Hub id when online
    out: str = ""
    glue_dir: str | None = None  # None: $VEGALM_GLUE_DIR or ../shared/data/glue
    tokenizer: str | None = None  # None: the tokenizer saved with the weights (init_from, else model)
    backend: str = "auto"  # auto | vegalm | hf
    defaults: str = "vega"  # vega | run_glue (see vegalm.finetune.tasks)
    lr: float | None = None
    epochs: float | None = None
    batch_size: int | None = None
    warmup_ratio: float | None = None
    max_length: int | None = None
    max_steps: int | None = None  # if set, replaces epochs (quick checks)
    weight_decay: float | None = None  # None: 0.01 (vega) / 0.0 (run_glue)
    adam_eps: float | None = None  # None: 1e-6 (vega) / 1e-8 (run_glue)
    schedule: str = "linear"
    grad_accum: int = 1  # k > 1: each batch as k length-sorted micro-batches; same gradient, less padding
    max_grad_norm: float = 1.0
    seed: int = 42
    mixed_precision: str = "no"  # no | bf16
    layerwise_lr_decay: float = 1.0  # 1.0 = off; e.g. 0.8 (ELECTRA small/base)
    reinit_top_layers: int = 0  # re-initialise the top k encoder layers (and a pretrained pooler)
    ema_decay: float = 0.0  # 0 = off; e.g. 0.999: evaluate an exponential moving average of the weights
    init_from: str | None = None  # a fine-tuned model folder (intermediate-task transfer)
    tricks: list[str] = field(default_factory=list)
    trick_args: dict[str, dict] = field(default_factory=dict)
    group_by_length: bool = False  # length-grouped batches: faster, but other batches (finetune/tasks.py)
    eval_batch_size: int = 64
    eval_test: bool = True
    save_model: bool = True
    max_train_samples: int | None = None  # a fixed random subset (seed 0, same for every run seed)
    # JSONL of extra labelled training rows (guid, index, text_a, text_b, label id / STS-B score), appended
    # after the (subset) train set; ablate.py writes its test pseudo-labels here. Hashed by content.
    extra_train: str | None = None
    # WNLI only: none | groups | groups+train | majority (vegalm/finetune/wnli.py)
    wnli_treatment: str = "none"
    # Checkpoint every N optimizer steps (0 = never): a run stopped midway continues from its latest
    # checkpoint when started again with the same config (same result on CPU; trick and EMA state included).
    # Each checkpoint holds the weights and Adam state (~270 MB for MiniLM-L6); deleted when the run ends.
    checkpoint_every: int = 0
    # Start encoder weights that the model folder lacks (or skip ones it has in excess) fresh instead of
    # stopping; off, only the task head may be new. Hashed only when on, so older cache keys stay valid.
    allow_new_weights: bool = False
    progress: bool = True

    def check(self) -> None:
        """Raise ConfigError naming the key of an impossible value."""
        for key in ("task", "model", "out"):
            if not getattr(self, key):
                raise ConfigError(f"{key}: required (e.g. task=rte model=minilm-l6 out=runs/ft/rte)")
        positive = ("lr", "epochs", "batch_size", "max_length", "max_steps", "max_train_samples")
        rules = [
            ("backend", self.backend in BACKENDS, f"one of {', '.join(BACKENDS)}"),
            ("defaults", self.defaults in DEFAULT_SETS, f"one of {', '.join(DEFAULT_SETS)}"),
            ("mixed_precision", self.mixed_precision in ("no", "bf16"), "one of no, bf16"),
            ("wnli_treatment", self.wnli_treatment in WNLI_TREATMENTS, f"one of {', '.join(WNLI_TREATMENTS)}"),
            ("warmup_ratio", self.warmup_ratio is None or 0.0 <= self.warmup_ratio < 1.0, "in [0, 1)"),
            ("weight_decay", self.weight_decay is None or self.weight_decay >= 0, ">= 0"),
            ("layerwise_lr_decay", 0.0 < self.layerwise_lr_decay <= 1.0, "in (0, 1]"),
            ("reinit_top_layers", self.reinit_top_layers >= 0, ">= 0"),
            ("ema_decay", 0.0 <= self.ema_decay < 1.0, "in [0, 1)"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0"),
            *((k, getattr(self, k) is None or getattr(self, k) > 0, "> 0") for k in positive),
        ]
        for key, ok, want in rules:
            if not ok:
                raise ConfigError(f"{key}: expected {want}, got {getattr(self, key)!r}")
        if len(set(self.tricks)) != len(self.tricks):
            raise ConfigError(f"tricks: a trick is listed twice ({', '.join(self.tricks)})")
        extra = sorted(set(self.trick_args) - set(self.tricks))
        if extra:
            raise ConfigError(f"trick_args.{extra[0]}: trick {extra[0]!r} is not enabled (tricks={self.tricks})")


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


# ------------------------------------------------------------------------------- resolved settings


def resolve(cfg: FinetuneConfig) -> dict[str, Any]:
    """The config with every default filled in and paths made absolute: what the cache key hashes."""
    cfg.check()
    spec = get_task(cfg.task)
    if spec.name == "ax":
        raise ConfigError("task: AX has no training data; fine-tune task=mnli (its run also predicts AX)")
    model_dir = resolve_model_dir(cfg.model)
    init_dir = resolve_model_dir(cfg.init_from, "init_from") if cfg.init_from else None
    weights_dir = init_dir or model_dir
    model_type = read_model_config(weights_dir).get("model_type")
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
    d = task_defaults(spec.name, cfg.defaults)
    optim = SET_OPTIM[cfg.defaults]
    out = to_dict(cfg)
    out.update(
        task=spec.name,
        model=str(model_dir),
        model_fingerprint=fingerprint(model_dir),
        model_type=model_type,
        init_from=str(init_dir) if init_dir else None,
        init_fingerprint=fingerprint(init_dir) if init_dir else None,
        tokenizer=tokenizer,
        tokenizer_fingerprint=_tokenizer_fingerprint(tokenizer),
        backend=backend,
        glue_dir=glue_dir,
        data_fingerprint=_data_fingerprint(spec, glue_dir, cfg.eval_test),
        lr=cfg.lr if cfg.lr is not None else d.lr,
        epochs=cfg.epochs if cfg.epochs is not None else d.epochs,
        batch_size=cfg.batch_size if cfg.batch_size is not None else d.batch_size,
        warmup_ratio=cfg.warmup_ratio if cfg.warmup_ratio is not None else d.warmup_ratio,
        max_length=cfg.max_length if cfg.max_length is not None else d.max_length,
        weight_decay=cfg.weight_decay if cfg.weight_decay is not None else optim["weight_decay"],
        adam_eps=cfg.adam_eps if cfg.adam_eps is not None else optim["adam_eps"],
        trick_args={name: to_dict(args) for name, (_, args) in _trick_classes(cfg).items()},
    )
    out.update(_extra_train_key(cfg.extra_train))
    if cfg.grad_accum > 1:
        # micro-batches are length-sorted slices of each batch (tasks.sort_within_batches); named in the key
        # only here, so keys of grad_accum=1 runs made before sorting existed stay valid
        out["micro_batch_order"] = "length"
    if not cfg.allow_new_weights:
        out.pop("allow_new_weights")
    if spec.name != "wnli" or cfg.wnli_treatment == "none":
        # only a WNLI run is changed by it: a sweep may set it for every task without touching the other
        # tasks' cache keys, and keys of runs made before the field existed stay valid
        out.pop("wnli_treatment")
    return out


def _extra_train_key(path: str | None) -> dict[str, Any]:
    """extra_train: its absolute path (not hashed, see UNHASHED) and a digest of its content (hashed). Unset,
    no digest key is added, so cache keys of runs made before the field existed stay valid."""
    if path is None:
        return {}
    f = Path(path).expanduser()
    if not f.is_file():
        raise ConfigError(f"extra_train: no such file {path}")
    return {"extra_train": str(f.resolve()), "extra_train_sha256": file_digest(f)}


def load_extra_train(path: str | Path, spec: TaskSpec) -> list:
    """The `extra_train` JSONL rows as Examples (label: class id, or a float score for STS-B)."""
    from vegalm.data.glue import Example

    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                label = float(row["label"]) if spec.is_regression else int(row["label"])
                ex = Example(str(row["guid"]), int(row["index"]), str(row["text_a"]), row.get("text_b"), label)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise VegaError(f"{path}:{line_no}: bad extra_train row ({type(e).__name__}: {e})") from None
            if not spec.is_regression and not 0 <= label < spec.num_labels:
                raise VegaError(f"{path}:{line_no}: label {label} outside [0, {spec.num_labels}) for {spec.name}")
            out.append(ex)
    return out


def config_hash(resolved: dict[str, Any]) -> str:
    """The run cache key: the resolved config without the UNHASHED fields."""
    return _hash(resolved, UNHASHED)


def cached_results(out: str | Path, key: str) -> dict | None:
    """out/results.json if it was written by a run with cache key `key` and its prediction files exist."""
    path = Path(out) / "results.json"
    if not path.is_file():
        return None
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        log.warning("%s: unreadable, rerunning", path)
        return None
    if res.get("config_hash") != key:
        log.warning("%s: written with another config (hash %s, now %s): rerunning and overwriting",
                    path, res.get("config_hash"), key)
        return None
    needed = ["dev_predictions.tsv", "dev_logits.npy"]
    if res.get("test_rows"):
        needed += ["test_predictions.tsv", "test_logits.npy"]
    if any(not (Path(out) / f).is_file() for f in needed):
        return None
    return res


# ------------------------------------------------------------------------------------------ tricks


def _trick_classes(cfg: FinetuneConfig) -> dict[str, tuple[type, Any]]:
    """name -> (trick class, parsed Args) for the enabled tricks, in order."""
    if not cfg.tricks:
        return {}
    from vegalm.finetune.tricks import TRICKS as registry

    out = {}
    for name in cfg.tricks:
        if name not in registry:
            raise ConfigError(f"tricks: unknown trick {name!r} (available: {', '.join(sorted(registry)) or 'none'})")
        cls = registry[name]
        args = from_dict(cls.Args, dict(cfg.trick_args.get(name, {})), prefix=f"trick_args.{name}.")
        out[name] = (cls, args)
    return out


class _StepHooks:
    """Trainer callback: trick `on_step_end` hooks and the EMA update, after every optimizer step."""

    def __init__(self, tricks: list[tuple[str, Any]]):
        self.tricks = tricks
        self.ema: _EMA | None = None

    def on_step_end(self, trainer, step: int) -> None:
        model = trainer.model
        for _, trick in self.tricks:
            trick.on_step_end(model, step, trainer.max_steps)
        if self.ema is not None:
            self.ema.update(model, step)

    # resumable state (saved with each checkpoint by the Trainer)
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"tricks": {name: trick.state_dict() for name, trick in self.tricks}}
        if self.ema is not None:
            state["ema"] = {n: t.cpu() for n, t in self.ema.shadow.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, trick in self.tricks:
            trick.load_state_dict(state["tricks"].get(name, {}))
        if self.ema is not None:
            for n, t in state["ema"].items():
                self.ema.shadow[n].copy_(t)


class _EMA:
    """Exponential moving average of the trainable weights, kept in fp32.

    decay_t = min(ema_decay, (1 + t) / (10 + t)) (the TensorFlow `num_updates` rule): early averages are
    not dominated by the initial weights, which matters for runs of a few hundred steps.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(d).add_(p.detach().float(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))


def _versions() -> dict[str, str]:
    import transformers

    import vegalm

    return {"vegalm": vegalm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _device_info(device: torch.device) -> dict[str, Any]:
    """Which machine produced a result: the device, its name (the GPU's, else the CPU's) and threads."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "cpu_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------- the run


def train_subset(examples: list, n: int | None) -> list:
    """`max_train_samples`: a random sample of n examples (seed 0, the same for every run seed), in file order."""
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(0).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def _load_tokenizer(name: str):
    from vegalm.data.tokenizer import load_tokenizer

    return load_tokenizer(name)


class NotCachedError(VegaError):
    """run_finetune(cached_only=True) found no finished run with this config in its folder."""


def run_finetune(cfg: FinetuneConfig | dict, *, cached_only: bool = False) -> dict[str, Any]:
    """Train, evaluate dev, predict test, write out/ (see the module docstring); returns results.json's
    content (plus "cached": True when it was read back instead of recomputed). With `cached_only`, a run
    that is not in the cache raises NotCachedError instead of training."""
    t0 = time.perf_counter()
    if isinstance(cfg, dict):
        cfg = from_dict(FinetuneConfig, cfg)
    resolved = resolve(cfg)
    key = config_hash(resolved)
    out = Path(cfg.out)
    cached = cached_results(out, key)
    if cached is not None and (not cfg.save_model or (out / "model" / "config.json").is_file()):
        log.info("%s: cached (config %s), not retraining", out, key)
        return {**cached, "cached": True}
    if cached_only:
        raise NotCachedError(f"{out}: no finished run with config {key}")
    check_out_dir(out)  # the user's own files under our names: one line, before any work
    with ExitStack() as held:  # the folder's lock, taken by _train before its first write
        return _train(cfg, resolved, key, out, t0, held)


def _train(cfg: FinetuneConfig, resolved: dict[str, Any], key: str, out: Path, t0: float,
           held: ExitStack) -> dict[str, Any]:
    from accelerate.utils import set_seed

    from vegalm.train.trainer import TrainConfig, Trainer

    spec = get_task(resolved["task"])
    glue_dir = resolved["glue_dir"]
    train_ex = train_subset(load_split(spec.name, "train", glue_dir), cfg.max_train_samples)
    if resolved.get("extra_train"):  # e.g. pseudo-labelled test rows (ablate.py), re-indexed after train
        from vegalm.finetune.transductive import merge_train

        train_ex = merge_train(train_ex, load_extra_train(resolved["extra_train"], spec))
    dev_ex = {s: load_split(spec.name, s, glue_dir) for s in spec.dev_splits}
    test_ex: dict[str, list] = {}
    if cfg.eval_test:
        for s in spec.test_splits:
            if split_path(spec.name, s, glue_dir).is_file():
                test_ex[s] = load_split(spec.name, s, glue_dir)
            else:
                log.warning("%s: no test file, test predictions skipped", split_path(spec.name, s, glue_dir))
        if spec.name == "mnli" and split_path("ax", "test", glue_dir).is_file():
            test_ex["ax"] = load_split("ax", "test", glue_dir)  # AX is predicted by the MNLI model
    bs = resolved["batch_size"]
    if len(train_ex) < bs:
        raise ConfigError(f"batch_size: {bs} is more than the {len(train_ex)} training examples")

    tokenizer = _load_tokenizer(resolved["tokenizer"])
    ml = resolved["max_length"]
    train_ds = GlueDataset.from_examples(train_ex, tokenizer, spec.name, ml)
    dev_ds = {s: GlueDataset.from_examples(ex, tokenizer, spec.name, ml) for s, ex in dev_ex.items()}
    test_ds = {s: GlueDataset.from_examples(ex, tokenizer, "ax" if s == "ax" else spec.name, ml)
               for s, ex in test_ex.items()}
    collate = Collator(tokenizer.pad_token_id)

    set_seed(cfg.seed)  # the new head's initialisation depends on the run seed
    num_labels = spec.num_labels
    model, fresh = build_model(resolved, num_labels)
    hidden = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
    if cfg.defaults == "vega" and cfg.lr is None and hidden >= 768:
        log.warning("defaults=vega uses lr %.0e, tuned for small encoders; this model has hidden size %d: "
                    "consider lr=2e-5 (base) or 1e-5 (large)", resolved["lr"], hidden)
    reinit = reinit_top_layers(model, cfg.reinit_top_layers) if cfg.reinit_top_layers else []
    tricks = [(name, cls(args, spec, num_labels)) for name, (cls, args) in _trick_classes(cfg).items()]
    # selfcal first (it rewrites the task term), then adversarial terms, then weight averaging (Trick.priority)
    tricks.sort(key=lambda nt: getattr(type(nt[1]), "priority", 50))
    for _, trick in tricks:
        trick.setup(model)
    keys = forward_inputs(model)
    objective = _make_objective(spec, keys, tricks)

    param_groups = None
    if cfg.layerwise_lr_decay < 1.0:
        from vegalm.train.optim import layerwise_lr_groups

        param_groups = layerwise_lr_groups(model, resolved["lr"], cfg.layerwise_lr_decay, layer_id,
                                           weight_decay=resolved["weight_decay"])
    tcfg = TrainConfig(
        lr=resolved["lr"], weight_decay=resolved["weight_decay"], adam_eps=resolved["adam_eps"],
        max_steps=cfg.max_steps or 1, epochs=None if cfg.max_steps else float(resolved["epochs"]),
        warmup_ratio=resolved["warmup_ratio"], schedule=cfg.schedule, batch_size=bs, grad_accum=cfg.grad_accum,
        max_grad_norm=cfg.max_grad_norm, mixed_precision=cfg.mixed_precision, seed=cfg.seed,
        log_every=10, save_every=cfg.checkpoint_every, save_final=False, keep_last=1, progress=cfg.progress,
    )
    held.enter_context(lock_dir(out))  # from here on out/ is written: one run at a time
    claim_out_dir(out, key)
    resume = prepare_checkpoints(out, key, cfg.checkpoint_every)
    (out / "results.json").unlink(missing_ok=True)
    hooks = _StepHooks(tricks)
    trainer = Trainer(model, objective, train_ds, collate, tcfg, out, param_groups=param_groups, callbacks=[hooks])
    # after the Trainer moved the model to its device, so the average lives beside the weights
    ema = hooks.ema = _EMA(trainer.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if cfg.group_by_length:
        enable_length_grouping(trainer.sampler, train_ds.lengths)
    if cfg.grad_accum > 1:
        enable_sorted_micro_batches(trainer.sampler, train_ds.lengths)
    t_load = time.perf_counter() - t0
    summary = trainer.train(resume=resume)
    t_train = time.perf_counter() - t0 - t_load

    # ----------------------------------------------------------------------- evaluate
    t1 = time.perf_counter()
    model = trainer.model
    if ema is not None:
        ema.copy_to(model)
    eval_model = model
    for _, trick in tricks:
        if hasattr(trick, "eval_model"):
            eval_model = trick.eval_model(eval_model)
    device = trainer.accelerator.device
    bf16 = cfg.mixed_precision == "bf16"

    def run(ds: GlueDataset, desc: str) -> np.ndarray:
        return predict_logits(eval_model, ds, collate, cfg.eval_batch_size, device, bf16, cfg.progress, desc)

    dev_logits = {s: run(ds, f"{spec.name} {s}") for s, ds in dev_ds.items()}
    test_logits = {s: run(ds, f"{spec.name} {s}") for s, ds in test_ds.items()}
    dev_metrics, dev_preds = {}, {}
    for s, ds in dev_ds.items():
        dev_preds[s] = class_predictions(spec, s, dev_logits[s], resolved, glue_dir, dev_ex[s])
        dev_metrics[s] = compute_metrics(metric_key(spec, s), dev_preds[s], [f["labels"] for f in ds.features])
    test_preds = {s: class_predictions(spec, s, test_logits[s], resolved, glue_dir, test_ex[s])
                  for s in test_ds} if not spec.is_regression else None
    dev_score = float(np.mean([task_score(metric_key(spec, s), m) for s, m in dev_metrics.items()]))
    t_eval = time.perf_counter() - t1

    results = {
        "task": spec.name,
        "seed": cfg.seed,
        "config_hash": key,
        "dev": dev_metrics,
        "dev_score": dev_score,
        "dev_metric_keys": {s: metric_key(spec, s) for s in dev_ds},
        "dev_rows": row_ranges(list(dev_ds), list(dev_logits.values())),
        "test_rows": row_ranges(list(test_ds), list(test_logits.values())),
        "num_labels": num_labels,
        "num_train_examples": len(train_ds),
        "train": {"steps": summary["step"], "final_loss": summary["loss"], "skipped_steps": summary["skipped_steps"],
                  "epochs": summary["step"] * bs / len(train_ds), "resumed_from_step": summary["resumed_from"]},
        "model": {"backend": resolved["backend"], "weights_from": resolved["init_from"] or resolved["model"],
                  "fresh_weights": fresh, "reinitialised": reinit,
                  "num_parameters": sum(p.numel() for p in model.parameters()), "evaluated": (
                      "ema" if ema is not None else "final") + "".join(
                      f"+{n}" for n, t in tricks if hasattr(t, "eval_model"))},
        "tricks": list(cfg.tricks),
        "timing": {"load_s": round(t_load, 2), "train_s": round(t_train, 2), "eval_s": round(t_eval, 2),
                   "wall_s": round(time.perf_counter() - t0, 2)},
        "versions": _versions(),
        **_device_info(device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": resolved,
    }
    if spec.name == "wnli":
        results["wnli"] = wnli_report(resolved, dev_ex, dev_logits, test_ex, test_logits)
    if trainer.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_tsv(out / "dev_predictions.tsv", [(s, dev_ds[s], dev_logits[s]) for s in dev_ds], spec, True,
                   None if spec.is_regression else dev_preds)
        save_logits(out / "dev_logits.npy", list(dev_logits.values()))
        if test_ds:
            # an MNLI run's AX rows share MNLI's three labels, so one spec formats both
            write_tsv(out / "test_predictions.tsv", [(s, test_ds[s], test_logits[s]) for s in test_ds], spec, False,
                       test_preds)
            save_logits(out / "test_logits.npy", list(test_logits.values()))
        if cfg.save_model:
            save_model(eval_model if hasattr(eval_model, "save_pretrained") else model, tokenizer, out / "model", key)
        results["timing"]["wall_s"] = round(time.perf_counter() - t0, 2)
        write_results(out, results)
        remove_checkpoints(out)
    return {**results, "cached": False}


def _make_objective(spec: TaskSpec, keys: tuple[str, ...], tricks: list[tuple[str, Any]]):
    regression = spec.is_regression

    def objective(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        # `index` stays in the batch: self-calibration keys its per-example memory on it.
        out = model(**{k: batch[k] for k in keys if k in batch})
        logits = out.logits.float()
        labels = batch["labels"]
        if regression:
            loss = F.mse_loss(logits.squeeze(-1), labels.float())
        else:
            loss = F.cross_entropy(logits, labels)
        logs = {"task_loss": float(loss.detach()), "tokens": float(batch["attention_mask"].sum())}
        for name, trick in tricks:
            loss, extra = trick.loss(model, batch, out, loss)
            logs.update({f"{name}/{k}": float(v) for k, v in extra.items()})
        return loss, logs

    return objective


__all__ = [
    "FinetuneConfig",
    "run_finetune",
    "class_predictions",
    "resolve",
    "config_hash",
    "cached_results",
    "NotCachedError",
    "fingerprint",
    "UNHASHED",
    "minilm_path",
    "resolve_model_dir",
    "build_model",
    "predict_logits",
    "reinit_top_layers",
    "MODEL_ALIASES",
    "train_subset",
    "load_extra_train",
]
