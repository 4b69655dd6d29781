"""The one training loop of vegalm (pretraining and fine-tuning), on Hugging Face Accelerate.

    trainer = Trainer(model, objective, dataset, collate, TrainConfig(lr=3e-4, max_steps=500), "runs/x")
    summary = trainer.train(resume=True)            # resume=True continues from runs/x/checkpoints/latest

`objective(model, batch) -> (loss, logs)`; `batch_size` is the global batch of one optimizer step. What a
step does, reproducibility, resume, signals, callbacks and outputs: docs/training.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, send_to_device, set_seed
from torch import Tensor, nn

from vegalm.config import ConfigError, option
from vegalm.errors import Interrupted, VegaError
from vegalm.train.allocator import keep_freed_memory
from vegalm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, step_dir_name, step_of
from vegalm.train.hardware import gloo_on_cpu, launched_processes
from vegalm.train.interrupt import StopSignals
from vegalm.train.optim import SCHEDULES, build_optimizer, build_scheduler
from vegalm.train.sampler import Order, ResumableBatchSampler

log = logging.getLogger(__name__)

Objective = Callable[[nn.Module, dict], tuple[Tensor, dict[str, float]]]


@dataclass
class TrainConfig:
    """The shared training loop's settings (pretraining phases and fine-tuning nest it as `train`)."""

    lr: float = option("peak learning rate", 1e-4)
    weight_decay: float = option("AdamW weight decay (not on biases and norms)", 0.01)
    adam_beta1: float = option("AdamW beta1", 0.9)
    adam_beta2: float = option("AdamW beta2", 0.999)
    adam_eps: float = option("AdamW eps", 1e-6)
    max_steps: int = option("optimizer steps", 1000)
    epochs: float | None = option("if set, replaces max_steps: ceil(epochs x steps per epoch)", None)
    warmup_steps: int = option("linear warm-up steps", 0)
    warmup_ratio: float = option("warm-up as a share of the steps, used if warmup_steps is 0", 0.0)
    schedule: str = option("linear | cosine | constant", "linear")
    batch_size: int = option("GLOBAL batch per optimizer step (all processes x accumulation)", 32)
    grad_accum: int = option("micro-batches per optimizer step", 1)
    max_grad_norm: float = option("gradient clipping norm (0 = off)", 1.0)
    mixed_precision: str = option("no | bf16 | fp16", "no")
    seed: int = option("seed of the weights' noise, dropout and batch order", 42)
    log_every: int = option("steps between metrics.jsonl / TensorBoard rows", 10)
    save_every: int = option("checkpoint every N steps (0 = only at the end)", 0)
    save_final: bool = option("checkpoint the last step", True)
    keep_last: int = option("checkpoints kept", 2)
    max_bad_steps: int = option("consecutive non-finite losses before stopping with a diagnostic", 5)
    num_workers: int = option("DataLoader worker processes", 0)
    fused_adamw: bool = option("torch AdamW(fused=True) where supported; else foreach", True)
    progress: bool = option("progress bars", True)
    fsdp: bool = option("shard weights, gradients and optimizer state over the processes (FSDP2, one unit per layer; "
                        "launch with torchrun)", False)
    fsdp_reshard_after_forward: bool = option("FSDP: free gathered layer weights after forward (ZeRO-3); false "
                                              "keeps them for backward (more memory, fewer all-gathers)", True)
    activation_checkpointing: bool = option("recompute each layer's activations in backward (less memory, "
                                            "~1/3 more compute)", False)

    def check(self) -> None:
        """Raise ConfigError naming the key of an impossible value."""
        rules = [
            ("mixed_precision", self.mixed_precision in ("no", "bf16", "fp16"), "one of no, bf16, fp16"),
            ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("max_steps", self.epochs is not None or self.max_steps >= 1, ">= 1"),
            ("epochs", self.epochs is None or self.epochs > 0, "> 0"),
            ("lr", math.isfinite(self.lr) and self.lr >= 0, "a finite number >= 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0, "in [0, 1)"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("save_every", self.save_every >= 0, ">= 0"),
            ("keep_last", self.keep_last >= 1, ">= 1"),
            ("max_bad_steps", self.max_bad_steps >= 1, ">= 1"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
            ("mixed_precision", not self.fsdp or self.mixed_precision in ("no", "bf16"), "no or bf16 under fsdp"),
        ]
        for key, ok, want in rules:
            if not ok:
                raise ConfigError(f"train.{key}: expected {want}, got {getattr(self, key)!r}")


class NonFiniteLossError(VegaError):
    """Training stopped after `max_bad_steps` consecutive non-finite losses."""


class _Window:
    """Sums over the steps since the last log line (local to this process except loss / grad norm)."""

    def __init__(self) -> None:
        self.steps = self.good = 0
        self.loss = 0.0
        self.grad_norm: Tensor | float = 0.0
        self.tokens = 0.0
        self.extra: dict[str, float] = {}
        self.t0 = time.perf_counter()


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        train_dataset: torch.utils.data.Dataset,
        collate_fn: Callable | None,
        cfg: TrainConfig,
        out_dir: str | Path,
        param_groups: list[dict] | None = None,
        callbacks: list = (),
        accelerator: Accelerator | None = None,
        orders: Sequence[Order] = (),
    ):
        cfg.check()
        self.cfg = cfg
        self.objective = objective
        self.callbacks = list(callbacks)
        self.out_dir = Path(out_dir)
        launched = launched_processes()
        if accelerator is None:
            _allow_new_precision(cfg.mixed_precision)
            # step_scheduler_with_optimizer=False: we never hand the scheduler to accelerate anyway
            # (its wrapper steps it once per process), but say so for anyone reusing this accelerator.
            accelerator = Accelerator(
                mixed_precision=cfg.mixed_precision,
                gradient_accumulation_steps=cfg.grad_accum,
                step_scheduler_with_optimizer=False,
                cpu=gloo_on_cpu(),
            )
        else:
            accelerator.gradient_accumulation_steps = cfg.grad_accum
        if launched > 1 and accelerator.num_processes != launched:
            raise VegaError(
                f"launched with WORLD_SIZE={launched} but Accelerate set up {accelerator.num_processes} process(es); "
                "on CPU create the Accelerator with cpu=True (or let the Trainer create it)"
            )
        self.accelerator = acc = accelerator
        # A stream (an IterableDataset with state_dict/load_state_dict, e.g. data.streaming.StreamingSegments)
        # keeps its own position, saved per process; a sized dataset is drawn by the resumable sampler.
        self.stream = train_dataset if isinstance(train_dataset, torch.utils.data.IterableDataset) else None
        if self.stream is not None:
            self.sampler = None
            _check_stream(self.stream, cfg, acc.num_processes)
            batching: dict[str, Any] = dict(batch_size=cfg.batch_size // (cfg.grad_accum * acc.num_processes))
            self.max_steps = cfg.max_steps
        else:
            self.sampler = ResumableBatchSampler(
                len(train_dataset), cfg.batch_size, cfg.grad_accum, acc.process_index, acc.num_processes, cfg.seed,
                orders=orders,  # e.g. sampler.length_grouping(lengths): reorder each epoch's permutation
            )
            batching = dict(batch_sampler=self.sampler)
            if cfg.epochs is not None:
                self.max_steps = max(1, math.ceil(cfg.epochs * self.sampler.steps_per_epoch))
            else:
                self.max_steps = cfg.max_steps
        self.loader = torch.utils.data.DataLoader(
            train_dataset,
            **batching,
            collate_fn=collate_fn,
            num_workers=cfg.num_workers,
            pin_memory=acc.device.type == "cuda",
            # Its own generator: creating an iterator must not draw from the global torch RNG,
            # or a resumed run (new iterator mid-epoch) would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(cfg.seed + acc.process_index),
        )
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise VegaError(f"Accelerate's {acc.distributed_type.value} plugin is not supported: launch with torchrun "
                            "(or a DDP accelerate config) and set train.fsdp=true (docs/scaling.md)")
        if acc.device.type == "cpu":
            keep_freed_memory()  # train/allocator.py: no page faults on every S512 activation
        model.to(acc.device)  # before building the optimizer, so fused AdamW sees the real device
        self.fsdp = cfg.fsdp
        if cfg.fsdp:  # shard before the optimizer exists: it must hold the sharded parameters
            from vegalm.train.fsdp import shard_model

            model = shard_model(model, mixed_precision=cfg.mixed_precision, device=acc.device,
                                reshard_after_forward=cfg.fsdp_reshard_after_forward,
                                activation_checkpointing=cfg.activation_checkpointing)
        elif cfg.activation_checkpointing:
            from vegalm.train.fsdp import enable_checkpointing

            enable_checkpointing(model)
        optimizer = build_optimizer(model, cfg, param_groups)
        if cfg.fsdp:  # not acc.prepare(model): under torchrun that would wrap the sharded model in DDP
            self.wrapped_model, self.optimizer = model, acc.prepare(optimizer)
        else:
            self.wrapped_model, self.optimizer = acc.prepare(model, optimizer)
        self.scheduler = build_scheduler(_inner(self.optimizer), cfg, self.max_steps)
        self.step = 0
        self.bad_streak = 0  # consecutive skipped steps
        self.bad_total = 0
        self.elapsed_before = 0.0  # training seconds of earlier processes, up to the checkpoint resumed from
        self._t_start: float | None = None  # when the train() in progress started its clock
        self.last_metrics: dict[str, Any] = {}
        self._bad_losses: list[list[float]] = []  # loss values of the current streak (diagnostic)
        self._writer = None
        self._step_lr = 0.0  # lr used by the latest update
        self.should_stop = False  # a callback may set it (on every process): the loop saves and returns
        self._nan_steps = _test_nan_steps()
        self._stop = StopSignals()  # SIGINT / SIGTERM during train(): checkpoint, then raise Interrupted
        self._agreed_signal = 0  # the largest signal any process had received at the latest step's gather

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.wrapped_model)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {
            "step": self.step,
            "max_steps": self.max_steps,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "bad_streak": self.bad_streak,
            "bad_total": self.bad_total,
            "elapsed": self.elapsed(),  # so that a resumed run's time counts the steps it keeps
            "num_processes": self.accelerator.num_processes,
            "config": dataclasses.asdict(self.cfg),
        }

    def save(self) -> Path:
        """Write a checkpoint for the current step (collective: every process must call it)."""
        acc = self.accelerator
        kwargs: dict[str, Any] = dict(model=self.model, optimizer=_inner(self.optimizer))
        if self.fsdp:  # every process writes its own shards (torch.distributed.checkpoint)
            kwargs = dict(model=None, optimizer=None, sharded=(self.model, _inner(self.optimizer)))
        return save_checkpoint(
            self.ckpt_root,
            self.step,
            trainer_state=self._trainer_state(),
            keep_last=self.cfg.keep_last,
            rank=acc.process_index,
            is_main=self.is_main,
            barrier=acc.wait_for_everyone,
            rank_state=self._rank_state(),
            **kwargs,
        )

    def _rank_state(self) -> dict[str, Any]:
        """What only this process knows: its callbacks' states and its stream's position."""
        out: dict[str, Any] = {"callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else {}
                                             for cb in self.callbacks]}  # fmt: skip
        if self.stream is not None:
            out["stream"] = self.stream.state_dict()
        return out

    def _resume(self, path: Path | None) -> bool:
        if path is None:
            if self.is_main:
                log.info("no checkpoint under %s: starting from scratch", self.ckpt_root)
            return False
        if self.fsdp:
            state = load_checkpoint(path, model=None, sharded=(self.model, _inner(self.optimizer)),
                                    rank=self.accelerator.process_index)
        else:
            state = load_checkpoint(path, model=self.model, optimizer=_inner(self.optimizer),
                                    rank=self.accelerator.process_index)
        if state["num_processes"] != self.accelerator.num_processes and self.is_main:
            log.warning("%s was written by %d processes, resuming with %d: not bit-exact",
                        path, state["num_processes"], self.accelerator.num_processes)
        self.step = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])
        if (state["sampler"] is None) != (self.sampler is None):
            raise VegaError(f"{path}: written {'with' if state['sampler'] is None else 'without'} a streamed "
                            f"dataset, this run {'streams' if self.sampler is None else 'does not'}: keep "
                            "data.streaming as it was to resume")  # fmt: skip
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        else:
            self.stream.load_state_dict(state["rank_state"]["stream"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.bad_streak, self.bad_total = int(state["bad_streak"]), int(state["bad_total"])
        self.elapsed_before = float(state.get("elapsed", 0.0))  # absent in checkpoints of before 2026-12-08: 0
        saved = state["rank_state"].get("callbacks", [])
        if len(saved) != len(self.callbacks) and any(saved):
            raise VegaError(f"{path}: saved with {len(saved)} callback state(s), this run has {len(self.callbacks)} "
                            "callbacks: cannot resume with a different callback list")
        for cb, cb_state in zip(self.callbacks, saved):
            if hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)
        if self.is_main:
            log.info("resumed from %s (step %d)", path, self.step)
        return True

    # ------------------------------------------------------------------ the loop
    def elapsed(self) -> float:
        """Training seconds of the steps this run holds: this process's plus, if resumed, the checkpoint's."""
        return self.elapsed_before + (time.perf_counter() - self._t_start if self._t_start is not None else 0.0)

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Train to `max_steps` (or until a callback sets `should_stop`), checkpoint, return a summary:
        {step, loss (last logged), skipped_steps, elapsed, elapsed_before (the checkpoint's part of it),
        resumed_from (0 unless resumed), checkpoint, metrics (last log line)}."""
        acc, cfg = self.accelerator, self.cfg
        self.should_stop = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt = latest_checkpoint(self.ckpt_root) if resume else None
        if self.is_main:  # opened before the RNGs are seeded / restored, so it cannot shift them
            # TensorBoard hides the events after the step this call starts from that earlier processes (or calls)
            # wrote: on a resume those after the checkpoint, on a fresh start all (metrics.jsonl is trimmed alike)
            self._tb(purge_step=(step_of(ckpt) if ckpt is not None else self.step) + 1)
        if not (resume and self._resume(ckpt)):
            set_seed(cfg.seed + acc.process_index)  # after any RNG use by model construction
        resumed_from = self.step
        if self.is_main:
            self._trim_metrics()
        acc.step = 0  # accelerate's micro-batch counter: a step boundary
        model = self.wrapped_model
        model.train()
        it = iter(self.loader)
        pbar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            pbar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        elapsed_before, self._t_start = self.elapsed_before, time.perf_counter()
        win = _Window()
        last_saved = self.step if resume and self.step > 0 else -1
        self._stop, self._agreed_signal = StopSignals(), 0
        try:
            self._stop.__enter__()
            while self.step < self.max_steps:
                self._one_step(model, it, win)
                if pbar is not None:
                    pbar.update(1)
                for cb in self.callbacks:
                    if hasattr(cb, "on_step_end"):
                        cb.on_step_end(self, self.step)
                if self.step % cfg.log_every == 0 or self.step == self.max_steps:
                    self._log(win, pbar)
                    win = _Window()
                if self.should_stop or self._signalled():
                    break
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.max_steps:
                    self.save()
                    last_saved = self.step
            signum = self._signalled(final=True)
            if (self.should_stop or signum) and self.step % cfg.log_every and self.step != self.max_steps:
                self._log(win, pbar)  # the partial window
            if last_saved == self.step:
                ckpt = self.ckpt_root / step_dir_name(self.step)
            else:  # an interrupted run saves whenever checkpointing is on, so that it can resume
                ckpt = self.save() if cfg.save_final or (signum and cfg.save_every) else None
            if signum:
                self._stop.acknowledge()
                raise Interrupted(self.step, str(ckpt) if ckpt is not None else None, signum)
        finally:
            self._stop.__exit__(None, None, None)
            if pbar is not None:
                pbar.close()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        self.elapsed_before, self._t_start = self.elapsed(), None  # the clock stops between train() calls
        return {
            "step": self.step,
            "loss": self.last_metrics.get("loss"),
            "skipped_steps": self.bad_total,
            "elapsed": self.elapsed_before,
            "elapsed_before": elapsed_before,
            "resumed_from": resumed_from,
            "checkpoint": str(ckpt) if ckpt is not None else None,
            "metrics": dict(self.last_metrics),
        }

    def _one_step(self, model: nn.Module, it, win: _Window) -> None:
        acc, cfg = self.accelerator, self.cfg
        losses, extra, tokens = [], {}, 0.0
        for micro in range(cfg.grad_accum):
            batch = send_to_device(next(it), acc.device)
            if self.fsdp:  # reduce-scatter the gradients on the last micro-batch only (accumulate() cannot: no no_sync)
                model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            with acc.accumulate(model):  # no gradient all-reduce except on the last micro-batch
                with acc.autocast():
                    loss, logs = self.objective(model, batch)
                if self.step + 1 in self._nan_steps:  # test hook (VEGALM_TEST_NAN_STEPS)
                    loss = loss * float("nan")
                acc.backward(loss)  # divides by grad_accum (and scales for fp16)
            losses.append(loss.detach().float().reshape(()))
            for k, v in logs.items():
                if k == "tokens":
                    tokens += float(v)
                else:
                    extra[k] = extra.get(k, 0.0) + float(v) / cfg.grad_accum
        # Every process gets every micro-batch loss, and each process's pending stop signal rides along
        # (the last value of each row), so all processes stop at the same step without another collective.
        flag = torch.full_like(losses[0], float(self._stop.pending))
        rows = acc.gather(torch.stack([*losses, flag])).reshape(acc.num_processes, -1)
        self._agreed_signal = int(rows[:, -1].max())
        all_losses = rows[:, :-1].reshape(-1)
        step_loss = all_losses.mean()
        finite = bool(torch.isfinite(step_loss))
        grad_norm = None
        if finite:
            if cfg.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor holding the global norm
                    grad_norm = grad_norm.full_tensor()
            self.optimizer.step()
            self.bad_streak = 0
            self._bad_losses = []
        else:
            self.bad_streak += 1
            self.bad_total += 1
            self._bad_losses.append(all_losses.tolist())
        self.optimizer.zero_grad(set_to_none=True)
        self._step_lr = max(g["lr"] for g in _inner(self.optimizer).param_groups)
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            self.scheduler.step()
        if self.sampler is not None:
            self.sampler.advance()
        self.step += 1
        win.steps += 1
        win.tokens += tokens
        if finite:
            win.good += 1
            win.loss += float(step_loss)
            if grad_norm is not None:
                win.grad_norm = win.grad_norm + grad_norm.detach().float()
            for k, v in extra.items():
                win.extra[k] = win.extra.get(k, 0.0) + v
        else:
            self._report_bad_step()

    def _signalled(self, final: bool = False) -> int:
        """The stop signal every process agrees on at this step boundary (0: none). `final` (after the
        last step) takes one more gather, so a signal that came after the last gather is not lost."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self._stop.pending
        if final:
            local = torch.tensor([float(self._stop.pending)], device=acc.device)
            self._agreed_signal = max(self._agreed_signal, int(acc.gather(local).max()))
        return self._agreed_signal

    def _report_bad_step(self) -> None:
        cfg = self.cfg
        first = self.step - self.bad_streak + 1
        values = ", ".join(f"{v:g}" for v in self._bad_losses[-1])
        if self.is_main:
            log.warning("step %d: non-finite loss (%s); update skipped (%d in a row, %d in total)",
                        self.step, values, self.bad_streak, self.bad_total)
        if self.bad_streak >= cfg.max_bad_steps:
            hint = "lower train.lr or use a longer warm-up"
            if cfg.mixed_precision == "fp16":
                hint += "; fp16 overflows easily: use mixed_precision=bf16 (or no)"
            else:
                hint += "; check the data for empty or all-padding batches"
            raise NonFiniteLossError(
                f"stopping at step {self.step}: the loss was non-finite for {self.bad_streak} steps in a row "
                f"(steps {first}-{self.step}; last micro-batch losses: {values}); {hint}"
            )

    # ------------------------------------------------------------------ logging
    def _log(self, win: _Window, pbar) -> None:
        acc = self.accelerator
        keys = sorted(win.extra)
        # tokens and the objective's values are per-process: sum them over processes (same key order everywhere)
        local = torch.tensor([win.tokens, *(win.extra[k] for k in keys)], dtype=torch.float64, device=acc.device)
        total = acc.reduce(local, reduction="sum").tolist() if acc.num_processes > 1 else local.tolist()
        dt = max(time.perf_counter() - win.t0, 1e-9)
        good = max(win.good, 1)
        metrics: dict[str, Any] = {
            "step": self.step,
            "loss": win.loss / win.good if win.good else None,
            "lr": self._step_lr,  # of the window's last update (the largest group lr under layer-wise decay)
            "grad_norm": float(win.grad_norm) / good if win.good and self.cfg.max_grad_norm > 0 else None,
            "tokens_per_s": total[0] / dt,
            "elapsed": self.elapsed(),
            "skipped_steps": self.bad_total,
        }
        for k, v in zip(keys, total[1:]):
            metrics[k] = v / (good * acc.num_processes)
        for cb in self.callbacks:  # a callback may add values to the line (pretrain/health.py: held-out metrics)
            if hasattr(cb, "extra_metrics"):
                metrics.update(cb.extra_metrics(self, metrics))
        self.last_metrics = metrics
        if pbar is not None:
            pbar.set_postfix(
                loss=f"{metrics['loss']:.4f}" if metrics["loss"] is not None else "nan",
                tok_s=f"{metrics['tokens_per_s']:.0f}",
                lr=f"{metrics['lr']:.2e}",
                refresh=False,
            )
        if self.is_main:
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
            writer = self._tb()
            for k, v in metrics.items():
                if k != "step" and v is not None:
                    writer.add_scalar(f"train/{k}", v, self.step)
        for cb in self.callbacks:
            if hasattr(cb, "on_log"):
                cb.on_log(self, metrics)

    def _trim_metrics(self) -> None:
        """Drop metrics.jsonl lines past the current step (a fresh run empties it; a resume drops the
        lines logged after the checkpoint, which will be logged again)."""
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        path.write_text("".join(kept), encoding="utf-8")

    def _tb(self, purge_step: int | None = None):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=purge_step)
        return self._writer


def _check_stream(stream, cfg: TrainConfig, num_processes: int) -> None:
    """A stream is resumable only as this process's DataLoader reads it (no workers), in whole local batches."""
    if not (hasattr(stream, "state_dict") and hasattr(stream, "load_state_dict")):
        raise VegaError(f"{type(stream).__name__}: a streamed dataset needs state_dict() and load_state_dict() "
                        "to resume")  # fmt: skip
    if cfg.num_workers:
        raise ConfigError("train.num_workers: must be 0 with a streamed dataset (its position is the reader's)")
    if cfg.epochs is not None:
        raise ConfigError("train.epochs: a streamed dataset has no length; set train.max_steps")
    if cfg.batch_size % (cfg.grad_accum * num_processes):
        raise ConfigError(f"train.batch_size: {cfg.batch_size} must be divisible by grad_accum ({cfg.grad_accum}) "
                          f"x processes ({num_processes})")


def _allow_new_precision(mixed_precision: str) -> None:
    """Accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with another
    mixed_precision (pretraining in bf16, then fine-tuning in fp32, in one `vegalm run`). Reset only
    that state; the PartialState (the process group under torchrun) is kept."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state(reset_partial_state=False)


def _test_nan_steps() -> frozenset[int]:
    """VEGALM_TEST_NAN_STEPS="3,4" -> {3, 4} (see the module docstring); empty when unset."""
    raw = os.environ.get("VEGALM_TEST_NAN_STEPS", "")
    try:
        return frozenset(int(s) for s in raw.split(",") if s.strip())
    except ValueError:
        raise VegaError(f"VEGALM_TEST_NAN_STEPS={raw!r}: expected comma-separated step numbers") from None


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
