"""Disentangled self-attention (DeBERTa, He et al. 2021, eq. 2-4) with three interchangeable kernels.

score(i, j) = [ q_i·k_j  +  q_i·Pk[idx(i,j)]  +  k_j·Pq[idx(i,j)] ] / sqrt(d · (1 + #terms))
              content→content  content→position   position→content

where Pk, Pq are the (shared or separate) key/query projections of the relative
embeddings and idx(i, j) the bucketed relative index (model/relpos.py).

Kernels (`attn_impl`):
- eager: the formula above with full [B,H,L,L] tensors for every term, then
  masked softmax, dropout and @V. The reference every fast path is tested against.
- fused (CPU default): c2p and p2c go straight into ONE additive bias [B,H,L,L]
  (the 1/sqrt scale is folded into the small position tables, and only the
  P <= 2L-1 relative rows a length can reach are projected). fp32 gathers the
  [B,H,L,P] products (RelBias); bf16 lays the tables out by relative offset and
  reads a [B,H,L,2L-1] product through a strided view (BandBias), see `_bias`. A
  hand-written autograd function then does scores -> softmax -> dropout -> @V and
  keeps only the probabilities (plus a 1-byte dropout keep mask) for backward; the
  reference path keeps ~5 [B,H,L,L] tensors per layer. Without grad it calls SDPA.
  Dropout uses model/dropout.py's cheap random bits (the drop rate is p rounded to a
  multiple of 1/65536: 0.1 -> 0.100006) and applies 1/(1-p) to the [B,H,L,D] output.
- sdpa (CUDA default): the same single bias handed to
  `F.scaled_dot_product_attention`, whose memory-efficient CUDA kernel supports an
  additive bias with gradient and dropout. (On CPU, SDPA falls back to its math
  path whenever the bias needs a gradient, which is why CPU uses `fused`.)
- flex: FlexAttention with a `score_mod` that reads the [B,H,L,P] c2p/p2c
  tables, so no [B,H,L,L] tensor is built at all. CUDA only for training (CPU
  FlexAttention has no backward); no attention dropout, so with dropout active in
  training the module falls back to sdpa.

Padding follows the reference exactly: a (query, key) pair is valid when both
tokens are real. A padding query therefore sees all keys at the same score and
attends uniformly; its output is kept so hidden states match bit for bit in
spirit (within float tolerance) at every position.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from vegalm.model.config import EncoderConfig
from vegalm.model.dropout import FastDropout, keep_mask
from vegalm.model.relpos import diagonals

_flex_compiled = None


def _flex_attention():
    """FlexAttention, compiled on CUDA (eager flex is a slow reference implementation)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _flex_compiled


