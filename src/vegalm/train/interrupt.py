"""SIGINT / SIGTERM as a request to stop at the next step boundary (what Slurm, Kubernetes and torchrun
send before they kill). The Trainer holds a `StopSignals` for the duration of `train()`; a second signal
of either kind acts as it would have without it (Ctrl-C twice stops at once).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received = 0  # the first stop signal any StopSignals of this process caught (0: none)


def stop_received() -> int:
    """The first SIGINT / SIGTERM a `StopSignals` caught in this process, 0 if none: a worker process that was
    told to stop must not start another job (vegalm.workers)."""
    return _received


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
