"""Memory per process under FSDP full sharding (train/fsdp.py), from an EncoderConfig alone.

    est = estimate_memory(config_for_size("vega-1.3b"), world_size=8, batch=8, seq_len=512, dtype="bf16")
    est["total_bytes"]   # parameters + gradients + AdamW state + activations + gathered weights, rank 0

FSDP2 cuts every parameter along dim 0 into world_size chunks the way `torch.chunk` does: each rank holds
ceil(rows / N) rows, the last ranks fewer (possibly none). Rank 0 always holds the largest share, and FSDP2 pads
every rank's storage to that size, so the rank-0 count is the per-rank figure (`local_elements` gives any rank's).
Activations are the tensors autograd saves for backward, counted per encoder layer from its shapes (the counts are
checked against `saved_tensors_hooks` on real layers in tests/test_memory.py). Manual: docs/scaling.md.
"""

from __future__ import annotations

import math

from vegalm.errors import VegaError
from vegalm.model.config import EncoderConfig
from vegalm.model.ffn import APPROXIMATE

HEADS = ("none", "mlm", "rtd")  # bare encoder (VegaModel), VegaForMaskedLM, VegaForRTD
MLM_FRACTION = 0.15  # the MLM head projects to the vocabulary at the masked positions only (objective.mask_prob)
LN_STAT_BYTES = 4  # LayerNorm saves mean and 1/std per row; fp32 on CUDA even for bf16 inputs
INDEX_BYTES = 8  # int64 token ids and the [L, L] relative-position index


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a compute dtype name: fp32 (also "float32", "no") or bf16 (also "bfloat16")."""
    names = {"fp32": 4, "float32": 4, "no": 4, "bf16": 2, "bfloat16": 2}
    if dtype not in names:
        raise VegaError(f"dtype={dtype!r}: expected fp32 or bf16")
    return names[dtype]


# ---- parameters, per FSDP unit ------------------------------------------------------------------
def _linear(d_out: int, d_in: int, bias: bool = True) -> list[tuple[int, ...]]:
    return [(d_out, d_in), (d_out,)] if bias else [(d_out, d_in)]  # nn.Linear weight is [out, in]: dim 0 = out


def _norm(d: int) -> list[tuple[int, ...]]:
    return [(d,), (d,)]  # LayerNorm weight and bias


def layer_shapes(cfg: EncoderConfig) -> list[tuple[int, ...]]:
    """Parameter shapes of one encoder layer (encoder.py `Layer`): one FSDP unit."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    shapes = _linear(h, h) * 3  # query_proj, key_proj, value_proj
    if cfg.relative_attention and not cfg.share_att_key:  # separate projections of the relative embeddings
        shapes += _linear(h, h) * sum(t in cfg.pos_att_type for t in ("c2p", "p2c"))
    shapes += _linear(h, h) + _norm(h)  # attention.output: dense + LayerNorm
    shapes += _linear(f, h)  # intermediate.dense
    shapes += _linear(h, f) + _norm(h)  # output: dense + LayerNorm
    return shapes


def root_shapes(cfg: EncoderConfig, head: str = "none") -> list[tuple[int, ...]]:
    """Everything outside the layers (embeddings, relative table, head): the root FSDP unit."""
    if head not in HEADS:
        raise VegaError(f"head={head!r}: expected one of {', '.join(HEADS)}")
    h, e, v = cfg.hidden_size, cfg.emb_size, cfg.vocab_size
    shapes = [(v, e)]  # word_embeddings
    if cfg.position_biased_input:
        shapes.append((cfg.max_position_embeddings, e))
    if cfg.type_vocab_size > 0:
        shapes.append((cfg.type_vocab_size, e))
    if e != h:
        shapes += _linear(h, e, bias=False)  # embed_proj
    shapes += _norm(h)  # embeddings.LayerNorm
    if cfg.relative_attention:
        shapes.append((2 * cfg.att_span, h))  # encoder.rel_embeddings
        if "layer_norm" in [x.strip() for x in cfg.norm_rel_ebd.lower().split("|")]:
            shapes += _norm(h)
    if head == "mlm":  # heads.py MLMHead: dense, LayerNorm, output bias (the decoder is the tied embedding)
        shapes += _linear(e, h) + _norm(e) + [(v,)]
    elif head == "rtd":  # heads.py RTDHead: dense, LayerNorm, 1-logit classifier ([1, h]: one row to shard)
        shapes += _linear(h, h) + _norm(h) + _linear(1, h)
    return shapes


