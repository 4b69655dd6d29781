"""SIGINT / SIGTERM as a request to stop at the next step boundary (what Slurm, Kubernetes and torchrun
send before they kill). The Trainer holds a `StopSignals` for the duration of `train()`; a second signal
of either kind acts as it would have without it (Ctrl-C twice stops at once). In a worker process
(`remember_stops`, vegalm.workers) a stop also counts when it arrives outside `train()`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received = 0  # the first stop signal this process caught (a StopSignals, or remember_stops's handler); 0: none
_in_job = False  # inside `job()`: a stop outside StopSignals ends the job in hand


def stop_received() -> int:
    """The first SIGINT / SIGTERM caught in this process, 0 if none: a worker process that was told to stop must
    not start another job (vegalm.workers)."""
    return _received


def remember_stops() -> None:
    """For a worker process of a pool. A first SIGINT / SIGTERM outside `StopSignals` is noted, and inside `job()`
    it also ends the job in hand (KeyboardInterrupt); an idle worker lives on, and ignores further signals while
    its parent lives: the pool's shutdown ends it cleanly. A worker that died of a signal would break the pool,
    whose executor then SIGTERMs every other worker, cutting short their step-boundary stops. A second signal
    in a job, or any signal once the parent is gone, acts as by default."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _note)


@contextlib.contextmanager
def job() -> Iterator[None]:
    """A worker's job: a stop signal noted by `remember_stops` (outside a StopSignals) ends it."""
    global _in_job
    _in_job = True
    try:
        yield
    finally:
        _in_job = False


def _note(signum: int, frame) -> None:
    global _received
    if (_received and _in_job) or (not _in_job and _orphaned()):  # the default disposition (SIGINT raises
        for sig in SIGNALS:  # KeyboardInterrupt, SIGTERM ends the process)
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
        os.kill(os.getpid(), signum)
        return
    if _received:  # idle and told already: the pool's shutdown sentinel ends this worker
        return
    _received = signum
    name = signal.Signals(signum).name
    if _in_job:
        raise KeyboardInterrupt(f"{name} received: the job in hand stops")
    log.warning("%s received: this worker starts no further job", name)


def _orphaned() -> bool:
    """This process's multiprocessing parent has ended (nothing will shut its pool down)."""
    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()


class StopSignals:
    """`with StopSignals() as stop:` ... `stop.pending` is the first signal number received (0: none).

    The previous handlers come back on exit. A signal that arrived but was not acted on (`acknowledge()`
    not called) is delivered again then, so the previous disposition still applies to it.
    """

    def __init__(self) -> None:
        self.pending = 0
        self._acknowledged = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set from there
            for sig in SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.pending:  # the second one: behave as if we had never caught any
            self._restore()
            os.kill(os.getpid(), signum)
            return
        global _received
        self.pending, _received = signum, _received or signum
        log.warning("%s received: stopping at the next step boundary (send it again to stop at once)",
                    signal.Signals(signum).name)

    def acknowledge(self) -> None:
        """The pending signal was acted on (the run stopped because of it): do not deliver it again."""
        self._acknowledged = True

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
        if self.pending and not self._acknowledged:
            os.kill(os.getpid(), self.pending)
