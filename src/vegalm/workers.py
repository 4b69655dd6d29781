"""Independent jobs side by side on one machine: a pool of spawned worker processes.

`vegalm ablate --jobs N` and `vegalm run --jobs N` use it: independent jobs (two pretrainings, many
fine-tunes) then fill the cores without relying on one small model's intra-op threads. Each worker gets
cores // N torch threads, unless OMP_NUM_THREADS pins them.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
from multiprocessing.connection import wait as wait_for
import os
import time

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the CLI's and its workers' log lines


def threads_per_worker(n_workers: int) -> int | None:
    """torch threads for each of `n_workers` workers: the cores split evenly; None when OMP_NUM_THREADS is set."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (os.cpu_count() or 1) // n_workers)


def _init_worker(threads: int | None, log_level: int) -> None:
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    if threads:
        import torch

        torch.set_num_threads(threads)


def process_pool(n_workers: int, log_level: int = logging.WARNING) -> cf.ProcessPoolExecutor:
    """`n_workers` spawned processes (fork would copy torch's thread pools), threads and logging set up."""
    return cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=mp.get_context("spawn"),
                                  initializer=_init_worker, initargs=(threads_per_worker(n_workers), log_level))  # fmt: skip


def stop_pool(pool: cf.ProcessPoolExecutor, grace_s: float = 0.0, forward: int | None = None) -> None:
    """Cancel what has not started and stop what has: send the running workers signal `forward` (if given),
    wait up to `grace_s` seconds for them to end, then SIGTERM the rest. A training worker stops at its next
    step on SIGINT or SIGTERM (pretraining saves a checkpoint there) and the same command resumes; a second
    signal ends it at once, so a worker that got the terminal's Ctrl-C needs a grace period, not a SIGTERM on
    top. `shutdown` alone would wait for every running job to finish."""
    # the processes, before shutdown drops them (kept on the pool for a second call: a second Ctrl-C)
    procs = list((getattr(pool, "_processes", None) or {}).values()) or getattr(pool, "_vegalm_procs", [])
    pool._vegalm_procs = procs
    pool.shutdown(wait=False, cancel_futures=True)
    if forward is not None:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, forward)
    # wait on the exit sentinels, not join(): the executor's own thread joins (reaps) the same processes
    alive, deadline = [p for p in procs if p.exitcode is None], time.monotonic() + grace_s
    while alive and (left := deadline - time.monotonic()) > 0:
        ended = set(wait_for([p.sentinel for p in alive], timeout=left))
        alive = [p for p in alive if p.sentinel not in ended]
    for proc in alive:
        proc.terminate()


__all__ = ["LOG_FORMAT", "threads_per_worker", "process_pool", "stop_pool"]
