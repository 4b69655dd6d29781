"""`data.streaming=true` end to end: 2 processes pretrain the smoke recipe from a local `hf:text:` corpus read
through the real `datasets` streaming path, each from its own shard; a run SIGKILLed right after its first
checkpoint and rerun exports bit-identical weights (its streams resume at the exact document)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
import _torchrun  # noqa: E402
from _data import CORPUS_DIR, needs

CORPUS = CORPUS_DIR / "gutenberg"
PRETRAIN = ["-m", "vegalm.cli", "pretrain", "--recipe", str(REPO / "recipes" / "smoke.yaml"), "baseline=null",
            "data.streaming=true", f"data.corpus=hf:text:{CORPUS}/austen-[ep]*.txt.gz"]  # 2 files: a shard each

pytestmark = [pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="no gloo backend"),
              needs(CORPUS_DIR)]


def _export(run: Path) -> dict[str, torch.Tensor]:
    return {f"{part}/{k}": v for part in ("discriminator", "generator")
            for k, v in load_file(str(run / part / "model.safetensors")).items()}


@pytest.mark.slow  # three torchrun launches of the pretraining CLI: ~1 min on 2 shared cores
def test_streamed_pretraining_killed_and_resumed_exports_bit_identical_weights(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = _torchrun.run([*PRETRAIN, "--out", str(straight)], timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (straight / "data").exists()  # nothing packed ahead: the segments were streamed
    proc = _torchrun.run([*PRETRAIN, "--out", str(killed)], timeout=400, VEGALM_TEST_KILL_AFTER_SAVE="6")
    assert proc.returncode != 0
    ckpt = killed / "phase1" / "checkpoints" / "step-000006"
    assert (killed / "phase1" / "checkpoints" / "latest").read_text().strip() == ckpt.name
    positions = [torch.load(ckpt / f"rng_rank{r}.pt", weights_only=True)["state"]["stream"] for r in (0, 1)]
    assert [p["rank"] for p in positions] == [0, 1] and all(p["doc"] > 0 for p in positions)
    proc = _torchrun.run([*PRETRAIN, "--out", str(killed)], timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr
    a, b = _export(straight), _export(killed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(x)["loss"] for x in (run / "phase2" / "metrics.jsonl").read_text().splitlines()]
            for run in (straight, killed)]
    assert rows[0] == rows[1]