class DisentangledSelfAttention(nn.Module):
    """Q/K/V projections + disentangled scores. Parameter names follow the HF checkpoint layout."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h, n = cfg.hidden_size, cfg.num_attention_heads
        self.num_heads, self.head_dim = n, cfg.head_dim
        self.query_proj = nn.Linear(h, h)
        self.key_proj = nn.Linear(h, h)
        self.value_proj = nn.Linear(h, h)
        self.relative = cfg.relative_attention
        self.terms = tuple(t for t in ("c2p", "p2c") if t in cfg.pos_att_type) if self.relative else ()
        self.share_att_key = cfg.share_att_key
        if self.relative and not cfg.share_att_key:
            if "c2p" in self.terms:
                self.pos_key_proj = nn.Linear(h, h)
            if "p2c" in self.terms:
                self.pos_query_proj = nn.Linear(h, h)
        if self.relative:
            self.pos_dropout = FastDropout(cfg.hidden_dropout_prob)
        self.attn_dropout = cfg.attention_probs_dropout_prob
        # 1 + number of position terms: each term adds variance d to the score (paper, sec. 3.1).
        self.scale = 1.0 / math.sqrt(self.head_dim * (1 + len(self.terms)))
        self.impl = cfg.attn_impl

    # [..., L, H*D] -> [..., H, L, D]
    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def _pos_proj(self, rel: torch.Tensor, which: str) -> torch.Tensor:
        """Project relative embeddings [P, h] -> [H, P, D] with the key ('k') or query ('q') projection."""
        if which == "k":
            proj = self.key_proj if self.share_att_key else self.pos_key_proj
        else:
            proj = self.query_proj if self.share_att_key else self.pos_query_proj
        return self._heads(proj(rel))

    def forward(
        self,
        x: torch.Tensor,
        pad: torch.Tensor | None,
        rel_emb: torch.Tensor | None,
        rel: "RelContext | None",
        packing=None,
    ) -> torch.Tensor:
        """x: [B, L, h], or the packed real tokens [T, h] with `packing` (model/unpad.py); returns the same layout.
        Packed, attention runs per length group (Packing.attend), each group with its own length's positions."""
        proj = [p(x) for p in (self.query_proj, self.key_proj, self.value_proj)]
        impl = self.impl
        if impl == "auto":
            impl = "sdpa" if x.is_cuda else "fused"
        if impl == "flex" and self.training and self.attn_dropout > 0:
            warnings.warn("attn_impl='flex' has no attention dropout: training with attention_probs_dropout_prob="
                          f"{self.attn_dropout} runs the sdpa kernel instead (set it to 0 to train with flex)",
                          stacklevel=2)  # the default filter shows it once per call site
            impl = "sdpa"
        if packing is not None:  # attention is the one op that needs each sequence's tokens side by side
            def group(q, k, v, real):  # [b, H, n, D] each, real [b, n]
                return self._kernel(impl, q, k, v, real, rel_emb, rel.resized(q.shape[2]) if rel else None)

            out = packing.attend(*(t.unflatten(-1, (self.num_heads, self.head_dim)) for t in proj), group)
            return out.flatten(-2)  # [T, H*D]
        q, k, v = (self._heads(t) for t in proj)
        out = self._kernel(impl, q, k, v, pad, rel_emb, rel)
        return out.transpose(-3, -2).flatten(-2)  # [B, L, H*D]

    def _kernel(self, impl, q, k, v, pad, rel_emb, rel):
        if impl == "eager":
            return self._eager(q, k, v, pad, rel_emb, rel)
        if impl == "flex":
            return self._flex(q, k, v, pad, rel_emb, rel)
        return self._biased(q, k, v, pad, rel_emb, rel, fused=impl == "fused")

    # ---- reference --------------------------------------------------------------------------
    def _eager(self, q, k, v, pad, rel_emb, rel):
        scores = q @ k.transpose(-1, -2) * self.scale
        if self.terms:
            full = self.pos_dropout(rel_emb)  # all 2k rows, no trimming
            idx = (rel.idx + rel.lo).expand(q.shape[0], q.shape[1], -1, -1)  # untrimmed rows
            if "c2p" in self.terms:
                c2p = q @ self._pos_proj(full, "k").transpose(-1, -2)  # [B,H,L,2k]
                scores = scores + torch.gather(c2p, -1, idx) * self.scale
            if "p2c" in self.terms:
                p2c = k @ self._pos_proj(full, "q").transpose(-1, -2)  # [B,H,L(key),2k]
                scores = scores + torch.gather(p2c, -1, idx.transpose(-1, -2)).transpose(-1, -2) * self.scale
        if pad is not None:
            valid = pad[:, None, :, None] & pad[:, None, None, :]
            scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
        probs = F.dropout(scores.softmax(-1), self.attn_dropout, self.training)
        return probs @ v

    # ---- fused bias + SDPA ------------------------------------------------------------------------
    def _bias(self, q, k, rel_emb, rel) -> torch.Tensor | None:
        """c2p + p2c as one [B,H,L,L] tensor, already scaled. On a CPU in bf16/fp16 (q's dtype under autocast)
        the index, which depends on i - j only, lays each table out by relative offset: a [B,H,L,2L-1] product
        read through a strided view (BandBias), no gather and no scatter-add. Otherwise (fp32, CUDA, long
        sequences: `band_layout`) the tables keep their P <= 2L-1 bucket rows and are gathered (RelBias):
        2L-1 > P doubles the product's FLOPs at S512, which costs more than the gather in fp32 and less in bf16
        (`bench/probes/band_vs_gather.py`, BENCHMARKS.md)."""
        if not self.terms:
            return None
        used = self.pos_dropout(rel_emb[rel.lo : rel.hi + 1])  # [P, h], P <= 2L-1
        band = band_layout(q.dtype, q.device, q.shape[-2], rel.hi - rel.lo + 1)
        c2p = p2c = None
        if "c2p" in self.terms:  # scale the small [H,P,D] table, not the [B,H,L,L] result
            table = self._pos_proj(used, "k") * self.scale
            if band:
                table = table.index_select(-2, rel.diag_rev)  # row m: relative offset j - i = m - (L-1)
            c2p = _per_head(q, table)  # [B,H,L,P] or, band, [B,H,L,2L-1]
        if "p2c" in self.terms:
            table = self._pos_proj(used, "q") * self.scale
            if band:
                table = table.index_select(-2, rel.diag)  # row m: i - j = m - (L-1)
            p2c = _per_head(k, table)  # [B,H,L(key),P] or [B,H,L(key),2L-1]
        return BandBias.apply(c2p, p2c) if band else RelBias.apply(c2p, p2c, rel.idx)

    def _biased(self, q, k, v, pad, rel_emb, rel, fused: bool):
        bias = self._bias(q, k, rel_emb, rel)
        if pad is not None:
            # Padding queries: the reference masks their whole row, so they attend uniformly and
            # get no gradient through their scores. Here their row is set to 0 (not to `min`: a row
            # of `min` breaks the log-sum-exp that SDPA's flash backward recomputes) and their
            # query vector to 0, which gives the same uniform attention and the same zero gradient.
            q = q * pad[:, None, :, None].to(q.dtype)
            if bias is None:
                bias = torch.zeros((q.shape[0], 1, q.shape[2], q.shape[2]), dtype=q.dtype, device=q.device)
            else:
                bias = bias.masked_fill_(~pad[:, None, :, None], 0.0)
            real_query_pad_key = pad[:, None, :, None] & ~pad[:, None, None, :]  # [B,1,L,L]
            bias = bias.masked_fill_(real_query_pad_key, torch.finfo(bias.dtype).min)
        if bias is not None and bias.dtype != q.dtype:  # autocast may leave q in bf16 and bias in fp32
            bias = bias.to(q.dtype)
        p = self.attn_dropout if self.training else 0.0
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, bias)
        )
        if fused and needs_grad:
            return FusedAttention.apply(q, k, v, bias, self.scale, p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=self.scale)

    # ---- FlexAttention ---------------------------------------------------------------------------
    def _flex(self, q, k, v, pad, rel_emb, rel):
        B, H, L, _ = q.shape
        terms = self.terms
        if terms:
            used = self.pos_dropout(rel_emb[rel.lo : rel.hi + 1])
            zeros = torch.zeros(B, H, L, 1, dtype=q.dtype, device=q.device)
            c2p = q @ (self._pos_proj(used, "k") * self.scale).transpose(-1, -2) if "c2p" in terms else zeros
            p2c = k @ (self._pos_proj(used, "q") * self.scale).transpose(-1, -2) if "p2c" in terms else zeros
            idx = rel.idx
        minval = torch.finfo(q.dtype).min
        has_c2p, has_p2c = "c2p" in terms, "p2c" in terms

        def score_mod(score, b, h, qi, kj):
            if terms:
                r = idx[qi, kj]
                if has_c2p:
                    score = score + c2p[b, h, qi, r]
                if has_p2c:
                    score = score + p2c[b, h, kj, r]
            if pad is not None:
                # A real query gives padding keys `min`. A padding query gets 0 for every key, i.e. the
                # uniform row of the reference (and no gradient through its scores): a row of `min`
                # overflows to -inf in the CUDA kernel's log2 domain, which returns 0 for such rows.
                score = torch.where(pad[b, qi], torch.where(pad[b, kj], score, minval), 0.0)
            return score

        return _flex_attention()(q, k, v, score_mod=score_mod, scale=self.scale)


