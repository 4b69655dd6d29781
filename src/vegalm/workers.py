"""Independent jobs side by side on one machine: a pool of spawned worker processes.

`vegalm ablate --jobs N` and `vegalm run --jobs N` use it: independent jobs (two pretrainings, many
fine-tunes) then fill the cores without relying on one small model's intra-op threads. Each worker gets
cores // N torch threads, unless OMP_NUM_THREADS pins them.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import multiprocessing as mp
from multiprocessing.connection import wait as wait_for
import os
import signal
import time
from collections.abc import Callable, Iterator

from vegalm.errors import Interrupted, WorkersInterrupted
from vegalm.train.interrupt import StopSignals, job, remember_stops, stop_received

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the CLI's and its workers' log lines


def threads_per_worker(n_workers: int) -> int | None:
    """torch threads for each of `n_workers` workers: the cores split evenly; None when OMP_NUM_THREADS is set."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (os.cpu_count() or 1) // n_workers)


def _init_worker(threads: int | None, log_level: int) -> None:
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    remember_stops()  # a stop signal between jobs or before a run's training is kept, not fatal
    if threads:
        import torch

        torch.set_num_threads(threads)


def _unless_stopped(fn: Callable, *args, **kwargs):
    """A job, in a worker: refused once this worker was told to stop (at any time: `remember_stops`). The executor
    hands each worker its next job before the current one ends (its call queue), and a job handed over can no
    longer be cancelled, so without this a worker that stopped its run at a step boundary went on with the next
    run of the sweep."""
    if signum := stop_received():
        raise WorkersInterrupted(signum)
    try:
        with job():
            return fn(*args, **kwargs)
    except KeyboardInterrupt as e:  # a stop outside a training loop (loading, evaluating): picklable, and says so
        if isinstance(e, Interrupted) or not stop_received():
            raise
        raise WorkersInterrupted(stop_received()) from None


class _Pool(cf.ProcessPoolExecutor):
    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        return super().submit(_unless_stopped, fn, *args, **kwargs)


def process_pool(n_workers: int, log_level: int = logging.WARNING) -> cf.ProcessPoolExecutor:
    """`n_workers` spawned processes (fork would copy torch's thread pools), threads and logging set up; a worker
    that got SIGINT / SIGTERM stops its run at the next step boundary and starts no other job."""
    return _Pool(max_workers=n_workers, mp_context=mp.get_context("spawn"),
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


@contextlib.contextmanager
def supervised_pool(n_workers: int, log_level: int = logging.WARNING,
                    on_stop: Callable[[], None] | None = None) -> Iterator[tuple[cf.ProcessPoolExecutor, Callable]]:
    """`process_pool` for a parent that waits on its workers, yielding (pool, check). The parent must call
    `check()` at least once a second while it waits (`cf.wait(..., timeout=1)`).

    SIGINT / SIGTERM to the parent stop the workers at a step boundary, and then `check()` raises
    WorkersInterrupted. A SIGTERM sent to the parent alone is forwarded. A terminal's Ctrl-C has already reached
    the workers, so they get 120 s to end on their own instead of a second signal, which would end them
    mid-checkpoint. `on_stop()` runs after they are stopped, e.g. to log what each was doing. A failed job, or a
    second signal, SIGTERMs the workers. Without this a signal to the parent killed it and left the workers
    running as orphans."""
    pool = process_pool(n_workers, log_level)
    stopped = False  # check() stopped the workers

    try:
        with StopSignals() as stop:
            def check() -> None:
                nonlocal stopped
                if stop.pending:
                    stop.acknowledge()
                    stop_pool(pool, grace_s=120, forward=signal.SIGTERM if stop.pending == signal.SIGTERM else None)
                    stopped = True
                    if on_stop is not None:
                        on_stop()
                    raise WorkersInterrupted(stop.pending)

            yield pool, check
    except BaseException:  # a failed job, a second signal, or a worker's own stop (its Interrupted, or a job it
        if not stopped:  # refused): SIGTERM the workers (they checkpoint and exit)
            stop_pool(pool)
        raise
    pool.shutdown()


__all__ = ["LOG_FORMAT", "threads_per_worker", "process_pool", "stop_pool", "supervised_pool"]
