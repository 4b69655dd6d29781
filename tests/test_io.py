"""vegalm.io: atomic writes leave the old file or the whole new one, and no temp files."""

import json
import os
import stat

import pytest

from vegalm import io as vio


def test_atomic_writes_replace_and_leave_no_temp(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("old")
    vio.atomic_write_json(p, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert p.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2, sort_keys=True) + "\n"
    vio.atomic_write_text(tmp_path / "t.txt", "é\r\nx")
    assert (tmp_path / "t.txt").read_bytes() == "é\r\nx".encode()
    vio.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["b.bin", "r.json", "t.txt"]


def test_mode_follows_umask_not_mkstemp(tmp_path):
    p = vio.atomic_write_text(tmp_path / "m.txt", "x")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~vio._UMASK


def test_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("old")
    with pytest.raises(TypeError):
        vio.atomic_write_json(p, {"x": object()})  # not JSON-able: fails before anything is written
    with pytest.raises(TypeError):
        vio.atomic_write_bytes(p, "not bytes")  # fails while writing the temp file
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]
