"""Multi-process data parallelism on CPU: `torchrun --nproc_per_node 2` (gloo) against one process.

`accelerate launch --cpu --num_processes 2` would silently run ONE process here, hence torchrun.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS / "_tiny_train.py"
sys.path.insert(0, str(TESTS))
import _tiny_train as tiny  # noqa: E402
import _torchrun  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo backend"
)


def torchrun(out: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    proc = _torchrun.run([str(SCRIPT), "--out", str(out), *args], timeout=180)
    assert (proc.returncode == 0) == (expect == 0), proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("TRAINING_STARTED") == 1  # printed by the main process only
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def test_two_processes_match_one(tmp_path):
    steps, common = 10, ["--steps", "10", "--batch-size", "8", "--dropout", "0", "--log-every", "1"]
    # 2 processes x 2 accumulation micro-batches x 2 examples = the same global batch of 8
    torchrun(tmp_path / "ddp", *common, "--grad-accum", "2")
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(1)
    tiny.build(tiny.parse(["--out", str(tmp_path / "one"), *common])).train()
    AcceleratorState._reset_state(reset_partial_state=True)

    one, ddp = metrics(tmp_path / "one"), metrics(tmp_path / "ddp")
    assert [m["step"] for m in ddp] == list(range(1, steps + 1))  # one line per step: only rank 0 writes
    rel = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, ddp))
    print(f"max relative loss difference, 1 vs 2 processes: {rel:.2e}")
    assert rel < 1e-5
    assert [m["accuracy"] for m in ddp] == pytest.approx([m["accuracy"] for m in one], abs=1e-6)
    w1, w2 = weights(tmp_path / "one", steps), weights(tmp_path / "ddp", steps)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)
    ckpt = tmp_path / "ddp" / "checkpoints" / f"step-{steps:06d}"
    assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()


COMMON = ["--steps", "8", "--batch-size", "8", "--dropout", "0.1", "--save-every", "4"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """2 processes with dropout, 8 steps uninterrupted (one torchrun launch, ~8-12 s)."""
    out = tmp_path_factory.mktemp("ddp") / "straight"
    torchrun(out, *COMMON)
    return out


@pytest.mark.slow  # three torchrun launches: ~20-35 s on 2 shared cores
def test_ddp_resume_is_bit_exact(straight, tmp_path):
    """Per-process RNG files: 2 processes with dropout, stop at 4, resume to 8 == straight 8."""
    torchrun(tmp_path / "resumed", *COMMON, "--stop-after", "4")
    torchrun(tmp_path / "resumed", *COMMON, "--resume")
    a, b = weights(straight, 8), weights(tmp_path / "resumed", 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(straight)] == [m["loss"] for m in metrics(tmp_path / "resumed")]


def test_ddp_sigterm_on_one_rank_stops_every_rank(straight, tmp_path):
    """Only rank 1 gets SIGTERM (after step 3): both ranks stop at the same step boundary, save one
    checkpoint together, report it and exit 143; the re-run resumes to the uninterrupted weights."""
    out = tmp_path / "cut"
    proc = torchrun(out, *COMMON, "--signal-at", "3:1", expect=143)  # torchrun itself exits 1
    ckpt = out / "checkpoints" / "step-000004"  # the signal rides on step 4's gather: both ranks stop there
    line = f"interrupted at step 4: checkpoint saved in {ckpt}; run the same command again to resume"
    assert proc.stderr.count(line) == 2, proc.stderr[-4000:]  # one line per rank, no rank left hanging
    assert "vegalm/train/" not in proc.stderr  # no worker traceback (torchrun prints its own report of the exit)
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()
    torchrun(out, *COMMON, "--resume")
    a, b = weights(straight, 8), weights(out, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