def _per_head(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [B,H,L,D] @ table[h]^T for each head: [B,H,L,W], as H matmuls of [B*L, D] x [D, W]. Broadcasting
    `x @ table.transpose(-1, -2)` instead copies the table B times and x once into [B*H, ...] layouts and keeps
    both copies for backward (2 x 4 MB per term and layer at B8 x S512, h 256); here x [B,H,L,D], a transposed
    view of the [B, L, H*D] projection, folds into [H, B*L, D] as a view, and the result is a [B,H,L,W] view of
    [H, B, L, W]."""
    B, H, L, D = x.shape
    out = torch.bmm(x.transpose(0, 1).reshape(H, B * L, D), table.transpose(-1, -2))
    return out.view(H, B, L, -1).transpose(0, 1)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with contiguous rows in its last two dims (what `_band` reads); the outer two may be in any order."""
    W = t.shape[-1]
    return t if t.stride(-1) == 1 and t.stride(-2) == W else t.contiguous()


def _layout(t: torch.Tensor | None) -> tuple | None:
    """(shape, strides) for a gradient buffer like t: t's own strides when t is dense (a permutation of a
    contiguous layout, as `_per_head` returns), contiguous ones otherwise (an expanded t must not alias)."""
    return None if t is None else (t.shape, torch.empty_like(t, device="meta").stride())


def _empty(layout: tuple, like: torch.Tensor) -> torch.Tensor:
    """A gradient buffer laid out as its forward input was (`_per_head`'s [B,H,L,W] view of [H,B,L,W]), so that
    the bmm's backward reads it as [H, B*L, W] without a copy."""
    shape, stride = layout
    return torch.empty_strided(shape, stride, dtype=like.dtype, device=like.device)


def _zeros(layout: tuple, like: torch.Tensor) -> torch.Tensor:
    return _empty(layout, like).zero_()


def _band_grad(layout: tuple, g: torch.Tensor) -> torch.Tensor:
    """The [B,H,L,2L-1] table gradient of a BandBias input: g [B,H,L,L] through `_band`, zeros elsewhere. Only the
    cells off the band are zeroed (L(L-1) per head, not L(2L-1)): between the band's row a (ending at column
    2L-2-a) and row a+1 (starting at L-2-a) lie L-2 cells in memory, at a stride of 2L-2, plus L-1 cells at the
    start of row 0 and at the end of row L-1."""
    table = _empty(layout, g)
    B, H, L, W = table.shape
    if L < 2:  # one cell, on the band
        return table.copy_(g)
    s0, s1, off = table.stride(0), table.stride(1), table.storage_offset()
    for shape, stride, start in (((B, H, L - 1), (s0, s1, 1), 0),  # row 0, columns [0, L-1)
                                 ((B, H, L - 1, L - 2), (s0, s1, W - 1, 1), 2 * L - 1),  # between rows a, a+1
                                 ((B, H, L - 1), (s0, s1, 1), (L - 1) * W + L)):  # row L-1, columns [L, 2L-1)
        table.as_strided(shape, stride, off + start).zero_()
    _band(table).copy_(g)
    return table


def band_layout(dtype: torch.dtype, device: torch.device, length: int, rows: int) -> bool:
    """Whether `_bias` lays its tables out by relative offset (BandBias) rather than gathering its `rows` bucket
    rows (RelBias): on a CPU in bf16/fp16, where it was measured faster, and only while the 2L-1 offsets are at
    most about twice the rows: S512 with 256 buckets uses 511 rows for 1023 offsets (2L-1 <= 2P+1; the rule read
    2L-1 <= 2P until 2026-12-07, which sent S512 to the gather by one row); S1024 would be 4x the product."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and 2 * length - 1 <= 2 * rows + 1


def _band(t: torch.Tensor) -> torch.Tensor:
    """[B,H,L,2L-1] -> the [B,H,L,L] view out[..., a, c] = t[..., a, c - a + L - 1] (no copy): row a of the view
    starts one element earlier in each next row of t, so its row stride is 2L-2."""
    B, H, L, W = t.shape
    s = t.stride()
    assert W == 2 * L - 1 and s[3] == 1 and s[2] == W, (t.shape, s)
    return t.as_strided((B, H, L, L), (s[0], s[1], W - 1, 1), t.storage_offset() + L - 1)


class BandBias(torch.autograd.Function):
    """bias[b,h,i,j] = c2p[b,h,i,j-i+L-1] + p2c[b,h,j,i-j+L-1], from [B,H,L,2L-1] tables ordered by offset.

    The values RelBias gathers, read through strided views; backward writes the gradient into a zeroed
    table through the same views (each (i, j) has its own table cell). Keeps nothing for backward but shapes.
    """

    @staticmethod
    def forward(ctx, c2p, p2c):
        # p2c's term is read transposed: copy it first (a tiled transposing copy), then add c2p's rows, which
        # are contiguous; adding the transposed view instead reads it column by column (bf16 [8,4,512,512] on
        # one thread: 11-19 ms this way, 25-52 ms that way)
        bias = None
        if p2c is not None:
            bias = _band(_rows(p2c)).transpose(-1, -2).contiguous()
        if c2p is not None:
            t = _band(_rows(c2p))
            bias = t.contiguous() if bias is None else bias.add_(t)
        ctx.layouts = (_layout(c2p), _layout(p2c))
        return bias

    @staticmethod
    def backward(ctx, grad):
        out = []
        for layout, g in ((ctx.layouts[0], grad), (ctx.layouts[1], grad.transpose(-1, -2))):
            if layout is None:
                out.append(None)
                continue
            out.append(_band_grad(layout, g))
        return out[0], out[1]


class RelBias(torch.autograd.Function):
    """bias[b,h,i,j] = c2p[b,h,i,idx[i,j]] + p2c[b,h,j,idx[i,j]]: both gathers and the add in one step.

    Same math as two `torch.gather` calls, but autograd's gather keeps its whole [B,H,L,P]
    input alive for backward; only the index and the shapes are needed, which saves two
    [B,H,L,L]-sized tensors per layer.
    """

    @staticmethod
    def forward(ctx, c2p, p2c, idx):
        ref = c2p if c2p is not None else p2c
        B, H, L, _ = ref.shape
        full = idx.expand(B, H, L, L)
        bias = None
        if c2p is not None:
            bias = torch.gather(c2p, -1, full)
        if p2c is not None:
            t = torch.gather(p2c, -1, full.transpose(-1, -2)).transpose(-1, -2)
            bias = t.contiguous() if bias is None else bias.add_(t)
        ctx.save_for_backward(idx)
        ctx.layouts = (_layout(c2p), _layout(p2c))
        return bias

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        B, H, L, _ = grad.shape
        full = idx.expand(B, H, L, L)
        out = []
        for layout, g, index in (
            (ctx.layouts[0], grad, full),
            (ctx.layouts[1], grad.transpose(-1, -2), full.transpose(-1, -2)),
        ):
            out.append(None if layout is None else _zeros(layout, grad).scatter_add_(-1, index, g))
        return out[0], out[1], None


def _softmax(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim in s's dtype: for bf16/fp16 the kernel accumulates in fp32 and rounds once, so the
    values are an fp32 softmax's cast back, or for a few per 100,000 one unit in the last place away
    (tests/test_model_misc.py), without that path's [B,H,L,L] fp32 copy (8.6x slower for bf16 [8,4,512,512] on
    one CPU thread: 82 vs 9.5 ms). Those last-bit differences change a bf16 run's numbers against earlier code."""
    return torch.softmax(s, -1)


def _acc_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


class FusedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) -> dropout -> @ v, saving only P (+ a 1-byte keep mask) for backward.

    Backward (per row i):  dP = dropout(dO v^T);  dS = P * (dP - dO_i . O_i);
    dq = dS k * scale;  dk = dS^T q * scale;  dbias = dS.
    Works in the dtype of q (bf16 under autocast); the softmax accumulates in fp32.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float, p: float):
        with torch.autocast(q.device.type, enabled=False):
            dt = q.dtype
            k, v = k.to(dt), v.to(dt)
            s = torch.matmul(q, k.transpose(-1, -2))
            if bias is not None:
                s = torch.add(bias.to(dt), s, alpha=scale)
            else:
                s = s.mul_(scale)
            probs = _softmax(s)
            del s
            keep = None
            if p > 0:
                # Dropout's 1/(1-p) is applied to the [B,H,L,D] output, not to the [B,H,L,L] matrix.
                keep = keep_mask(probs.shape, p, probs.device)
                out = torch.matmul(probs * keep, v).mul_(1.0 / (1.0 - p))
            else:
                out = torch.matmul(probs, v)
        ctx.save_for_backward(q, k, v, probs, keep, out)
        ctx.scale, ctx.p, ctx.has_bias, ctx.bias_dtype = scale, p, bias is not None, (
            bias.dtype if bias is not None else None
        )
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, probs, keep, out = ctx.saved_tensors
        scale, p = ctx.scale, ctx.p
        with torch.autocast(q.device.type, enabled=False):
            d_out = d_out.to(q.dtype)
            # sum_j P_ij dP_ij = dO_i . O_i (dropout included): a [B,H,L,D] product instead of [B,H,L,L].
            row = (d_out * out).sum(-1, keepdim=True, dtype=_acc_dtype(d_out.dtype)).to(d_out.dtype)
            if keep is not None:
                d_out = d_out * (1.0 / (1.0 - p))  # the dropout scale, on the small tensor
                keep = keep.to(probs.dtype)  # once for both uses (a multiply converts a uint8 operand each time)
                dv = torch.matmul((probs * keep).transpose(-1, -2), d_out)
                dp = torch.matmul(d_out, v.transpose(-1, -2)).mul_(keep)
            else:
                dv = torch.matmul(probs.transpose(-1, -2), d_out)
                dp = torch.matmul(d_out, v.transpose(-1, -2))
            ds = dp.sub_(row).mul_(probs)  # gradient of the pre-softmax scores
            dq = torch.matmul(ds, k).mul_(scale)
            dk = torch.matmul(ds.transpose(-1, -2), q).mul_(scale)
        dbias = ds.to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dq, dk, dv, dbias, None, None


class RelContext:
    """Relative index tensors shared by all layers of one forward pass."""

    __slots__ = ("idx", "lo", "hi", "diag", "diag_rev", "cache")

    def __init__(self, idx: torch.Tensor, lo: int, hi: int, diag: torch.Tensor | None = None,
                 diag_rev: torch.Tensor | None = None, cache=None):
        self.idx, self.lo, self.hi = idx, lo, hi  # idx is offset so that row lo of the table is 0
        self.diag = diag if diag is not None else diagonals(idx)  # [2L-1]: idx[i, j] at i - j + L - 1
        self.diag_rev = diag_rev if diag_rev is not None else self.diag.flip(0)  # ... at j - i + L - 1
        self.cache = cache  # relpos.RelIndexCache, for the shorter lengths of packed attention groups

    def resized(self, length: int) -> RelContext:
        """The context of another sequence length (an attention group of a packed batch)."""
        if length == self.idx.shape[0]:
            return self
        return RelContext(*self.cache.get(length, self.idx.device), cache=self.cache)
