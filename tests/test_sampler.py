"""Order strategies of the resumable sampler: length grouping and length-sorted micro-batches (CPU, fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vegalm.errors import VegaError
from vegalm.train.sampler import (Layout, ResumableBatchSampler, length_grouped_permutation, length_grouping,
                                  sort_within_batches, sorted_micro_batches)


def _lengths(n: int, seed: int, hi: int = 200) -> list[int]:
    return torch.randint(5, hi, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_length_grouping_is_deterministic_and_resumable():
    lengths = _lengths(203, 0)

    def make():
        return ResumableBatchSampler(203, global_batch=8, seed=3, orders=[length_grouping(lengths, chunk=4)])

    s = make()
    p0 = s.permutation(0)
    assert sorted(p0.tolist()) == list(range(203))
    assert torch.equal(p0, make().permutation(0)) and not torch.equal(p0, s.permutation(1))
    spread = lambda perm: np.mean([np.ptp([lengths[i] for i in perm[k:k + 8]]) for k in range(0, 200, 8)])  # noqa: E731
    plain = ResumableBatchSampler(203, global_batch=8, seed=3).permutation(0).tolist()
    assert spread(p0.tolist()) < 0.5 * spread(plain)
    it = iter(s)
    first = [next(it) for _ in range(30)]  # crosses into epoch 1
    s.advance(5)
    resumed = make()
    resumed.load_state_dict(s.state_dict())
    assert next(iter(resumed)) == first[5]  # the resumed sampler continues with the 6th batch


def test_sort_within_batches_keeps_each_batch():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 90, (70,), generator=g).tolist()
    base = torch.randperm(70, generator=g)
    out = sort_within_batches(base, lengths, 16).tolist()
    for k in range(0, 64, 16):  # 4 whole batches: same examples, longest first
        assert sorted(out[k:k + 16]) == sorted(base[k:k + 16].tolist())
        assert [lengths[i] for i in out[k:k + 16]] == sorted((lengths[i] for i in out[k:k + 16]), reverse=True)
    assert out[64:] == base[64:].tolist()  # the dropped tail is untouched


def test_orders_apply_in_list_order_after_the_seeded_shuffle():
    lengths = _lengths(100, 2, hi=30)  # many ties: their order must follow the incoming permutation
    s = ResumableBatchSampler(100, 16, grad_accum=4, seed=5,
                              orders=[length_grouping(lengths, chunk=2), sorted_micro_batches(lengths)])
    base = ResumableBatchSampler(100, 16, grad_accum=4, seed=5).permutation(1)
    want = sort_within_batches(length_grouped_permutation(base, lengths, 16, 5 * 1_000_003 + 1, 2), lengths, 16)
    assert torch.equal(s.permutation(1), want)
    assert sum(s.local_micro_batches(1, 16), []) == want[16:32].tolist()
    seen = []
    ResumableBatchSampler(100, 16, seed=5, orders=[lambda p, e, lay: seen.append((e, lay)) or p]).permutation(2)
    assert seen == [(2, Layout(num_samples=100, global_batch=16, seed=5))]


def test_order_refuses_lengths_of_another_dataset():
    for order, what in ((length_grouping([5] * 99), "length grouping"), (sorted_micro_batches([5] * 99), "sorted")):
        with pytest.raises(VegaError, match=f"{what}.*99 lengths for 100 examples"):
            ResumableBatchSampler(100, 10, orders=[order]).permutation(0)
