"""Fine-tune one encoder on one GLUE task: load -> build -> train -> evaluate -> write.

    from vegalm.finetune.run import run_finetune
    res = run_finetune({"task": "rte", "model": "minilm-l6", "out": "runs/ft/rte"})

The config and its cache key are in config.py, the model in models.py, the objective and every trick in
tricks/, evaluation in predict.py and what is written in outputs.py. Outputs, caching, resume: docs/finetuning.md.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from vegalm.data.glue import get_task, load_extra_train, load_split, split_path, train_subset
from vegalm.config import ConfigError
from vegalm.errors import VegaError
from vegalm.finetune.config import FinetuneConfig, as_config, config_hash, resolve, train_config, trick_classes
from vegalm.finetune.models import build_model, forward_inputs, layer_id, reinit_top_layers
from vegalm.finetune.outputs import (cached_results, check_out_dir, claim_out_dir, prepare_checkpoints,
                                     remove_checkpoints, results_record, write_outputs)
from vegalm.finetune.predict import evaluate_splits
from vegalm.finetune.stages.self_training import merge_train
from vegalm.finetune.tasks import Collator, GlueDataset
from vegalm.finetune.tricks import build_objective, changes_eval_model, sort_tricks, trick_param_groups
from vegalm.outdir import lock_dir
from vegalm.train.ema import EMA
from vegalm.train.optim import layerwise_lr_groups
from vegalm.train.sampler import length_grouping, sorted_micro_batches

log = logging.getLogger(__name__)


class NotCachedError(VegaError):
    """run_finetune(cached_only=True) found no finished run with this config in its folder."""


def run_finetune(cfg: FinetuneConfig | dict, *, cached_only: bool = False) -> dict[str, Any]:
    """Train, evaluate dev, predict test, write out/; returns results.json's content (plus "cached": True when
    it was read back instead of recomputed). With `cached_only`, a run not in the cache raises NotCachedError."""
    t0 = time.perf_counter()
    cfg = as_config(cfg)
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


def load_examples(cfg: FinetuneConfig, resolved: dict[str, Any]) -> tuple[list, dict[str, list], dict[str, list]]:
    """(train, {dev split: rows}, {test split: rows}); an MNLI run also predicts AX."""
    spec, glue_dir = get_task(resolved["task"]), resolved["glue_dir"]
    train = train_subset(load_split(spec.name, "train", glue_dir), cfg.max_train_samples)
    if resolved.get("extra_train"):  # e.g. self-training's pseudo-labelled test rows, re-indexed after train
        train = merge_train(train, load_extra_train(resolved["extra_train"], spec))
    dev = {s: load_split(spec.name, s, glue_dir) for s in spec.dev_splits}
    test: dict[str, list] = {}
    if cfg.eval_test:
        for task, s in [(spec.name, s) for s in spec.test_splits] + ([("ax", "test")] if spec.name == "mnli" else []):
            if split_path(task, s, glue_dir).is_file():
                test["ax" if task == "ax" else s] = load_split(task, s, glue_dir)
            elif task != "ax":
                log.warning("%s: no test file, test predictions skipped", split_path(task, s, glue_dir))
    bs = resolved["batch_size"]
    if len(train) < bs:
        raise ConfigError(f"batch_size: {bs} is more than the {len(train)} training examples")
    return train, dev, test


def _train(cfg: FinetuneConfig, resolved: dict[str, Any], key: str, out: Path, t0: float,
           held: ExitStack) -> dict[str, Any]:
    from accelerate.utils import set_seed

    from vegalm.data.tokenizer import load_tokenizer
    from vegalm.train.trainer import Trainer

    # ------------------------------------------------------------------ load
    spec, ml = get_task(resolved["task"]), resolved["max_length"]
    train_ex, dev_ex, test_ex = load_examples(cfg, resolved)
    tokenizer = load_tokenizer(resolved["tokenizer"])
    train_ds = GlueDataset.from_examples(train_ex, tokenizer, spec.name, ml)
    dev_ds = {s: GlueDataset.from_examples(ex, tokenizer, spec.name, ml) for s, ex in dev_ex.items()}
    test_ds = {s: GlueDataset.from_examples(ex, tokenizer, "ax" if s == "ax" else spec.name, ml)
               for s, ex in test_ex.items()}
    collate = Collator(tokenizer.pad_token_id)

    # ------------------------------------------------------------------ build
    set_seed(cfg.train.seed)  # the new head's initialisation depends on the run seed
    model, fresh = build_model(resolved, spec.num_labels)
    hidden = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
    if cfg.defaults == "vega" and cfg.train.lr is None and hidden >= 768:
        log.warning("defaults=vega uses lr %.0e, tuned for small encoders; this model has hidden size %d: "
                    "consider lr=2e-5 (base) or 1e-5 (large)", resolved["lr"], hidden)
    reinit = reinit_top_layers(model, cfg.reinit_top_layers) if cfg.reinit_top_layers else []
    tricks = sort_tricks([(n, cls(args, spec, spec.num_labels)) for n, (cls, args) in trick_classes(cfg).items()])
    for _, trick in tricks:
        trick.setup(model)
    objective = build_objective(spec.num_labels, forward_inputs(model), tricks)
    param_groups = trick_param_groups(tricks, model, resolved["lr"], resolved["weight_decay"])
    if cfg.layerwise_lr_decay < 1.0:  # the llrd trick's shortcut
        if param_groups is not None:
            raise ConfigError("layerwise_lr_decay: a trick already sets the parameter groups (use one of the two)")
        param_groups = layerwise_lr_groups(model, resolved["lr"], cfg.layerwise_lr_decay, layer_id,
                                           weight_decay=resolved["weight_decay"])
    orders = ([length_grouping(train_ds.lengths)] if cfg.group_by_length else []) + (
        [sorted_micro_batches(train_ds.lengths)] if cfg.train.grad_accum > 1 else [])  # fmt: skip

    # ------------------------------------------------------------------ train
    held.enter_context(lock_dir(out))  # from here on out/ is written: one run at a time
    claim_out_dir(out, key)
    resume = prepare_checkpoints(out, key, cfg.train.save_every)
    (out / "results.json").unlink(missing_ok=True)
    hooks = _StepHooks(tricks)
    trainer = Trainer(model, objective, train_ds, collate, train_config(resolved, cfg), out,
                      param_groups=param_groups, callbacks=[hooks], orders=orders)
    if cfg.ema_decay > 0:  # after the Trainer moved the model, so the average lives beside the weights
        hooks.ema = EMA(trainer.model, cfg.ema_decay, lerp=False)  # lerp=False: the float order of earlier runs
    t_load = time.perf_counter() - t0
    summary = trainer.train(resume=resume)
    t_train = time.perf_counter() - t0 - t_load + summary["elapsed_before"]  # a resumed run's earlier steps count

    # ------------------------------------------------------------------ evaluate
    t1 = time.perf_counter()
    eval_model = trainer.model
    if hooks.ema is not None:
        hooks.ema.copy_to(eval_model)
    for _, trick in tricks:
        eval_model = trick.eval_model(eval_model)
    evaluated = "+".join(["ema" if hooks.ema is not None else "final",
                          *(n for n, t in tricks if changes_eval_model(t))])  # only what changes the evaluated model
    ev = evaluate_splits(eval_model, spec, resolved, collate, cfg, trainer.accelerator.device,
                         dev_ex, dev_ds, test_ex, test_ds)
    t_eval = time.perf_counter() - t1

    # ------------------------------------------------------------------ write
    results = results_record(spec, cfg, resolved, key, ev, summary, train_ds, trainer, fresh=fresh, reinit=reinit,
                             evaluated=evaluated, timing={"load_s": t_load, "train_s": t_train, "eval_s": t_eval})
    if trainer.is_main:
        saved = eval_model if hasattr(eval_model, "save_pretrained") else trainer.model
        write_outputs(out, spec, ev, results, saved if cfg.save_model else None, tokenizer, key, t0)
        remove_checkpoints(out)
    return {**results, "cached": False}


class _StepHooks:
    """Trainer callback: each trick's `on_step_end` and the `ema_decay` average after every optimizer step,
    and their resumable state (saved with each checkpoint by the Trainer)."""

    def __init__(self, tricks: list[tuple[str, Any]]):
        self.tricks, self.ema = tricks, None

    def on_step_end(self, trainer, step: int) -> None:
        for _, trick in self.tricks:
            trick.on_step_end(trainer.model, step, trainer.max_steps)
        if self.ema is not None:
            self.ema.update(trainer.model, step=step)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"tricks": {name: trick.state_dict() for name, trick in self.tricks}}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, trick in self.tricks:
            trick.load_state_dict(state["tricks"].get(name, {}))
        if self.ema is not None:
            ema = state["ema"]  # checkpoints of earlier versions hold the bare {name: fp32 tensor} dict
            self.ema.load_state_dict(ema if "weights" in ema else {"num_updates": 0, "weights": ema})


__all__ = ["run_finetune", "NotCachedError", "load_examples"]
