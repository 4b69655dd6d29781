"""Launch a test script (or `-m vegalm.cli ...`) under torchrun or `accelerate launch`: one node, or several nodes
on loopback."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist


def launcher() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without a surrounding launch's variables, one thread per worker (2 shared cores)."""
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish() -> None:
    """The end of a script run under torchrun: collect the sharded models (their DTensors hold device meshes) and
    meet the other ranks before the process group goes. Destroying it while one rank still held them, or while the
    other rank was still in its last collective, let gloo abort a rank at exit (`terminate called without an active
    exception`, SIGABRT): ~1 run in 3 of tests/_fsdp_gdes.py, and once in CI for tests/_fsdp_scale.py."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def run(args: list[str], nproc: int = 2, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N ARGS`; returns the finished process (stdout/stderr as text)."""
    cmd = [*launcher(), "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(**env), timeout=timeout)


def run_nodes(args: list[str], nnodes: int = 2, timeout: float = 300, **env: str) -> list[subprocess.CompletedProcess]:
    """`nnodes` torchrun launchers of one process each, meeting through a c10d rendezvous on 127.0.0.1: the
    multi-node launch of docs/scaling.md, on loopback addresses only."""
    port = free_port()
    cmd = [*launcher(), "--nnodes", str(nnodes), "--nproc_per_node", "1", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"vegalm-test-{port}", "--local_addr", "127.0.0.1",
           *args]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(**env))
             for _ in range(nnodes)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    return done


def run_accelerate(args: list[str], nnodes: int = 1, timeout: float = 300,
                   **env: str) -> list[subprocess.CompletedProcess]:  # fmt: skip
    """`accelerate launch --config_file configs/accelerate/ddp.yaml` of 2 processes: on one node, or on `nnodes`
    machines of one process each (`--machine_rank r --main_process_ip 127.0.0.1`), as docs/scaling.md shows it.
    The script must not be `-m`: accelerate takes `-m` as its own --module flag only before the script."""
    exe = Path(sys.executable).with_name("accelerate")
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "ddp.yaml"
    port = free_port()
    base = [str(exe), "launch", "--config_file", str(config), "--num_processes", "2", "--main_process_port", str(port)]
    if nnodes > 1:
        base += ["--num_machines", str(nnodes), "--main_process_ip", "127.0.0.1"]
    cmds = [[*base, *(["--machine_rank", str(r)] if nnodes > 1 else []), *args] for r in range(nnodes)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(**env))
             for c in cmds]
    done = []
    for c, p in zip(cmds, procs):
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    return done
