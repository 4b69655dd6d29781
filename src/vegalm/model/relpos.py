"""Relative positions for disentangled attention, with DeBERTa's log buckets.

For query i and key j the relative distance is d = i - j. With `position_buckets`
= 2m (256 in DeBERTa-v3, so m = 128), distances with |d| <= m keep their exact
value, and longer ones are squeezed logarithmically so that |d| = max_rel - 1
lands on bucket 2m - 1... (m + (m-1) = 255):

    bucket(d) = sign(d) * (m + ceil(log(|d| / m) / log((max_rel - 1) / m) * (m - 1)))   for |d| > m

The attention then looks up relative embedding `clamp(bucket(d) + k, 0, 2k - 1)`
where k = att_span (the bucket count, or max_rel without buckets).

Both the c2p and the p2c term read the same index matrix: p2c uses bucket(j - i)
negated, and bucket is odd (bucket(-d) = -bucket(d)), so it is idx[i, j] again.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


def log_bucket(rel: torch.Tensor, buckets: int, max_rel: int) -> torch.Tensor:
    """Map integer distances to log buckets. float32 math, exactly as the reference implementation does it."""
    mid = buckets // 2
    sign = torch.sign(rel)
    # Inside (-mid, mid) the value is unused; mid - 1 keeps the log finite.
    a = torch.where(rel.abs() < mid, torch.full_like(rel, mid - 1), rel.abs())
    denom = torch.log(torch.tensor((max_rel - 1) / mid, dtype=torch.float32))
    logd = torch.ceil(torch.log(a / mid) / denom * (mid - 1)) + mid
    return torch.where(a <= mid, rel.to(logd.dtype), logd * sign).long()


def rel_index(length: int, att_span: int, buckets: int, max_rel: int, device=None) -> torch.Tensor:
    """idx[i, j] = clamp(bucket(i - j) + att_span, 0, 2 * att_span - 1), shape [L, L], int64."""
    pos = torch.arange(length, device=device)
    rel = pos[:, None] - pos[None, :]
    if buckets > 0 and max_rel > 0:
        rel = log_bucket(rel, buckets, max_rel)
    return (rel + att_span).clamp_(0, 2 * att_span - 1)


def diagonals(idx: torch.Tensor) -> torch.Tensor:
    """idx[i, j] depends on i - j only (a Toeplitz matrix): its 2L-1 values t, with t[m] = idx[i, j] where
    m = i - j + L - 1. Read off the first row (m = L-1 .. 0, reversed) and the first column (m = L .. 2L-2)."""
    return torch.cat([idx[0].flip(0), idx[1:, 0]])


class RelIndexCache:
    """Per-length cache of the index matrix, trimmed to the embedding rows a length actually uses.

    For L = 128 with 256 buckets only rows 129..383 of the 512 relative embeddings can be
    addressed, so projecting all 512 would waste 2x the c2p/p2c matmul work and memory.
    Returns (idx - lo, lo, hi, diag, diag reversed) with diag = diagonals(idx - lo): rows lo..hi inclusive are
    the ones to project.
    """

    # Dynamic padding produces many lengths; an [L, L] int64 index is 2 MB at L=512, so keep a few.
    MAX_ENTRIES = 16

    def __init__(self, att_span: int, buckets: int, max_rel: int):
        self.att_span, self.buckets, self.max_rel = att_span, buckets, max_rel
        self._cache: OrderedDict[tuple[int, torch.device], tuple[torch.Tensor, int, int]] = OrderedDict()

    def get(self, length: int, device: torch.device) -> tuple:
        key = (length, device)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            idx = rel_index(length, self.att_span, self.buckets, self.max_rel, device=device)
            lo, hi = int(idx.min()), int(idx.max())
            idx = idx - lo
            diag = diagonals(idx)
            self._cache[key] = (idx, lo, hi, diag, diag.flip(0))
            if len(self._cache) > self.MAX_ENTRIES:
                self._cache.popitem(last=False)
        return self._cache[key]

