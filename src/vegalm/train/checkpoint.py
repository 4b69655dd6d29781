"""Atomic, safe-to-load training checkpoints.

Layout (`root` = out_dir/checkpoints):

    root/step-000120/model.safetensors   weights of the unwrapped model (shared tensors stored once)
                    optimizer.pt         optimizer.state_dict()
                    trainer_state.pt     step, scheduler, sampler, GradScaler, bad-step counters, ...
                    rng_rank0.pt ...     torch CPU/CUDA, numpy and python RNG states and the process's own
                                         state (`rank_state`), one file per process
                    COMPLETE             marker (JSON: step, files), written last
    root/latest                          text file naming the newest complete checkpoint ("step-000120")

Under FSDP (`sharded=(model, optimizer)`) model.safetensors and optimizer.pt are replaced by `dcp/`: a
torch.distributed.checkpoint folder where every process writes its own shards (DCP reshards on load, so a
different number of processes can resume it).

A save writes everything into `root/.tmp-step-000120/`, fsyncs each file and the directory,
renames the directory into place with `os.replace`, then replaces `latest` the same way
(tmp file + fsync + rename). A crash at any point leaves `latest` naming a complete checkpoint.
Every `.pt` file holds only tensors, numbers, strings, lists and dicts, and is read back with
`torch.load(weights_only=True)`: nothing is ever unpickled.

    path = save_checkpoint(root, step, model=m, optimizer=opt, trainer_state={"step": step}, keep_last=2)
    path = latest_checkpoint(root)             # None if there is no complete checkpoint
    state = load_checkpoint(path, model=m, optimizer=opt)   # also restores this process's RNG

Test hooks (environment): VEGALM_TEST_CKPT_ABORT=<step> hard-exits (status 86) in the middle of
writing checkpoint <step>; VEGALM_TEST_CKPT_SLEEP=<seconds> sleeps between files of every save;
VEGALM_TEST_KILL_AFTER_SAVE=<step> makes every process SIGKILL itself once checkpoint <step> is complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from vegalm.errors import VegaError

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
SHARDED = "dcp"  # the torch.distributed.checkpoint folder of an FSDP checkpoint
LATEST = "latest"
PREFIX = "step-"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def step_of(path: Path) -> int:
    """The step of a checkpoint folder, from its name (step_dir_name's inverse)."""
    return int(path.name[len(PREFIX):])


# ----------------------------------------------------------------------------- RNG states as tensors
def capture_rng() -> dict[str, Any]:
    """All RNG states of this process, as tensors / numbers / lists (weights_only-safe)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- durable file writes
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _test_hook(step: int) -> None:
    """Fault injection for tests: sleep between files, or die half-way through checkpoint `step`."""
    delay = float(os.environ.get("VEGALM_TEST_CKPT_SLEEP", "0") or 0)
    if delay:
        time.sleep(delay)
    if os.environ.get("VEGALM_TEST_CKPT_ABORT") == str(step):
        os._exit(86)


# ----------------------------------------------------------------------------- save
def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
    rank: int = 0,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    rank_state: dict[str, Any] | None = None,
    sharded: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None,
) -> Path:
    """Write checkpoint `step` atomically; every process calls this (each writes its own RNG file).

    `model` is the unwrapped module, saved by the main process. `rank_state` is this process's
    own state (e.g. a callback's per-example memory), stored beside its RNG state and returned by
    `load_checkpoint` as trainer_state["rank_state"]. `sharded=(model, optimizer)`: an FSDP model, saved by every
    process into `dcp/` (pass model=None, optimizer=None). Returns the final directory.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save of this same step
        tmp.mkdir(parents=True)
    barrier()
    _torch_save({"rng": capture_rng(), "state": rank_state or {}}, tmp / f"rng_rank{rank}.pt")
    if sharded is not None:
        _save_sharded(*sharded, tmp / SHARDED)  # collective
    if is_main:
        if model is not None:
            save_model(model, str(tmp / "model.safetensors"), force_contiguous=True)
            _fsync_path(tmp / "model.safetensors")
        _test_hook(step)
        if optimizer is not None:
            _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
            _test_hook(step)
        _torch_save(trainer_state, tmp / "trainer_state.pt")
    barrier()  # all RNG files are on disk
    if is_main:
        files = sorted(p.name for p in tmp.iterdir())
        with open(tmp / MARKER, "w", encoding="utf-8") as f:
            json.dump({"step": step, "files": files}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        trash = None
        if final.exists():  # same step saved before (e.g. a crash after the rename, before `latest`)
            trash = root / f".old-{step_dir_name(step)}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
        os.replace(tmp, final)
        _fsync_path(root)
        _write_text_atomic(root / LATEST, final.name + "\n")
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        prune(root, keep_last)
    barrier()
    if os.environ.get("VEGALM_TEST_KILL_AFTER_SAVE") == str(step):  # test hook: die right after a complete save
        os.kill(os.getpid(), signal.SIGKILL)
    return final


def _save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Every process writes its shards of the model and optimizer (DCP), then fsyncs its own files."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    for f in path.iterdir():  # DCP closes its files without fsync; our atomicity needs them on disk
        _fsync_path(f)
    _fsync_path(path)


def _load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_sd, "optim": optim_sd} if optimizer is not None else {"model": model_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories (with the marker), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX) :]))


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (and whatever `latest` names); drop stale temp dirs."""
    done = complete_checkpoints(root)
    latest = latest_checkpoint(root)
    for p in done[: max(0, len(done) - max(1, keep_last))]:
        if latest is None or p.resolve() != latest.resolve():
            shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- load
def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint named by `latest` if it is complete, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        cand = root / name
        if name.startswith(PREFIX) and (cand / MARKER).is_file():
            return cand
        log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one", pointer, name)
    done = complete_checkpoints(root)
    return done[-1] if done else None


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None = None,
    rank: int = 0,
    restore_rng_state: bool = True,
    sharded: tuple[torch.nn.Module, torch.optim.Optimizer | None] | None = None,
) -> dict[str, Any]:
    """Load weights (+ optimizer) into the given objects, restore this process's RNG, return trainer_state
    (with this process's `rank_state` under "rank_state", {} if it has none). `sharded=(model, optimizer or None)`:
    an FSDP model (collective); the checkpoint must be an FSDP one, and an FSDP checkpoint needs `sharded`."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise VegaError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    is_dcp = (path / SHARDED).is_dir()
    if sharded is not None and not is_dcp:
        raise VegaError(f"{path} was written without FSDP: resume it with train.fsdp=false")
    if sharded is None and is_dcp and (model is not None or optimizer is not None):
        raise VegaError(f"{path} was written with FSDP (sharded): resume it with train.fsdp=true under torchrun")
    if sharded is not None:
        _load_sharded(*sharded, path / SHARDED)
    if model is not None:
        load_model(model, str(path / "model.safetensors"), strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
    state = _torch_load(path / "trainer_state.pt")
    rng_file = path / f"rng_rank{rank}.pt"
    own = _torch_load(rng_file) if rng_file.is_file() else {}
    state["rank_state"] = own.get("state", {})
    if restore_rng_state:
        if own:
            restore_rng(own["rng"])
        else:
            log.warning("%s has no RNG state for process %d (different number of processes?): "
                        "training continues, but not bit-exactly", path, rank)
    return state
