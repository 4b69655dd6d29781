"""vegalm.workers: the process pool that `vegalm run --jobs` and `vegalm ablate --jobs` share."""

from __future__ import annotations

import concurrent.futures as cf
import os
import pickle
import signal
import time
from multiprocessing.connection import wait
from pathlib import Path

import pytest
import torch

from vegalm.errors import WorkersInterrupted
from vegalm.workers import process_pool, stop_pool, supervised_pool, threads_per_worker


def test_threads_split_the_cores_unless_pinned(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert [threads_per_worker(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads_per_worker(2) is None


def test_workers_get_their_share_of_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 4)  # read in this process, where the pool is made
    pool = process_pool(2)
    try:
        assert pool.submit(torch.get_num_threads).result(timeout=120) == 2
    finally:
        pool.shutdown()


def test_stop_pool_ends_a_running_job_at_once():
    """A failed job must not leave the caller waiting for a long one still running (shutdown alone would)."""
    pool = process_pool(2)
    slow = pool.submit(time.sleep, 300)
    bad = pool.submit(int, "not a number")
    with pytest.raises(ValueError):
        bad.result(timeout=120)
    t0 = time.perf_counter()
    sentinels = [p.sentinel for p in pool._processes.values()]
    stop_pool(pool)
    ended, deadline = set(), time.monotonic() + 30  # exit sentinels: join() would race the executor's own join
    while len(ended) < len(sentinels) and time.monotonic() < deadline:
        ended |= set(wait(sentinels, timeout=1))
    assert time.perf_counter() - t0 < 30 and ended == set(sentinels)
    with pytest.raises(WorkersInterrupted):  # the SIGTERM ended the job in hand (the worker noted it, then exited)
        slow.result(timeout=30)


def test_stop_pool_with_grace_lets_running_jobs_end_on_their_own():
    """After Ctrl-C the workers stop by themselves (they got the SIGINT too); a SIGTERM then would cut them short."""
    pool = process_pool(2)
    running = [pool.submit(time.sleep, 3), pool.submit(time.sleep, 3)]
    for _ in range(200):  # both workers started their 3-second job
        if all(f.running() for f in running):
            break
        time.sleep(0.05)
    t0 = time.perf_counter()
    stop_pool(pool, grace_s=60)
    # not cut short by a SIGTERM: with no grace the same jobs end in WorkersInterrupted (the test above)
    assert [f.result(timeout=60) for f in running] == [None, None] and time.perf_counter() - t0 < 30


def test_a_stopped_training_crosses_the_process_boundary():
    """A worker's Interrupted must unpickle in the parent: an unpicklable result breaks the whole pool, whose
    manager then SIGTERMs the other workers mid-checkpoint (seen: one pretraining of two lost its checkpoint)."""
    from vegalm.errors import Interrupted, WorkersInterrupted

    pool = process_pool(1)
    try:
        err = pool.submit(_raise_interrupted).exception(timeout=120)
    finally:
        pool.shutdown()
    assert isinstance(err, Interrupted) and (err.step, err.checkpoint, err.exit_code) == (7, "/c/step-7", 143)
    assert str(err) == str(Interrupted(7, "/c/step-7", 15))
    again = pickle.loads(pickle.dumps(WorkersInterrupted(2)))
    assert again.exit_code == 130 and str(again) == str(WorkersInterrupted(2))


def _raise_interrupted():
    from vegalm.errors import Interrupted

    raise Interrupted(7, "/c/step-7", 15)


def _job_stopped_by_a_signal() -> int:
    """What a training run does with SIGTERM: catch it under StopSignals, stop at the step boundary, acknowledge."""
    from vegalm.train.interrupt import StopSignals

    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not stop.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.acknowledge()
    return stop.pending


def _touch(path: str) -> str:
    Path(path).write_text("ran")
    return path


def test_a_worker_told_to_stop_starts_no_queued_job(tmp_path):
    """The executor hands a worker its next job before the current one ends, past the reach of cancel_futures: a
    sweep stopped by SIGTERM went on with its next run (2026-12-08). The worker must refuse it."""
    pool = process_pool(1)
    try:
        stopped = pool.submit(_job_stopped_by_a_signal)
        queued = pool.submit(_touch, str(tmp_path / "ran"))
        assert stopped.result(timeout=120) == signal.SIGTERM
        with pytest.raises(WorkersInterrupted):
            queued.result(timeout=120)
    finally:
        pool.shutdown(cancel_futures=True)
    assert not (tmp_path / "ran").exists()
    fresh = process_pool(1)  # a new pool's workers start clean
    try:
        assert fresh.submit(_touch, str(tmp_path / "fresh")).result(timeout=120)
    finally:
        fresh.shutdown()


def _mark_then_sleep(path: str, seconds: float) -> str:
    Path(path).write_text("started")
    time.sleep(seconds)
    return "slept"


def _alive(pool) -> list:
    return [proc for proc in pool._processes.values() if proc.exitcode is None]


def _wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists()


def test_a_stop_outside_training_ends_the_job_and_keeps_the_worker(tmp_path):
    """Loading or evaluating (no StopSignals): the job in hand ends at once; the worker lives on (its death would
    break the pool, whose executor then SIGTERMs the other workers) and refuses the next job."""
    pool = process_pool(1)
    try:
        pid = pool.submit(os.getpid).result(timeout=120)
        busy = pool.submit(_mark_then_sleep, str(tmp_path / "started"), 300)
        _wait_for(tmp_path / "started")
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        with pytest.raises(WorkersInterrupted):
            busy.result(timeout=60)
        assert time.monotonic() - t0 < 60 and _alive(pool)
        with pytest.raises(WorkersInterrupted):
            pool.submit(_touch, str(tmp_path / "ran")).result(timeout=60)
        assert not (tmp_path / "ran").exists()
    finally:
        pool.shutdown(cancel_futures=True)


def test_an_idle_worker_lives_through_stops_and_ends_with_the_pool(tmp_path):
    """Ctrl-C reaches every worker, idle ones too, and the parent's stop_pool SIGTERMs them all: an idle worker that
    died of it would break the pool (the failure seen in the full suite: a running job's future turned into
    BrokenProcessPool and the executor SIGTERMed the other workers mid-stop)."""
    pool = process_pool(1)
    pid = pool.submit(os.getpid).result(timeout=120)
    proc = _alive(pool)[0]
    try:
        os.kill(pid, signal.SIGINT)
        time.sleep(1)
        with pytest.raises(WorkersInterrupted):
            pool.submit(_touch, str(tmp_path / "ran")).result(timeout=60)
        assert not (tmp_path / "ran").exists()
        os.kill(pid, signal.SIGTERM)  # a second signal to an idle worker whose parent lives
        time.sleep(1)
        assert proc.exitcode is None
    finally:
        pool.shutdown(cancel_futures=True)
    assert proc.exitcode == 0  # ended by the pool's shutdown, not by a signal


def test_a_worker_that_stopped_on_its_own_stops_the_pool(tmp_path):
    """Only a worker got the signal (the parent did not): the job it refuses reaches the parent, which must still
    stop the other workers, not leave them running while it exits."""
    t0 = time.monotonic()
    with pytest.raises(WorkersInterrupted):
        with supervised_pool(2) as (pool, check):
            long = pool.submit(_mark_then_sleep, str(tmp_path / "started"), 300)
            _wait_for(tmp_path / "started")
            assert pool.submit(_job_stopped_by_a_signal).result(timeout=120) == signal.SIGTERM
            pool.submit(_touch, str(tmp_path / "ran")).result(timeout=120)  # refused by the stopped worker
    assert time.monotonic() - t0 < 100 and not (tmp_path / "ran").exists()
    with pytest.raises(WorkersInterrupted):  # the long job was stopped, not left to run for 300 s
        long.result(timeout=60)


def _training_that_ignores_its_stop(path: str) -> None:
    """A run inside StopSignals (as in Trainer.train) whose step never ends."""
    from vegalm.train.interrupt import StopSignals

    with StopSignals():
        Path(path).write_text("started")
        time.sleep(300)


def test_a_second_signal_ends_a_running_job_at_once(tmp_path):
    pool = process_pool(1)
    pid = pool.submit(os.getpid).result(timeout=120)
    proc = _alive(pool)[0]
    try:
        stuck = pool.submit(_training_that_ignores_its_stop, str(tmp_path / "started"))
        _wait_for(tmp_path / "started")
        os.kill(pid, signal.SIGTERM)  # the first: pending at the (never reached) step boundary
        time.sleep(1)
        assert proc.exitcode is None
        os.kill(pid, signal.SIGTERM)  # the second: as by default
        assert wait([proc.sentinel], timeout=30)  # ended (exitcode races the executor's own reaping)
        with pytest.raises(cf.process.BrokenProcessPool):  # it died: the pool saw a worker end abruptly
            stuck.result(timeout=30)
    finally:
        pool.shutdown(cancel_futures=True)
