"""In-process tests of the training loop, optimizer groups, schedule and sampler (tiny model, CPU, ~seconds)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from vegalm.config import ConfigError, from_dict
from vegalm.errors import Interrupted, VegaError
from vegalm.train.checkpoint import capture_rng, restore_rng
from vegalm.train.optim import default_layer_id, layerwise_lr_groups, lr_multiplier, no_decay_names
from vegalm.train.sampler import ResumableBatchSampler
from vegalm.train.trainer import NonFiniteLossError, TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tiny_train as tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def make_trainer(out: Path, nan_at=(), callbacks=(), n=128, dropout=0.1, **overrides) -> Trainer:
    torch.manual_seed(0)
    model = tiny.TinyModel(dropout=dropout)
    kw = dict(lr=1e-2, max_steps=20, warmup_steps=2, batch_size=16, log_every=1, progress=False, seed=0)
    kw.update(overrides)
    ref: dict = {}
    trainer = Trainer(model, tiny.make_objective(set(nan_at), ref), tiny.TinyDataset(n), tiny.collate,
                      TrainConfig(**kw), out, callbacks=list(callbacks))
    ref["trainer"] = trainer
    return trainer


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class Snapshots:
    def __init__(self):
        self.params: dict[int, list[torch.Tensor]] = {}

    def on_step_end(self, trainer, step):
        self.params[step] = [p.detach().clone() for p in trainer.model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- training
def test_loss_decreases_and_outputs(tmp_path):
    logs = []

    class OnLog:
        def on_log(self, trainer, metrics):
            logs.append(metrics)

    trainer = make_trainer(tmp_path, callbacks=[OnLog()], max_steps=60)
    summary = trainer.train()
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert len(losses) == 60 and len(logs) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.1, (first, last)
    assert summary["step"] == 60 and summary["skipped_steps"] == 0
    line = read_metrics(tmp_path)[-1]
    for key in ("step", "loss", "lr", "tokens_per_s", "elapsed", "grad_norm", "accuracy"):
        assert key in line, key
    assert line["tokens_per_s"] > 0 and 0.0 <= line["accuracy"] <= 1.0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (tmp_path / "checkpoints" / "step-000060" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000060"


def test_log_window_averages(tmp_path):
    make_trainer(tmp_path / "a", max_steps=8, log_every=1).train()
    make_trainer(tmp_path / "b", max_steps=8, log_every=4).train()
    per_step = [m["loss"] for m in read_metrics(tmp_path / "a")]
    windows = read_metrics(tmp_path / "b")
    assert [m["step"] for m in windows] == [4, 8]
    assert windows[0]["loss"] == pytest.approx(sum(per_step[:4]) / 4, rel=1e-6)
    assert windows[1]["loss"] == pytest.approx(sum(per_step[4:]) / 4, rel=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_shape(schedule):
    T, W = 20, 4
    f = [lr_multiplier(s, T, W, schedule) for s in range(T + 1)]
    assert f[:W] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # first update already at lr > 0
    assert f[W] == pytest.approx(1.0)
    if schedule == "constant":
        assert f[W:] == pytest.approx([1.0] * (T + 1 - W))
        return
    assert all(a >= b for a, b in zip(f[W:], f[W + 1 :])), "not monotone after warm-up"
    assert f[T] == pytest.approx(0.0, abs=1e-12)
    mid = lr_multiplier(W + (T - W) // 2, T, W, schedule)
    assert mid == pytest.approx(0.5)  # both linear and cosine are at one half halfway through
    quarter = lr_multiplier(W + (T - W) // 4, T, W, schedule)
    assert quarter == pytest.approx(0.75 if schedule == "linear" else (1 + math.cos(math.pi / 4)) / 2)


def test_trainer_follows_schedule(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=10, warmup_ratio=0.2, schedule="cosine", lr=1e-3)
    trainer.train()
    got = [m["lr"] for m in read_metrics(tmp_path)]
    want = [1e-3 * lr_multiplier(s, 10, 2, "cosine") for s in range(10)]
    assert got == pytest.approx(want, rel=1e-9)


def test_nan_steps_are_skipped_and_counted(tmp_path):
    snaps = Snapshots()
    trainer = make_trainer(tmp_path, nan_at={3, 4, 7}, callbacks=[snaps], max_steps=9, max_bad_steps=3)
    summary = trainer.train()
    assert summary["skipped_steps"] == 3
    assert same(snaps.params[2], snaps.params[3]) and same(snaps.params[3], snaps.params[4])
    assert same(snaps.params[6], snaps.params[7])
    assert not same(snaps.params[4], snaps.params[5]) and not same(snaps.params[1], snaps.params[2])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    opt = trainer.optimizer.optimizer
    adam_steps = {float(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"]}
    assert adam_steps == {6.0}  # 9 steps, 3 skipped
    lines = read_metrics(tmp_path)
    assert [m["loss"] is None for m in lines] == [s in (3, 4, 7) for s in range(1, 10)]
    assert lines[-1]["skipped_steps"] == 3


def test_nan_streak_stops_with_diagnostic(tmp_path):
    trainer = make_trainer(tmp_path, nan_at={3, 4, 5, 6}, max_steps=10, max_bad_steps=3, mixed_precision="no")
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    msg = str(err.value)
    assert "step 5" in msg and "3 steps in a row" in msg and "steps 3-5" in msg and "nan" in msg
    assert "lower train.lr" in msg
    assert isinstance(err.value, VegaError)


def test_grad_accum_matches_full_batch(tmp_path):
    a = make_trainer(tmp_path / "a", dropout=0.0, max_steps=6, batch_size=16, grad_accum=1)
    a.train()
    wa = [p.detach().clone() for p in a.model.parameters()]
    AcceleratorState._reset_state(reset_partial_state=True)
    b = make_trainer(tmp_path / "b", dropout=0.0, max_steps=6, batch_size=16, grad_accum=4)
    b.train()
    for x, y in zip(wa, b.model.parameters()):
        torch.testing.assert_close(x, y.detach(), rtol=1e-4, atol=1e-5)  # Adam magnifies rounding of tiny grads
    la = [m["loss"] for m in read_metrics(tmp_path / "a")]
    lb = [m["loss"] for m in read_metrics(tmp_path / "b")]
    assert la == pytest.approx(lb, rel=1e-5)


def test_epochs_convert_to_steps(tmp_path):
    trainer = make_trainer(tmp_path, n=70, batch_size=8, epochs=1.5)  # 8 full batches per epoch (6 dropped)
    assert trainer.sampler.steps_per_epoch == 8 and trainer.max_steps == 12


def test_should_stop_saves_and_returns(tmp_path):
    class Stop:
        def on_step_end(self, trainer, step):
            trainer.should_stop = step == 5

    summary = make_trainer(tmp_path, callbacks=[Stop()], max_steps=20, log_every=4).train()
    assert summary["step"] == 5 and summary["checkpoint"].endswith("step-000005")
    assert [m["step"] for m in read_metrics(tmp_path)] == [4, 5]


def test_save_final_off_writes_no_checkpoint(tmp_path):
    summary = make_trainer(tmp_path, max_steps=3, save_final=False).train()
    assert summary["step"] == 3 and summary["checkpoint"] is None
    assert not list(tmp_path.rglob("step-*"))  # fine-tuning keeps weights, not optimizer state


class SendSignal:
    """Sends `sig` to this very process at the end of the given steps (the real signal path, no mock)."""

    def __init__(self, sig, steps, times=1):
        self.sig, self.steps, self.times = sig, set(steps), times

    def on_step_end(self, trainer, step):
        if step in self.steps:
            for i in range(self.times):
                if i:  # standard signals do not queue: two kills in a row can arrive as one, so wait until the
                    deadline = time.monotonic() + 10  # handler has seen the first (a fixed 0.2 s sleep was not
                    while not trainer._stop.pending and time.monotonic() < deadline:  # enough on a loaded CI)
                        time.sleep(0.01)
                os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_raises_and_resumes_bit_exact(tmp_path, sig):
    straight = make_trainer(tmp_path / "straight", max_steps=8, save_every=4)
    straight.train()
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted) as e:
        make_trainer(tmp_path / "cut", callbacks=[SendSignal(sig, {3})], max_steps=8, save_every=4).train()
    assert signal.getsignal(sig) is before  # the trainer's handler is gone after train()
    ckpt = tmp_path / "cut" / "checkpoints" / "step-000003"
    assert e.value.step == 3 and e.value.checkpoint == str(ckpt) and (ckpt / "COMPLETE").is_file()
    assert e.value.exit_code == 128 + sig and "\n" not in str(e.value)
    assert str(e.value) == f"interrupted at step 3: checkpoint saved in {ckpt}; run the same command again to resume"
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = make_trainer(tmp_path / "cut", max_steps=8, save_every=4)
    assert resumed.train(resume=True)["resumed_from"] == 3
    assert same(list(straight.model.parameters()), list(resumed.model.parameters()))


def test_a_resumed_run_counts_the_time_of_the_steps_it_keeps(tmp_path):
    class Slow:  # 50 ms per step, so that the times below are well above the loop's own cost
        def on_step_end(self, trainer, step):
            time.sleep(0.05)
            trainer.should_stop = stop_at == step

    stop_at = 5  # the first process stops after step 5 with its last checkpoint at step 3 (a crash's picture)
    first = make_trainer(tmp_path, callbacks=[Slow()], max_steps=8, save_every=3, save_final=False).train()
    at_3 = read_metrics(tmp_path)[2]
    assert first["step"] == 5 and at_3["step"] == 3 and first["elapsed_before"] == 0.0
    AcceleratorState._reset_state(reset_partial_state=True)
    stop_at = None
    second = make_trainer(tmp_path, callbacks=[Slow()], max_steps=8, save_every=3, save_final=False)
    summary = second.train(resume=True)
    assert summary["resumed_from"] == 3
    # the time up to the checkpoint carries over; steps 4-5 of the first process are redone, so not counted
    assert at_3["elapsed"] <= summary["elapsed_before"] < first["elapsed"]
    assert summary["elapsed"] >= summary["elapsed_before"] + 5 * 0.05  # steps 4-8 ran in this process
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))  # the first process's steps 4-5 were trimmed
    assert all(a["elapsed"] < b["elapsed"] for a, b in zip(rows, rows[1:]))  # one clock across the processes


def tb_steps(out: Path, tag: str = "train/loss") -> list[int]:
    """The steps TensorBoard shows for `tag`, reading every event file of out/tb as TensorBoard does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))  # purge_orphaned_data=True, TensorBoard's default
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_tensorboard_shows_each_step_once_after_a_resume_or_a_fresh_start(tmp_path):
    class StopAt:
        def on_step_end(self, trainer, step):
            trainer.should_stop = step == 5

    # the first process logs steps 1-5 and stops with its last checkpoint at step 3 (a crash's picture)
    make_trainer(tmp_path, callbacks=[StopAt()], max_steps=8, save_every=3, save_final=False).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    make_trainer(tmp_path, max_steps=8, save_every=3, save_final=False).train(resume=True)
    assert tb_steps(tmp_path) == list(range(1, 9))  # steps 4-5 of the first process are hidden, not doubled
    AcceleratorState._reset_state(reset_partial_state=True)
    make_trainer(tmp_path, max_steps=4, save_final=False).train()  # a fresh run in the same folder
    assert tb_steps(tmp_path) == [1, 2, 3, 4]  # not mixed with the earlier run's curve


