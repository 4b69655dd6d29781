"""train/allocator.py: on glibc, a freed large block stays in the process (no unmap, no page faults on reuse)."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from vegalm.train import allocator
from vegalm.train.trainer import TrainConfig, Trainer

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt thresholds")

# RSS (kB) with a 64 MiB tensor alive, then after freeing it, in a fresh process
PROBE = """
import json, sys
from vegalm.train.allocator import keep_freed_memory
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
import torch
t = torch.ones(64 << 20, dtype=torch.uint8)
alive = rss()
del t
print(json.dumps({"kept": kept, "freed_kb": alive - rss()}))
"""


def _probe(mode: str, **env) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != allocator.SWITCH} | env
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_a_freed_large_block_is_kept_only_when_asked():
    plain, kept = _probe("plain"), _probe("keep")
    assert plain["freed_kb"] > 60_000  # glibc's default: above the mmap threshold, unmapped at once
    assert kept["kept"] is True and kept["freed_kb"] < 4_000  # kept in the heap for the next allocation


@glibc
@pytest.mark.parametrize("env", [{allocator.SWITCH: "0"}, {"MALLOC_TRIM_THRESHOLD_": "131072"}])
def test_the_switch_and_glibc_own_settings_leave_malloc_alone(env):
    got = _probe("keep", **env)
    assert got["kept"] is False and got["freed_kb"] > 60_000


@glibc
def test_a_cpu_trainer_sets_it(fresh_accelerate, tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "_done", None)
    model = torch.nn.Linear(4, 2)
    data = [{"x": torch.randn(4)} for _ in range(4)]
    Trainer(model, lambda m, b: (m(b["x"]).sum(), {}), data, None, TrainConfig(batch_size=2, max_steps=1,
                                                                                 progress=False), tmp_path)
    assert allocator._done is True
