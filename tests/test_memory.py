"""model/memory.py against the real thing: parameter counts against built models, dim-0 shares against torch.chunk,
and the activation formula against the bytes autograd really saves (torch.autograd.graph.saved_tensors_hooks).

The distributed side (every rank's real shard sizes under gloo) is tests/test_fsdp_scale.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from vegalm.errors import VegaError
from vegalm.model import EncoderConfig, VegaForMaskedLM, VegaForRTD, VegaModel, config_for_size
from vegalm.model.memory import (estimate_memory, local_elements, memory_table, saved_activation_bytes,
                                 shard_elements, unit_shapes)  # fmt: skip

TINY = dict(vocab_size=1001, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            position_buckets=32, max_relative_positions=128, max_position_embeddings=128)  # fmt: skip
BUILD = {"none": VegaModel, "mlm": VegaForMaskedLM, "rtd": VegaForRTD}


def _cfg(**kw) -> EncoderConfig:
    return EncoderConfig(**{**TINY, **kw})


@pytest.mark.parametrize("head", ["none", "mlm", "rtd"])
@pytest.mark.parametrize("kw", [{}, {"embedding_size": 32}, {"share_att_key": False}, {"relative_attention": False,
                                                                                   "position_biased_input": True}])
def test_units_enumerate_every_parameter(head, kw):
    cfg = _cfg(**kw)
    model = BUILD[head](cfg)
    real = sorted(tuple(p.shape) for p in model.parameters())
    assert sorted(s for unit in unit_shapes(cfg, head) for s in unit) == real


@pytest.mark.parametrize("world", [1, 2, 3, 8, 1001, 1500])
def test_shares_partition_the_model(world):
    cfg = _cfg()
    total = sum(p.numel() for p in VegaForRTD(cfg).parameters())
    shares = [local_elements(cfg, world, r, "rtd") for r in range(world)]
    assert sum(shares) == total
    assert shares[0] == max(shares)  # rank 0 holds the largest share: the per-rank figure
    assert estimate_memory(cfg, world, 1, 16, head="rtd")["param_elements"] == shares[0]


def test_1001_rows_split_like_torch_chunk():
    assert shard_elements((1001, 8), 2, 0) == 501 * 8 and shard_elements((1001, 8), 2, 1) == 500 * 8
    for rows, world in [(1001, 2), (1001, 3), (5, 8), (1, 2), (64, 4)]:
        chunks = torch.arange(rows).chunk(world)
        got = [shard_elements((rows, 3), world, r) for r in range(world)]
        assert got == [len(c) * 3 for c in chunks] + [0] * (world - len(chunks))  # chunk may return fewer pieces


def test_world_size_divides_the_sharded_lines():
    cfg = config_for_size("vega-1.3b", vocab_size=128100)
    one, eight = estimate_memory(cfg, 1, 8, 512, head="rtd"), estimate_memory(cfg, 8, 8, 512, head="rtd")
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes"):
        assert eight[key] / one[key] == pytest.approx(1 / 8, rel=1e-3)
    assert eight["activations_bytes"] == one["activations_bytes"]  # activations are per local batch, not sharded
    assert eight["activations_checkpointed_bytes"] < one["activations_bytes"] / 10  # 48 layers keep only inputs


def _saved_bytes(model, ids, **kw) -> int:
    """Bytes of the distinct storages autograd keeps at the end of forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta" and t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, **kw)
    loss = out.loss if getattr(out, "loss", None) is not None else out.last_hidden_state.float().pow(2).mean()
    loss.backward()  # the graph was complete
    return sum(seen.values())


CASES = [  # (config overrides, batch, seq_len, head, checkpointing)
    ({}, 2, 64, "none", False),
    ({}, 1, 64, "none", False),
    ({"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}, 2, 48, "none", False),
    ({}, 2, 64, "rtd", False),
    ({}, 2, 64, "mlm", False),
    ({"num_hidden_layers": 4}, 2, 64, "rtd", True),
]


@pytest.mark.parametrize("kw,batch,seq,head,ckpt", CASES)
def test_activation_formula_matches_saved_tensors(kw, batch, seq, head, ckpt):
    torch.manual_seed(0)
    cfg = _cfg(**kw)
    model = BUILD[head](cfg).train()
    if ckpt:
        from vegalm.train.fsdp import enable_checkpointing

        enable_checkpointing(model)
    ids = torch.randint(5, cfg.vocab_size, (batch, seq))
    extra = {}
    if head == "mlm":
        labels = torch.full_like(ids, -100)
        pos = torch.randperm(batch * seq)[: round(0.15 * batch * seq)]
        labels.view(-1)[pos] = ids.view(-1)[pos]
        extra = {"labels": labels}
    elif head == "rtd":
        extra = {"attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, ids.shape)}
    real = _saved_bytes(model, ids, **extra)
    est = saved_activation_bytes(cfg, batch, seq, "fp32", ckpt, head)
    print(f"{kw} B={batch} L={seq} head={head} ckpt={ckpt}: saved {real:,} B, estimate {est:,} B "
          f"({est / real - 1:+.1%})")
    assert est == pytest.approx(real, rel=0.05)  # counted for the CPU kernels; exact on torch 2.13 CPU


def test_table_prints_every_line():
    est = estimate_memory(_cfg(), 2, 2, 64, activation_checkpointing=True, head="rtd")
    text = memory_table(est)
    for name in ("parameters", "gradients", "AdamW", "gathered", "activations (checkpointed)", "total"):
        assert name in text
    gib = float(text.split("total")[1].split("GiB")[0])
    assert gib == pytest.approx(est["total_bytes"] / 1024**3, abs=0.01)


@pytest.mark.parametrize("call", [
    lambda c: estimate_memory(c, 0, 8, 512),
    lambda c: estimate_memory(c, 2, 0, 512),
    lambda c: estimate_memory(c, 2, 8, -1),
    lambda c: estimate_memory(c, 2, 8, 512, dtype="fp16"),
    lambda c: estimate_memory(c, 2, 8, 512, head="cls"),
    lambda c: local_elements(c, 2, rank=2),
])  # fmt: skip
def test_bad_inputs_raise_one_line(call):
    with pytest.raises(VegaError) as e:
        call(_cfg())
    assert "\n" not in str(e.value)


def test_gathered_is_zero_only_without_sharding_in_fp32():
    cfg = _cfg()
    assert estimate_memory(cfg, 1, 1, 16, "fp32")["gathered_bytes"] == 0
    root_and_layer = sum(math.prod(s) for s in unit_shapes(cfg)[0]) + sum(math.prod(s) for s in unit_shapes(cfg)[1])
    assert estimate_memory(cfg, 2, 1, 16, "fp32")["gathered_bytes"] == root_and_layer * 4
