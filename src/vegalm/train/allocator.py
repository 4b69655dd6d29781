"""glibc's malloc on a CPU run: keep freed large blocks in the heap instead of unmapping them.

glibc serves a block above M_MMAP_THRESHOLD with fresh pages from mmap and unmaps it on free. The threshold adapts
but stops at 32 MiB, and an S512 activation is larger (bf16 [8, 4, 512, 1023] is 33.5 MB), so each one is
page-faulted in again at every use. With the thresholds below an encoder step on one thread ran 1.00-1.15x as fast
(ours) and 1.10-1.52x (transformers' DeBERTa), a MiniLM fine-tuning step about 1.1x (BENCHMARKS.md, "glibc's
malloc"), for about 7% more peak RSS (the heap keeps what it frees). Set once per process by the Trainer on a CPU.
Off: VEGALM_KEEP_FREED_MEMORY=0; glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_, when
set, are left in charge.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap; up to 1 GiB of free heap top is kept
GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
SWITCH = "VEGALM_KEEP_FREED_MEMORY"

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True when they were set."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get(SWITCH, "1") == "0" or any(k in os.environ for k in GLIBC_ENV):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt thresholds)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
    log.debug("glibc malloc: mmap/trim thresholds %s", "raised to 1 GiB" if _done else "unchanged (mallopt refused)")
    return _done
