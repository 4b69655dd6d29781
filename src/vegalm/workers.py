"""Independent jobs side by side on one machine: a pool of spawned worker processes.

`vegalm ablate --jobs N` and `vegalm run --jobs N` use it. Small models do not scale across cores (one
4 x 128 layer is too small to split), so two one-thread processes do about twice the work of one
two-thread process. Each worker gets cores // N torch threads, unless OMP_NUM_THREADS pins them.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import os

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the CLI's (cli.py), so a worker's lines read alike


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


def stop_pool(pool: cf.ProcessPoolExecutor) -> None:
    """Cancel what has not started and SIGTERM what has (a pretraining worker saves a checkpoint on SIGTERM,
    so the same command resumes it). `shutdown` alone would wait for every running job to finish."""
    if hasattr(pool, "terminate_workers"):  # Python >= 3.14
        pool.terminate_workers()
        return
    procs = list((getattr(pool, "_processes", None) or {}).values())  # before shutdown, which drops them
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()


__all__ = ["LOG_FORMAT", "threads_per_worker", "process_pool", "stop_pool"]
