"""bench/encoder_gpu.py: a smoke run of the GPU benchmark's code on the CPU (tiny config, one repeat)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from _bench import load_bench

encoder_gpu = load_bench("encoder_gpu")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)  # not left to the tests after this file


def test_smoke_on_cpu_same_weights_and_json_line(one_thread):
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


def test_packages_are_checked_before_any_model_is_built(capsys):
    with pytest.raises(SystemExit):
        encoder_gpu.main(["--device", "cpu", "--size", "tiny", "--packages", "flashdeberta-typo"])
    assert "unknown flashdeberta-typo" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # flashdeberta's kernel has no attention dropout: every side must run without
        encoder_gpu.main(["--device", "cpu", "--size", "tiny", "--packages", "flashdeberta"])
    assert "--attn-dropout 0" in capsys.readouterr().err


def test_a_package_that_fails_to_build_is_left_out_not_timed(monkeypatch, capsys):
    def broken(path, hf, device):
        raise ImportError("no module named triton")

    monkeypatch.setitem(encoder_gpu.PACKAGES, "flashdeberta", broken)
    models = encoder_gpu.build("tiny", "cpu", ["sdpa"], attn_dropout=0.0, packages=("flashdeberta",))
    assert set(models) == {"hf", "ours-sdpa"}
    assert "flashdeberta: left out (ImportError: no module named triton)" in capsys.readouterr().out


def test_disentangled_flash_side_matches_transformers_and_is_timed(one_thread):
    pytest.importorskip("disentangled_flash")
    from disentangled_flash import DebertaV2OptimizedEncoder

    models = encoder_gpu.build("tiny", "cpu", ["sdpa"], attn_dropout=0.0, packages=("disentangled-flash",))
    assert isinstance(models["disentangled-flash"].encoder, DebertaV2OptimizedEncoder)  # its path, not HF's kept
    diff = encoder_gpu.max_abs_diff_vs_hf(models, "cpu", "tiny")  # a padded row included
    assert set(diff) == {"ours-sdpa", "disentangled-flash"} and max(diff.values()) < 1e-4
    emb = models["disentangled-flash"].embeddings.word_embeddings.weight.data  # (a constant shift: LayerNorm undoes it)
    emb.add_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(3)))
    assert encoder_gpu.max_abs_diff_vs_hf(models, "cpu", "tiny")["disentangled-flash"] > 1e-3  # the check can fail
    r = encoder_gpu.measure(models, 2, 32, "fp32", "cpu", repeats=1, warmup=1)
    assert all(v["s"] > 0 for v in r.values())


def test_a_side_whose_step_fails_is_dropped_from_that_case(capsys):
    models = encoder_gpu.build("tiny", "cpu", ["sdpa"])

    class Broken(torch.nn.Module):  # an anchor that raises in its step (e.g. a kernel without fp32)
        config = models["hf"].config

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **kw):
            raise RuntimeError("fp32 not supported")

    models["anchor"] = Broken()
    r = encoder_gpu.measure(models, 2, 16, "fp32", "cpu", repeats=1, warmup=0)
    assert r["anchor"] == {"s": None, "mem_mb": None} and r["hf"]["s"] > 0
    assert "anchor B2xS16 fp32: failed (RuntimeError: fp32 not supported)" in capsys.readouterr().out