def unit_shapes(cfg: EncoderConfig, head: str = "none") -> list[list[tuple[int, ...]]]:
    """The FSDP units of `shard_model`: the root unit first, then one per encoder layer."""
    return [root_shapes(cfg, head)] + [layer_shapes(cfg)] * cfg.num_hidden_layers


def shard_elements(shape: tuple[int, ...], world_size: int, rank: int = 0) -> int:
    """Elements of one parameter held by `rank`: torch.chunk rows along dim 0, times the other dims."""
    rows = shape[0]
    chunk = -(-rows // world_size)  # ceil(rows / N) rows per rank ...
    mine = max(0, min(chunk, rows - rank * chunk))  # ... except at the end: 1001 rows over 2 ranks = 501 + 500
    return mine * math.prod(shape[1:])


def local_elements(cfg: EncoderConfig, world_size: int, rank: int = 0, head: str = "none") -> int:
    """Parameter elements on `rank` after `shard_model` (= what `local_numel(model.parameters())` counts there)."""
    _check_world(world_size)
    if not 0 <= rank < world_size:
        raise VegaError(f"rank={rank}: expected 0..{world_size - 1}")
    return sum(shard_elements(s, world_size, rank) for unit in unit_shapes(cfg, head) for s in unit)


def _check_world(world_size: int) -> None:
    if world_size < 1:
        raise VegaError(f"world_size={world_size}: expected at least 1")


# ---- activations ---------------------------------------------------------------------------------
def rel_rows(cfg: EncoderConfig, seq_len: int) -> int:
    """P: rows of the relative table one forward at this length projects (relpos.RelIndexCache's hi - lo + 1)."""
    if not cfg.relative_attention:
        return 0
    import torch

    from vegalm.model.relpos import log_bucket

    k, d = cfg.att_span, seq_len - 1  # the farthest pair is L - 1 apart; buckets grow with distance
    if cfg.position_buckets > 0 and cfg.max_rel > 0:
        d = int(log_bucket(torch.tensor([d]), cfg.position_buckets, cfg.max_rel)[0])
    return min(k + d, 2 * k - 1) - max(k - d, 0) + 1  # bucket + k, clamped to 0..2k-1 on both sides


def layer_activation_bytes(cfg: EncoderConfig, batch: int, seq_len: int, dtype: str = "bf16") -> int:
    """Bytes one encoder layer saves for backward (training mode, no padding: packed pretraining batches).

    Counted for the fused CPU kernel (attention.py FusedAttention); CUDA's sdpa saves its [B,H,L,L] bias instead of
    the probabilities (same size) and no dropout mask. Tensors shared by all layers are in `_shared_bytes`."""
    s = dtype_bytes(dtype)
    n, h, f, H = batch * seq_len, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    square = batch * H * seq_len * seq_len  # one [B, H, L, L] attention matrix
    terms = sum(t in cfg.pos_att_type for t in ("c2p", "p2c")) if cfg.relative_attention else 0
    p = rel_rows(cfg, seq_len)
    hidden_drop, attn_drop = cfg.hidden_dropout_prob > 0, cfg.attention_probs_dropout_prob > 0
    elems = 9 * n * h  # [B, L, h]-sized, in order of use: the layer input (read by q/k/v_proj), q, k, v, the attention
    # output (FusedAttention), its [B, L, h] copy (transpose + flatten, read by attention.output.dense), the first
    # LayerNorm's input, its output (read by intermediate.dense), the second LayerNorm's input
    recompute = cfg.hidden_act in APPROXIMATE and cfg.attn_impl != "eager"  # model/ffn.py gelu_linear
    elems += (1 if recompute else 2) * n * f  # [B, L, FFN]: the GELU input, and eager also keeps its output
    elems += square  # the softmax probabilities (FusedAttention keeps only these of the [B, L, L] matrices)
    w = 2 * seq_len - 1 if _band(dtype, seq_len, p) else p  # table rows: per relative offset (BandBias) or bucket
    elems += terms * w * h  # per position term, the scaled [H, w, D] table, kept by attention.py `_per_head`'s bmm
    # with q (or k) folded to [H, B*L, D], a view of its projection (counted above)
    if terms and hidden_drop:
        elems += p * h  # the dropped-out relative rows [P, h] (read by key_proj / query_proj); without dropout
        # that is a slice of the shared table, counted once in _shared_bytes
    mask = (square if attn_drop else 0) + ((2 * n * h + (p * h if terms else 0)) if hidden_drop else 0)  # 1-byte
    # dropout masks: attention probabilities, both sublayer outputs, the relative rows
    stats = 2 * 2 * n * LN_STAT_BYTES  # two LayerNorms x (mean, 1/std) per token
    return elems * s + mask + stats


def _band(dtype: str, seq_len: int, rows: int) -> bool:
    """attention.py `band_layout` on a CPU: bf16 tables up to 2L-1 <= 2P+1 take the BandBias layout, else RelBias."""
    return dtype_bytes(dtype) == 2 and 2 * seq_len - 1 <= 2 * rows + 1


def _shared_bytes(cfg: EncoderConfig, seq_len: int, dtype: str, checkpointing: bool) -> int:
    """Saved once per forward whatever the depth: the offset indices and the layer-normed relative table."""
    if not cfg.relative_attention:
        return 0
    s, rows, h = dtype_bytes(dtype), 2 * cfg.att_span, cfg.hidden_size
    out = rows * 2 * LN_STAT_BYTES  # the relative table's LayerNorm statistics
    terms = any(t in cfg.pos_att_type for t in ("c2p", "p2c"))
    if checkpointing or (terms and cfg.hidden_dropout_prob == 0):
        out += rows * h * s  # the normed table itself: a checkpoint input, or sliced straight into the layers
    if terms and not checkpointing:
        if _band(dtype, seq_len, rel_rows(cfg, seq_len)):
            out += 2 * (2 * seq_len - 1) * INDEX_BYTES  # the [2L-1] offset -> row index and its reverse
        else:
            out += seq_len * seq_len * INDEX_BYTES  # RelBias keeps the index (checkpointing rebuilds it in backward)
    return out


def _embedding_bytes(cfg: EncoderConfig, batch: int, seq_len: int, dtype: str) -> int:
    """The embeddings module: token ids, the LayerNorm input (+ embed_proj's input), its statistics, dropout mask."""
    s, n, h = dtype_bytes(dtype), batch * seq_len, cfg.hidden_size
    out = n * INDEX_BYTES + n * h * s + n * 2 * LN_STAT_BYTES
    if cfg.emb_size != h:
        out += n * cfg.emb_size * s  # embed_proj reads the narrower embedding
    return out + (n * h if cfg.hidden_dropout_prob > 0 else 0)


def _head_bytes(cfg: EncoderConfig, batch: int, seq_len: int, dtype: str, head: str) -> int:
    s, n, h, e = dtype_bytes(dtype), batch * seq_len, cfg.hidden_size, cfg.emb_size
    if head == "mlm":
        m = round(MLM_FRACTION * n)  # masked positions
        # the selected hidden states [m, h], the GELU input, LayerNorm input and output [m, e] (+ its statistics),
        # log-softmax's fp32 output [m, V] (cross-entropy on .float() logits), the selected and target indices
        return m * (h + 3 * e) * s + m * 2 * LN_STAT_BYTES + m * cfg.vocab_size * 4 + 2 * m * INDEX_BYTES
    if head == "rtd":
        # the last hidden state, the GELU input, LayerNorm input and output [n, h] (+ statistics); the fp32
        # logits, labels and weights of the binary cross-entropy
        return 4 * n * h * s + n * 2 * LN_STAT_BYTES + 3 * n * 4
    if head != "none":
        raise VegaError(f"head={head!r}: expected one of {', '.join(HEADS)}")
    return 0


def saved_activation_bytes(cfg: EncoderConfig, batch: int, seq_len: int, dtype: str = "bf16",
                           checkpointing: bool = False, head: str = "none") -> int:
    """Bytes autograd holds for backward at the end of one training forward (what saved_tensors_hooks sees).

    With checkpointing (encoder.py: torch.utils.checkpoint per layer) a layer keeps only its input [B, L, h]."""
    if batch < 1 or seq_len < 1:
        raise VegaError(f"batch={batch}, seq_len={seq_len}: both must be at least 1")
    s, n = dtype_bytes(dtype), batch * seq_len
    per_layer = n * cfg.hidden_size * s if checkpointing else layer_activation_bytes(cfg, batch, seq_len, dtype)
    return (cfg.num_hidden_layers * per_layer + _shared_bytes(cfg, seq_len, dtype, checkpointing)
            + _embedding_bytes(cfg, batch, seq_len, dtype) + _head_bytes(cfg, batch, seq_len, dtype, head))


# ---- the estimate --------------------------------------------------------------------------------
def estimate_memory(cfg: EncoderConfig, world_size: int, batch: int, seq_len: int, dtype: str = "bf16",
                    activation_checkpointing: bool = False, head: str = "none") -> dict:
    """Bytes per process (rank 0, the largest share) for AdamW training under `shard_model`.

    batch x seq_len is the local micro-batch of one process; dtype the compute dtype (train.mixed_precision: bf16
    gathers bf16 weights; the sharded master weights, gradients and AdamW moments stay fp32 either way)."""
    _check_world(world_size)
    s = dtype_bytes(dtype)
    units = unit_shapes(cfg, head)
    local = local_elements(cfg, world_size, 0, head)
    act = {ck: saved_activation_bytes(cfg, batch, seq_len, dtype, ck, head) for ck in (False, True)}
    act[True] += layer_activation_bytes(cfg, batch, seq_len, dtype)  # backward recomputes one layer at a time
    full = [sum(math.prod(x) for x in unit) for unit in units]
    # FSDP2 keeps the root unit (embeddings, head) gathered from forward to backward, and gathers one layer at a
    # time; a single process in fp32 uses its parameters directly and gathers nothing
    gathered = 0 if world_size == 1 and s == 4 else (full[0] + max(full[1:], default=0)) * s
    out = {
        "world_size": world_size,
        "param_elements": local,  # this rank's share of sum(full)
        "total_elements": sum(full),
        "params_bytes": local * 4,  # fp32 master weights
        "grads_bytes": local * 4,  # fp32, reduce-scattered into the same shards
        "optimizer_bytes": 2 * local * 4,  # AdamW exp_avg + exp_avg_sq, fp32, shaped like the shards
        "activations_bytes": act[False],
        "activations_checkpointed_bytes": act[True],
        "gathered_bytes": gathered,
        "activation_checkpointing": activation_checkpointing,
    }
    out["total_bytes"] = (out["params_bytes"] + out["grads_bytes"] + out["optimizer_bytes"] + gathered
                          + act[activation_checkpointing])
    return out


def memory_table(est: dict) -> str:
    """`estimate_memory`'s result as the per-rank GiB table `vegalm model-info` prints."""
    gib = 1024**3
    act = "activations_checkpointed_bytes" if est["activation_checkpointing"] else "activations_bytes"
    rows = [
        ("parameters (fp32 shard)", est["params_bytes"]),
        ("gradients (fp32 shard)", est["grads_bytes"]),
        ("AdamW moments (fp32 shard)", est["optimizer_bytes"]),
        ("gathered weights", est["gathered_bytes"]),
        ("activations" + (" (checkpointed)" if est["activation_checkpointing"] else ""), est[act]),
    ]
    lines = [f"  memory per rank, world size {est['world_size']} ({est['param_elements'] / 1e6:,.1f}M of "
             f"{est['total_elements'] / 1e6:,.1f}M parameters on rank 0):"]
    lines += [f"    {name:<34}{b / gib:>9.2f} GiB" for name, b in rows]
    lines.append(f"    {'total':<34}{est['total_bytes'] / gib:>9.2f} GiB")
    other = "activations_bytes" if est["activation_checkpointing"] else "activations_checkpointed_bytes"
    lines.append(f"    (activations {'without' if est['activation_checkpointing'] else 'with'} checkpointing: "
                 f"{est[other] / gib:.2f} GiB)")
    return "\n".join(lines)


__all__ = [
    "estimate_memory",
    "memory_table",
    "local_elements",
    "shard_elements",
    "unit_shapes",
    "layer_shapes",
    "root_shapes",
    "layer_activation_bytes",
    "saved_activation_bytes",
    "rel_rows",
    "dtype_bytes",
]
