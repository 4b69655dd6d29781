"""Checkpoint tests: bit-exact resume across processes, kill -9 at random times, interrupted writes.

Every training run is a separate process (tests/_tiny_train.py), as a real restart would be: a fresh
interpreter for the reference run, the clean resume and the interrupted write; a forked child of one
warmed-up interpreter (`--serve`) for the ten kill -9 runs, which would otherwise spend ~3 s each on
imports. One uninterrupted reference run (24 steps, a checkpoint every 4) is shared by all tests.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vegalm.train.checkpoint import MARKER, latest_checkpoint, load_checkpoint, save_checkpoint
from vegalm.train.optim import default_param_groups

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS / "_tiny_train.py"
STEPS = 24
sys.path.insert(0, str(TESTS))
import _tiny_train as tiny  # noqa: E402


def run(out: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--steps", str(STEPS), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(env), timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    for key in ("VEGALM_TEST_CKPT_ABORT", "VEGALM_TEST_CKPT_SLEEP", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def final_weights(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"weights differ in {bad}"


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    run(out, "--save-every", "4", "--keep-last", "10")
    return out


def test_resume_is_bit_exact(straight, tmp_path):
    run(tmp_path, "--save-every", "5", "--stop-after", "12")  # stops cleanly at step 12 (checkpoint 12)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000012"
    assert not torch.equal(final_weights(tmp_path, 12)["head.weight"], final_weights(straight)["head.weight"])
    run(tmp_path, "--save-every", "5", "--resume")
    assert_bit_equal(final_weights(tmp_path), final_weights(straight))
    assert losses(tmp_path) == losses(straight)  # identical log, no duplicated lines after the resume
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000020", "step-000024"]


class ForkServer:
    """tests/_tiny_train.py --serve: each run is a forked child process of one warmed-up interpreter."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=_env())
        assert self.proc.stdout.readline().strip() == "READY"

    def _ask(self, line: str) -> int:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def start(self, out: Path, *args: str, env: dict | None = None) -> int:
        argv = ["--out", str(out), "--steps", str(STEPS), *args]
        return self._ask(f"run {json.dumps(argv)}\t{json.dumps(env or {})}")

    def wait(self, pid: int) -> int:
        return self._ask(f"wait {pid}")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def wait_for_line(path: Path, text: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and text in path.read_text():
            return
        time.sleep(0.005)
    raise AssertionError(f"{text!r} never appeared in {path}")


@pytest.fixture(scope="module")
def server():
    srv = ForkServer()
    yield srv
    srv.close()


def test_kill9_at_random_times_then_resume(straight, server, tmp_path):
    rng = random.Random(1234)
    # Sleeps per micro-batch (--step-sleep) and between checkpoint files make every run last > 1.7 s
    # after TRAINING_STARTED whatever the machine speed, so each kill lands mid-training (often mid-write).
    slow = {"VEGALM_TEST_CKPT_SLEEP": "0.05"}
    report = []
    for trial in range(5):
        out = tmp_path / f"trial{trial}"
        delay = rng.uniform(0.05, 1.1)
        pid = server.start(out, "--save-every", "2", "--step-sleep", "0.02", env=slow)
        wait_for_line(Path(f"{out}.log"), "TRAINING_STARTED")
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        assert server.wait(pid) == -signal.SIGKILL, "the run ended before the kill"
        ckpts = out / "checkpoints"
        latest = latest_checkpoint(ckpts)
        partial = sorted(p.name for p in ckpts.glob(".tmp-*")) if ckpts.is_dir() else []
        report.append(f"trial {trial}: killed {delay:.2f}s in, latest={latest.name if latest else None}, "
                      f"partial={partial}")
        pid = server.start(out, "--save-every", "2", "--resume")
        status = server.wait(pid)
        assert status == 0, Path(f"{out}.log").read_text()[-3000:]
        assert_bit_equal(final_weights(out), final_weights(straight))
    print("\n".join(report))


def test_interrupted_write_keeps_previous_checkpoint(straight, server, tmp_path):
    pid = server.start(tmp_path / "run", "--save-every", "4", "--keep-last", "10", env={"VEGALM_TEST_CKPT_ABORT": "8"})
    assert server.wait(pid) == 86, (tmp_path / "run.log").read_text()[-2000:]  # died inside the step-8 save
    tmp_path = tmp_path / "run"
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-000004"
    partial = ckpts / ".tmp-step-000008"
    assert (partial / "model.safetensors").is_file() and not (partial / MARKER).exists()
    assert not (ckpts / "step-000008").exists()
    (ckpts / "step-000009").mkdir()  # a directory without a completion marker must be ignored
    assert latest_checkpoint(ckpts) == ckpts / "step-000004"

    model = tiny.TinyModel()
    opt = torch.optim.AdamW(default_param_groups(model, 0.01))
    state = load_checkpoint(ckpts / "step-000004", model=model, optimizer=opt, restore_rng_state=False)
    assert state["step"] == 4 and state["sampler"]["position"] == 4 * 8
    ref = final_weights(straight, 4)
    assert all(torch.equal(p.detach(), ref[n]) for n, p in model.named_parameters())

    pid = server.start(tmp_path, "--save-every", "4", "--keep-last", "10", "--resume")
    assert server.wait(pid) == 0, Path(f"{tmp_path}.log").read_text()[-3000:]
    assert_bit_equal(final_weights(tmp_path), final_weights(straight))
    assert not partial.exists(), "stale temp dir not cleaned up"


def test_latest_fallback_and_keep_last(tmp_path):
    model = tiny.TinyModel()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model=model, optimizer=None, trainer_state={"step": step}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000002", "step-000003"]
    (tmp_path / "latest").write_text("step-000007\n")  # names something that does not exist
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000003"
    (tmp_path / "step-000003" / MARKER).unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000002"
    for f in (tmp_path / "step-000002").glob("*.pt"):  # nothing needs unpickling
        torch.load(f, weights_only=True)