def test_a_second_train_call_continues_the_clock_and_the_curves(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, save_final=False)
    first = trainer.train()
    time.sleep(0.3)  # idle between the calls: not training time
    trainer.max_steps = 7
    t0 = time.perf_counter()
    second = trainer.train()
    call = time.perf_counter() - t0
    assert second["step"] == 7 and second["elapsed_before"] == first["elapsed"]
    assert 0 < second["elapsed"] - first["elapsed"] <= call  # the 0.3 s between the calls is not counted
    assert tb_steps(tmp_path) == list(range(1, 8))  # the first call's steps are not hidden by the second's writer


def test_signal_without_checkpointing_says_so(tmp_path):
    with pytest.raises(Interrupted, match="no checkpoint .checkpointing is off"):
        make_trainer(tmp_path, callbacks=[SendSignal(signal.SIGTERM, {2})], max_steps=6, save_final=False).train()
    assert not list(tmp_path.rglob("step-*"))


def test_second_sigint_stops_at_once(tmp_path):
    # The second Ctrl-C re-raises under the handler from before train(): Python's own, as in a user's terminal.
    # Set it here: pytest started in the background by a shell (`cmd &`) inherits SIGINT ignored, and there the
    # re-raise is ignored too (two CI runs of this session failed so; the same with SIG_IGN set by hand).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as e:  # the second Ctrl-C: Python's KeyboardInterrupt, no checkpoint
            make_trainer(tmp_path, callbacks=[SendSignal(signal.SIGINT, {2}, times=2)], max_steps=6).train()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert not isinstance(e.value, Interrupted) and not list(tmp_path.rglob("step-*")), f"SIGINT handler before: {before!r}"


