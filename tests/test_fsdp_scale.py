"""vega-1.3b and large under FSDP (train/fsdp.py), 2 processes over gloo: real AdamW steps at full width.

tests/_fsdp_scale.py builds each size with 2 of its layers and a 1001-token vocabulary, shards it with
`shard_model` and takes 2 steps; here every rank's parameter, gradient and AdamW-state counts are checked against
the 1/world share (torch.chunk rounding along dim 0) and against `estimate_memory`'s lines, which must be exact.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_fsdp_scale.py     # one torchrun launch, ~25 s
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import _torchrun  # noqa: E402

SCRIPT = TESTS / "_fsdp_scale.py"
WORLD = 2

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo backend"
)


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    proc = _torchrun.run([str(SCRIPT), "--sizes", "vega-1.3b,large"], nproc=WORLD, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FSDP_SCALE ")]
    assert len(lines) == 1, proc.stdout[-2000:]  # printed by the main process only
    return json.loads(lines[0].split(" ", 1)[1])


@pytest.mark.parametrize("size", ["vega-1.3b", "large"])
def test_per_rank_shares_match_the_estimate(ranks, size):
    mine = sorted((r for r in ranks if r["size"] == size), key=lambda r: r["rank"])
    assert [r["rank"] for r in mine] == list(range(WORLD))
    total = mine[0]["total_elements"]
    assert total > 25_000_000  # full width: 2 layers of vega-1.3b are 57M parameters, of large 25M
    assert sum(r["param_elements"] for r in mine) == total  # the shards partition the model
    est = mine[0]["estimate"]
    assert est["total_elements"] == total  # the estimator enumerates the same parameters
    for r in mine:
        print(f"{size} rank {r['rank']}: parameters {r['param_bytes']:,} B, gradients {r['grad_bytes']:,} B, "
              f"AdamW state {r['optimizer_bytes']:,} B (estimate, rank 0: {est['params_bytes']:,} / "
              f"{est['grads_bytes']:,} / {est['optimizer_bytes']:,} B)")
        assert r["sharded"]  # every parameter became a DTensor
        assert r["param_elements"] == r["expected_elements"]  # exactly the torch.chunk rule, on every rank
        assert abs(r["param_elements"] - total / WORLD) < r["one_row_each"]  # total/world within the dim-0 rounding
        assert math.ceil(total / WORLD) <= mine[0]["param_elements"]  # rank 0 holds the largest share
        assert r["grad_elements"] == r["param_elements"]  # gradients are reduce-scattered into the same shards
        assert r["optimizer_elements"] == 2 * r["param_elements"]  # exp_avg + exp_avg_sq, shaped like the shards
        assert r["param_bytes"] == 4 * r["param_elements"] and r["optimizer_bytes"] == 8 * r["param_elements"]
        assert all(math.isfinite(x) for x in r["losses"]) and len(r["losses"]) == 2
        assert r["losses"] == mine[0]["losses"]  # same ids, no dropout: the ranks compute the same loss
    # rank 0's bytes are the estimate's lines, exactly
    assert (est["params_bytes"], est["grads_bytes"], est["optimizer_bytes"]) == (
        mine[0]["param_bytes"], mine[0]["grad_bytes"], mine[0]["optimizer_bytes"])
    # the odd vocabulary (1001 rows) and the RTD classifier's single row make the split uneven
    assert mine[0]["param_elements"] > mine[1]["param_elements"]
