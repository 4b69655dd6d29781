"""bench/encoder_gpu.py: a smoke run of the GPU benchmark's code on the CPU (tiny config, one repeat)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from _bench import load_bench

encoder_gpu = load_bench("encoder_gpu")


def test_smoke_on_cpu_same_weights_and_json_line():
    torch.set_num_threads(1)
    models = encoder_gpu.build("tiny", "cpu", ["sdpa"])
    hf, ours = models["hf"].eval(), models["ours-sdpa"].eval()
    ids = torch.randint(5, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the two sides hold the same weights and compute the same encoder
        a, b = hf(input_ids=ids).last_hidden_state, ours(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = encoder_gpu.main(["--device", "cpu", "--size", "tiny", "--repeats", "1", "--cases", "2x32,1x520",
                               "--dtypes", "fp32"])
    line = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert rc == 0 and line["device"] == "cpu" and [r["case"] for r in line["rows"]] == ["B2xS32", "B1xS520"]
    assert all(r["hf_ms"] > 0 and r["ours-sdpa_speedup"] > 0 and r["hf_mem_mb"] is None for r in line["rows"])


def test_flex_needs_attention_dropout_off(capsys):
    # with attention dropout a flex training step runs sdpa, so its column would time sdpa again
    with pytest.raises(SystemExit):
        encoder_gpu.main(["--device", "cpu", "--size", "tiny", "--flex"])
    assert "--attn-dropout 0" in capsys.readouterr().err
    models = encoder_gpu.build("tiny", "cpu", ["sdpa"], attn_dropout=0.0)
    assert all(m.config.attention_probs_dropout_prob == 0.0 for m in models.values())