# ----------------------------------------------------------------------------- optimizer groups
def test_default_param_groups_skip_bias_and_layernorm(tmp_path):
    trainer = make_trainer(tmp_path, weight_decay=0.05)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = {g["group"]: g for g in trainer.optimizer.param_groups}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.05
    assert "layers.0.norm.weight" in no_decay and "layers.1.norm.bias" in no_decay and "head.bias" in no_decay
    assert decay == {"embeddings.weight", "layers.0.fc.weight", "layers.1.fc.weight", "head.weight"}
    assert len(no_decay) + len(decay) == len(names)
    assert trainer.optimizer.param_groups[0]["fused"] is True  # CPU fused AdamW in this torch


def test_layerwise_lr_groups():
    model = tiny.TinyModel()
    groups = layerwise_lr_groups(model, base_lr=1.0, decay=0.5, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert lr_of["head.weight"] == (1.0, 0.1) and lr_of["head.bias"] == (1.0, 0.0)
    assert lr_of["layers.1.fc.weight"] == (0.5, 0.1) and lr_of["layers.1.norm.weight"] == (0.5, 0.0)
    assert lr_of["layers.0.fc.weight"] == (0.25, 0.1)
    assert lr_of["embeddings.weight"] == (0.125, 0.1)
    assert default_layer_id("deberta.encoder.layer.11.attention.self.query_proj.weight") == 11
    assert default_layer_id("deberta.embeddings.word_embeddings.weight") == -1
    assert default_layer_id("model.layers.3.mlp.weight") == 3
    assert default_layer_id("classifier.weight") is None
    assert "layers.0.norm.weight" in no_decay_names(model)


def test_config_errors():
    with pytest.raises(ConfigError, match="lrr"):
        from_dict(TrainConfig, {"lrr": 1.0})
    assert from_dict(TrainConfig, {"epochs": 3, "lr": 1}).epochs == 3.0
    with pytest.raises(VegaError, match="train.mixed_precision"):
        TrainConfig(mixed_precision="fp8").check()
    with pytest.raises(VegaError, match="divisible"):
        ResumableBatchSampler(100, global_batch=10, grad_accum=4)


def test_refuses_silent_single_process(tmp_path, monkeypatch):
    acc = Accelerator(cpu=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(VegaError, match="WORLD_SIZE=2"):
        Trainer(tiny.TinyModel(), lambda m, b: None, tiny.TinyDataset(16), tiny.collate,
                TrainConfig(batch_size=4), tmp_path, accelerator=acc)


# ----------------------------------------------------------------------------- sampler and RNG
def test_sampler_shares_and_resume():
    n, B = 50, 12  # 4 steps per epoch, 2 examples dropped
    one = ResumableBatchSampler(n, B, grad_accum=2, seed=3)
    two = [ResumableBatchSampler(n, B, grad_accum=2, rank=r, world_size=2, seed=3) for r in range(2)]
    assert one.steps_per_epoch == 4 and len(one) == 8
    it1, its = iter(one), [iter(s) for s in two]
    for step in range(10):  # crosses two epoch boundaries
        epoch, pos = divmod(step, 4)
        want = one.permutation(epoch)[pos * B : (pos + 1) * B].tolist()
        micro = [next(it1) for _ in range(2)]
        assert sum(micro, []) == want
        for k in range(2):  # micro-batch k: rank 0 takes its first half, rank 1 the second
            assert next(its[0]) + next(its[1]) == micro[k]
        one.advance()
    assert one.state_dict()["epoch"] == 2 and one.state_dict()["position"] == 2 * B
    resumed = ResumableBatchSampler(n, B, grad_accum=2, seed=3)
    resumed.load_state_dict(one.state_dict())
    assert [next(iter(resumed)) for _ in range(1)][0] == next(it1)
    assert sorted(one.permutation(0).tolist()) == list(range(n))
    assert one.permutation(0).tolist() != one.permutation(1).tolist()
    with pytest.raises(VegaError, match="batch_size"):
        ResumableBatchSampler(n, 6, seed=3).load_state_dict(one.state_dict())


def test_trainer_hands_orders_to_its_sampler(tmp_path):
    calls = []

    def backwards(perm, epoch, layout):  # an order strategy: reverse each epoch's permutation
        calls.append((epoch, layout.global_batch, layout.seed))
        return perm.flip(0)

    trainer = Trainer(tiny.TinyModel(), lambda m, b: None, tiny.TinyDataset(40), tiny.collate,
                      TrainConfig(batch_size=8, seed=4), tmp_path, orders=[backwards])
    plain = ResumableBatchSampler(40, 8, seed=4).permutation(0)
    assert trainer.sampler.orders == (backwards,)
    assert trainer.sampler.global_indices(0, 0) == plain.flip(0)[:8].tolist() and calls == [(0, 8, 4)]


def test_rng_state_roundtrip():
    state = capture_rng()
    a = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    restore_rng(state)
    b = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]
    model = tiny.TinyModel(dropout=0.1).train()  # dropout is live, so RNG state matters for resume
    ids = torch.randint(1, 16, (4, 8))
    assert not torch.equal(model(ids), model(ids))


def test_bf16_autocast_trains(tmp_path):
    seen = []
    torch.manual_seed(0)
    model = tiny.TinyModel()
    model.layers[0].fc.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    trainer = Trainer(model, tiny.make_objective(set(), {}), tiny.TinyDataset(64), tiny.collate,
                      TrainConfig(lr=1e-2, max_steps=4, batch_size=16, mixed_precision="bf16", progress=False), tmp_path)
    summary = trainer.train()
    assert seen and all(dt == torch.bfloat16 for dt in seen)  # matmuls run under bf16 autocast
    assert summary["skipped_steps"] == 0 and math.isfinite(summary["loss"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights


def test_trainers_with_different_precision_in_one_process(tmp_path):
    """`vegalm run` pretrains in bf16 and fine-tunes in fp32 in one process: Accelerate's process-wide
    state must not refuse the second Trainer."""
    import torch
    from torch import nn

    from vegalm.train.trainer import TrainConfig, Trainer

    data = [{"x": torch.randn(4), "y": torch.randn(1)} for _ in range(8)]

    def collate(items):
        return {k: torch.stack([i[k] for i in items]) for k in items[0]}

    def objective(model, batch):
        return ((model(batch["x"]) - batch["y"]) ** 2).mean(), {}

    for i, mp in enumerate(["bf16", "no", "bf16"]):
        cfg = TrainConfig(max_steps=2, batch_size=4, mixed_precision=mp, progress=False, log_every=1)
        t = Trainer(nn.Linear(4, 1), objective, data, collate, cfg, tmp_path / str(i))
        assert t.accelerator.mixed_precision == mp
        t.train()
