"""vegalm.outdir: owned folders, refusal to touch the user's files, and the per-folder lock across real processes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vegalm.errors import VegaError
from vegalm.outdir import MARKER, OutputDirError, claim_dir, lock_dir, read_marker, safe_rmtree

RESERVED = ("checkpoints", "model", "tokenizer", "data", "results.json")


def _file(p: Path):
    p.write_bytes(b"user weights \x00\x01")


def _full_dir(p: Path):
    p.mkdir()
    (p / "important.txt").write_text("keep me\n")


def _empty_dir(p: Path):
    p.mkdir()


def _symlink_to_user_dir(p: Path):
    target = p.parent.parent / f"elsewhere-{p.name}"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"\x00" * 8)
    p.symlink_to(target, target_is_directory=True)


def _dangling_symlink(p: Path):
    p.symlink_to(p.parent / "nowhere")


FOREIGN = {"file": _file, "dir": _full_dir, "empty_dir": _empty_dir, "symlink": _symlink_to_user_dir,
           "dangling": _dangling_symlink}


def _snapshot(root: Path) -> dict:
    """Every path under root (symlinks not followed) with its bytes or link target."""
    snap = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            key = str(p.relative_to(root))
            snap[key] = ("link", os.readlink(p)) if p.is_symlink() else ("file", p.read_bytes()) if p.is_file() else "dir"
    return snap


@pytest.mark.parametrize("entry", sorted(FOREIGN))
@pytest.mark.parametrize("name", RESERVED)
def test_claim_refuses_foreign_reserved_entry(tmp_path, entry, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    FOREIGN[entry](out / name)
    before = _snapshot(tmp_path)
    with pytest.raises(OutputDirError) as e:
        claim_dir(out, "finetune", "abc", reserved=RESERVED)
    msg = str(e.value)
    assert "\n" not in msg and repr(name) in msg and str(out) in msg
    assert isinstance(e.value, VegaError)
    assert _snapshot(tmp_path) == before  # nothing written, nothing removed: not even a marker


@pytest.mark.parametrize("entry", sorted(FOREIGN))
def test_safe_rmtree_refuses_unmarked_folder(tmp_path, entry):
    out = claim_dir(tmp_path / "out", "finetune")
    ckpts = out / "checkpoints"  # the parent is ours, the sub-folder is not: it needs its own marker
    ckpts.mkdir()
    FOREIGN[entry](ckpts / "step-1")
    before = _snapshot(tmp_path)
    with pytest.raises(OutputDirError) as e:
        safe_rmtree(ckpts)
    assert "\n" not in str(e.value) and str(ckpts) in str(e.value) and "'step-1'" in str(e.value)
    assert _snapshot(tmp_path) == before


def test_safe_rmtree_refuses_symlink_and_file(tmp_path):
    target = claim_dir(tmp_path / "real", "checkpoints")  # even a link to one of our folders is not followed
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    (tmp_path / "f").write_text("x")
    for p in (tmp_path / "link", tmp_path / "f"):
        with pytest.raises(OutputDirError, match="refusing to delete"):
            safe_rmtree(p)
    assert (target / MARKER).is_file() and (tmp_path / "f").read_text() == "x"


def test_claim_then_rmtree_owned(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("unrelated file of the user\n")
    assert claim_dir(out, "finetune", "k1", reserved=RESERVED) == out  # adopted: no reserved name present
    m = read_marker(out)
    assert m["kind"] == "finetune" and m["key"] == "k1" and m["vegalm_version"]
    ck = claim_dir(out / "checkpoints", "checkpoints", "k1")
    (ck / "step-00000002").mkdir()
    (ck / "step-00000002" / "model.safetensors").write_bytes(b"w")
    claim_dir(out, "finetune", reserved=RESERVED)  # a marked folder is ours: its reserved entries too
    assert read_marker(out)["key"] == "k1"  # key=None keeps the recorded key
    claim_dir(out, "finetune", "k2")
    assert read_marker(out)["key"] == "k2" and read_marker(out)["created"] == m["created"]
    safe_rmtree(ck)
    assert not ck.exists() and (out / "notes.txt").is_file()
    safe_rmtree(out / "missing")  # no-op
    (out / "empty").mkdir()
    safe_rmtree(out / "empty")  # an empty folder holds nothing of anyone's
    assert not (out / "empty").exists()


def test_claim_refuses_other_kind_and_file(tmp_path):
    claim_dir(tmp_path / "pt", "pretrain")
    with pytest.raises(OutputDirError, match="is a vegalm pretrain folder, not a finetune one"):
        claim_dir(tmp_path / "pt", "finetune")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputDirError, match="not a folder"):
        claim_dir(tmp_path / "f", "finetune")
    assert (tmp_path / "f").read_text() == "x"


def test_marker_is_json(tmp_path):
    out = claim_dir(tmp_path / "a" / "b", "pretrain", "h")
    assert json.loads((out / MARKER).read_text())["kind"] == "pretrain"


# ---------------------------------------------------------------------------------------------- the lock

_HOLDER = """
import sys, time
from vegalm.outdir import lock_dir
lock = lock_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""

_SECOND = """
import sys
from vegalm.outdir import lock_dir, OutputDirError
try:
    with lock_dir(sys.argv[1], wait=sys.argv[2] == "wait"):
        print("acquired", flush=True)
except OutputDirError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def _start_holder(path: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def _second(path: Path, mode: str, **kw):
    return subprocess.run([sys.executable, "-c", _SECOND, str(path), mode], capture_output=True, text=True, **kw)


def test_lock_second_process_fails_naming_pid_then_sigkill_frees(tmp_path):
    holder = _start_holder(tmp_path)
    try:
        r = _second(tmp_path, "nowait", timeout=60)
        assert r.returncode == 2 and r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "in use" in lines[0], r.stderr
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup code runs: the OS must drop the flock
        holder.wait()
    r = _second(tmp_path, "nowait", timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "acquired", r.stderr


def test_lock_wait_blocks_until_holder_dies(tmp_path):
    holder = _start_holder(tmp_path)
    waiter = subprocess.Popen([sys.executable, "-c", _SECOND, str(tmp_path), "wait"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(timeout=3)  # still blocked while the holder lives
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and out.strip() == "acquired", err


def test_lock_in_process_release_and_ranks(tmp_path, monkeypatch):
    with lock_dir(tmp_path) as lock:
        assert lock.held and (tmp_path / ".vegalm.lock.pid").read_text().strip() == str(os.getpid())
        with pytest.raises(OutputDirError, match=f"pid {os.getpid()}"):
            lock_dir(tmp_path)  # a second descriptor in the same process conflicts too
        monkeypatch.setenv("RANK", "1")
        assert not lock_dir(tmp_path).held  # other ranks of the same torchrun job share rank 0's lock
        monkeypatch.delenv("RANK")
    assert not lock.held and not (tmp_path / ".vegalm.lock.pid").exists()
    again = lock_dir(tmp_path)  # released: free for the next run
    assert again.held
    again.release()
