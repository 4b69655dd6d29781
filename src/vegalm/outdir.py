"""Output folders vegalm owns: a marker file on each folder it creates (`claim_dir`), deletion of marked
folders only (`safe_rmtree`), and an exclusive lock per folder (`lock_dir`) so two runs never share one.
Torch-free. Typical use: `claim_dir(out, "finetune", key, reserved=("checkpoints", "model"))`, then
`with lock_dir(out): ...`. See docs/output-folders.md.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path

from vegalm import __version__
from vegalm.errors import VegaError
from vegalm.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

MARKER = ".vegalm-owned"
LOCK_NAME = ".vegalm.lock"
PID_NAME = ".vegalm.lock.pid"  # beside the lock file, so a second process can name the holder


class OutputDirError(VegaError):
    """A folder vegalm would write into or delete is not (only) its own, or another run holds it."""


def read_marker(path: str | Path) -> dict | None:
    """The marker of a folder vegalm created ({} if unreadable), or None when it has none."""
    f = Path(path) / MARKER
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _first_entry(path: Path) -> str | None:
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return None
    return names[0] if names else None


def claim_dir(path: str | Path, kind: str, key: str | None = None, reserved: tuple[str, ...] = ()) -> Path:
    """Create `path` (or adopt an existing folder) as a vegalm `kind` folder and return it.

    An unmarked folder is adopted only when none of the `reserved` names (what the caller is about to
    write: "checkpoints", "model", ...) exists in it; the user's other files are left alone. A marked
    folder of another kind is refused. `key` (a config hash) is recorded; compare it with
    `read_marker(path)["key"]` before claiming when a changed key matters.
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise OutputDirError(f"{path}: exists and is not a folder")
    marker = read_marker(path) if path.is_dir() else None
    if marker is None and path.is_dir():
        foreign = next((name for name in reserved if os.path.lexists(path / name)), None)
        if foreign is not None:
            raise OutputDirError(
                f"{path} already holds {foreign!r}, which vegalm did not create (no {MARKER} there) and would "
                f"overwrite; choose another output folder or move {path / foreign} away")
    if marker is not None and marker.get("kind") not in (None, kind):
        raise OutputDirError(f"{path} is a vegalm {marker['kind']} folder, not a {kind} one; choose another output folder")
    if marker is None or (key is not None and marker.get("key") != key):
        path.mkdir(parents=True, exist_ok=True)
        info = {"kind": kind, "key": key if key is not None else (marker or {}).get("key"),
                "created": (marker or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S"),
                "vegalm_version": __version__}
        atomic_write_json(path / MARKER, info)  # a unique temp name: torchrun ranks may claim at once
    return path


def safe_rmtree(path: str | Path) -> None:
    """Delete a folder that vegalm created (it carries its own marker); an empty folder goes too.

    Anything else (no marker, a symlink, a file) raises OutputDirError naming the path and its first
    entry, and nothing is deleted. A missing path is a no-op.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise OutputDirError(f"refusing to delete {path}: it is a {'symlink' if path.is_symlink() else 'file'}, "
                             "not a folder vegalm created")
    if read_marker(path) is None:
        first = _first_entry(path)
        if first is None:
            path.rmdir()
            return
        raise OutputDirError(f"refusing to delete {path}: vegalm did not create it (no {MARKER}; it holds {first!r}); "
                             "move it away or choose another output folder")
    shutil.rmtree(path)


class DirLock:
    """An exclusive flock on `path/.vegalm.lock`. The OS drops it when the process ends, even on SIGKILL."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            pid = (self.path / PID_NAME).read_text(encoding="utf-8").strip()
        except OSError:
            pid = ""
        return f"pid {pid}" if pid.isdigit() else "a process whose pid is not recorded yet"

    def acquire(self, wait: bool = False) -> DirLock:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            if not wait:
                os.close(fd)
                raise OutputDirError(f"{self.path} is in use by another vegalm run ({self.holder()}); "
                                     "wait for it to finish, or pass another output folder") from None
            log.info("%s is in use by %s; waiting for it to finish", self.path, self.holder())
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        atomic_write_text(self.path / PID_NAME, f"{os.getpid()}\n")
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            (self.path / PID_NAME).unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock; the lock file itself stays
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_dir(path: str | Path, wait: bool = False, main_process_only: bool = True) -> DirLock:
    """Take the folder's exclusive lock and return it (a context manager; `.release()` also works).

    A second process fails at once with one line naming the holder's pid, or blocks if `wait`. Under
    torchrun only rank 0 locks (`main_process_only`): the ranks of one run share the folder, and a second
    run's rank 0 fails, which ends that whole run.
    """
    lock = DirLock(path)
    if main_process_only and int(os.environ.get("RANK", "0")) != 0:
        return lock  # not held; release() is a no-op
    return lock.acquire(wait=wait)
