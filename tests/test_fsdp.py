"""FSDP2 (`train.fsdp=true`) on CPU over gloo: equal losses, sharded checkpoints, exact resume, GDES, multi-node.

Two levels: the Trainer on tests/_tiny_train.py (seconds per launch), and the smoke recipe through
`torchrun -m vegalm.cli pretrain` (uninterrupted, SIGKILLed after its first sharded checkpoint and rerun, and two
loopback "nodes"), whose exports must be bit-identical and load in transformers' Auto classes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from vegalm.errors import VegaError

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SCRIPT = TESTS / "_tiny_train.py"
sys.path.insert(0, str(TESTS))
import _tiny_train as tiny  # noqa: E402
import _torchrun  # noqa: E402
from _data import CORPUS_DIR, require  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo backend"
)


def tiny_run(out: Path, *args: str, nproc: int = 2, expect_ok: bool = True):
    proc = _torchrun.run([str(SCRIPT), "--out", str(out), "--fsdp", *args], nproc=nproc, timeout=180)
    assert (proc.returncode == 0) == expect_ok, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def sharded_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full model of a DCP checkpoint, read offline (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dst = ckpt.parent.parent / f"{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt / "dcp"), str(dst))
    return torch.load(dst, weights_only=True)["model"]


COMMON = ["--steps", "10", "--batch-size", "8", "--dropout", "0", "--log-every", "1", "--save-every", "5"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "straight"
    tiny_run(out, *COMMON)
    return out


def test_two_sharded_processes_match_one_plain_process(straight, tmp_path):
    """Same global batch (2 processes x 4 vs 1 x 8), dropout off: the losses agree to 1e-5 relative."""
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(1)
    tiny.build(tiny.parse(["--out", str(tmp_path / "one"), *COMMON])).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    one, two = losses(tmp_path / "one"), losses(straight)
    assert len(one) == len(two) == 10
    rel = max(abs(a - b) / abs(a) for a, b in zip(one, two))
    print(f"max relative loss difference, 1 plain vs 2 FSDP processes: {rel:.2e}")
    assert rel <= 1e-5
    ckpt = straight / "checkpoints" / "step-000010"
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # a shard each
    assert not (ckpt / "model.safetensors").exists()
    plain = load_file(str(tmp_path / "one" / "checkpoints" / "step-000010" / "model.safetensors"))
    full = sharded_weights(ckpt)
    assert set(full) == set(plain)
    for k in plain:
        torch.testing.assert_close(full[k], plain[k], rtol=1e-4, atol=1e-5)


def test_resume_is_bit_exact_and_a_new_world_size_reshards(straight, tmp_path):
    tiny_run(tmp_path / "cut", *COMMON, "--stop-after", "5")
    tiny_run(tmp_path / "cut", *COMMON, "--resume")
    a, b = sharded_weights(straight / "checkpoints" / "step-000010"), sharded_weights(
        tmp_path / "cut" / "checkpoints" / "step-000010")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(tmp_path / "cut")
    # The same checkpoint resumed by ONE process: DCP reshards the weights and AdamW state (not bit-exact: the
    # reduction order changes), and the run says so.
    shutil.copytree(tmp_path / "cut", tmp_path / "one", ignore=shutil.ignore_patterns("step-000010"))
    (tmp_path / "one" / "checkpoints" / "latest").write_text("step-000005\n")
    proc = tiny_run(tmp_path / "one", *COMMON, "--resume", nproc=1)
    assert "written by 2 processes, resuming with 1" in proc.stderr
    c = sharded_weights(tmp_path / "one" / "checkpoints" / "step-000010")
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-5)


def test_accelerate_launch_one_node_and_two_loopback_machines_match_torchrun(straight, tmp_path):
    """docs/scaling.md's `accelerate launch --config_file configs/accelerate/ddp.yaml` forms, with train.fsdp=true:
    2 processes on one node, and 2 machines of one process each (static rendezvous on 127.0.0.1)."""
    for nnodes in (1, 2):
        out = tmp_path / f"acc{nnodes}"
        for proc in _torchrun.run_accelerate([str(SCRIPT), "--out", str(out), "--fsdp", *COMMON], nnodes=nnodes):
            assert proc.returncode == 0, proc.stderr[-4000:]
        assert losses(out) == losses(straight)
        assert len(list((out / "checkpoints" / "step-000010" / "dcp").glob("*.distcp"))) == 2


def test_a_checkpoint_of_the_other_kind_is_refused_in_one_line(straight, tmp_path):
    from vegalm.train.checkpoint import load_checkpoint

    model = tiny.TinyModel()
    with pytest.raises(VegaError, match="written with FSDP .*train.fsdp=true"):
        load_checkpoint(straight / "checkpoints" / "step-000010", model=model)
    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = tiny.build(tiny.parse(["--out", str(tmp_path / "plain"), "--steps", "2"]))
    trainer.train()
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(VegaError, match="written without FSDP.*train.fsdp=false"):
        load_checkpoint(tmp_path / "plain" / "checkpoints" / "step-000002", model=None, sharded=(model, None))


def test_gdes_checkpointing_and_bf16_policy_under_fsdp():
    proc = _torchrun.run([str(TESTS / "_fsdp_gdes.py")], timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(res)
    # GDES over sharded parameters: the MLM loss reaches E_G only, the RTD loss E_delta only
    assert res["mlm"]["E_G"] > 0 and res["mlm"]["E_delta"] == 0.0
    assert res["rtd"]["E_delta"] > 0 and res["rtd"]["E_G"] == 0.0
    # activation checkpointing: fewer saved activations, the same gradients (dropout off)
    assert res["saved_bytes_checkpointing"] < 0.7 * res["saved_bytes"]
    assert res["checkpointing_max_grad_diff"] < 1e-6
    # bf16 policy: fp32 sharded master weights and fp32-reduced gradients, bf16-sized differences
    assert res["bf16"]["sharded_param_dtype"] == "torch.float32" and res["bf16"]["grad_dtype"] == "torch.float32"
    assert 0 < res["bf16"]["grad_rel_diff"] < 0.05


# ---------------------------------------------------------------------------- the smoke recipe through the CLI
PRETRAIN = ["-m", "vegalm.cli", "pretrain", "--recipe", str(REPO / "recipes" / "smoke-fsdp.yaml")]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict[str, Path]:
    """The FSDP smoke recipe four ways: uninterrupted; SIGKILLed by every process right after its first sharded
    checkpoint (phase 1, step 6), then rerun; two loopback torchrun nodes of one process each; and two loopback
    `accelerate launch -m vegalm.cli` machines (docs/scaling.md's forms)."""
    require(CORPUS_DIR)
    root = tmp_path_factory.mktemp("smoke-fsdp")
    runs = {name: root / name for name in ("straight", "killed", "nodes", "accelerate")}
    proc = _torchrun.run([*PRETRAIN, "--out", str(runs["straight"])], timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = _torchrun.run([*PRETRAIN, "--out", str(runs["killed"])], timeout=400, VEGALM_TEST_KILL_AFTER_SAVE="6")
    assert proc.returncode != 0
    ckpts = runs["killed"] / "phase1" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-000006" and not (ckpts / "step-000012").exists()
    assert not (runs["killed"] / "discriminator").exists()
    proc = _torchrun.run([*PRETRAIN, "--out", str(runs["killed"])], timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr
    for p in _torchrun.run_nodes([*PRETRAIN, "--out", str(runs["nodes"])], timeout=400):
        assert p.returncode == 0, p.stderr[-4000:]
    for p in _torchrun.run_accelerate([*PRETRAIN, "--out", str(runs["accelerate"])], nnodes=2, timeout=400):
        assert p.returncode == 0, p.stderr[-4000:]
    return runs


def _export(run: Path) -> dict[str, torch.Tensor]:
    return {f"{part}/{k}": v for part in ("discriminator", "generator")
            for k, v in load_file(str(run / part / "model.safetensors")).items()}


@pytest.mark.slow  # five launches of the pretraining CLI (two of them two-node): ~3-5 min on 2 shared cores
def test_sigkill_after_a_sharded_checkpoint_then_resume_exports_bit_identical_weights(smoke):
    a, b = _export(smoke["straight"]), _export(smoke["killed"])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["nodes", "accelerate"])
def test_two_loopback_nodes_match_one_node_of_two_processes(smoke, launch):
    a, b = _export(smoke["straight"]), _export(smoke[launch])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    one = [json.loads(x)["loss"] for x in (smoke["straight"] / "phase1" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x)["loss"] for x in (smoke[launch] / "phase1" / "metrics.jsonl").read_text().splitlines()]
    assert one == two


@pytest.mark.slow
def test_the_fsdp_export_loads_in_auto_classes_without_missing_keys(smoke):
    from transformers import AutoModel, AutoModelForMaskedLM

    _, info = AutoModel.from_pretrained(smoke["straight"] / "discriminator", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _, info = AutoModelForMaskedLM.from_pretrained(smoke["straight"] / "generator", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
