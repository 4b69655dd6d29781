"""Atomic file writes: a temp file in the target's folder, fsync, then `os.replace`.

A reader (or a crash) sees either the old file or the whole new one, never a partial write.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# mkstemp creates files 0600; the written file gets the mode a plain open() would give it. Read once at import:
# os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_dir(path: str | Path) -> None:
    """fsync a folder so that a rename inside it survives a power loss (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; the parent folder must exist. Returns `path` as a Path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (newlines are written as given, no translation)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, obj: Any, **json_kw: Any) -> Path:
    """Write `obj` as JSON (default indent=2, one trailing newline) to `path` atomically; `json_kw` go to json.dumps."""
    json_kw.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **json_kw) + "\n")


def write_if_changed(path: str | Path, text: str) -> None:
    """Rewrite only on a change, so the file (and a cache key hashed from it) stays put on a rerun."""
    path = Path(path)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
