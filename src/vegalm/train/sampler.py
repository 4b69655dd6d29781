"""Deterministic, resumable batch sampler shared by pretraining and fine-tuning.

Every epoch is a seeded permutation of the dataset (`torch.randperm` with seed `seed + epoch`).
One optimizer step consumes one GLOBAL batch: the next `global_batch` entries of that
permutation. The global batch is cut into `grad_accum` micro-batches (contiguous slices), and
process `r` of `W` takes the `r`-th contiguous share of each micro-batch. So the samples seen
in a step depend only on (seed, epoch, position, global_batch), never on the number of
processes: 1 process with batch 32 and 4 processes with global batch 32 train on the same
32 examples per step.

The last incomplete global batch of an epoch is dropped (every step has exactly the same
number of examples, which keeps gradient averaging and multi-process equivalence exact).

Order strategies (`orders=[length_grouping(lengths), sorted_micro_batches(lengths)]`) reorder each
epoch's seeded permutation, in list order. Each is a pure function of (permutation, epoch, Layout), so the order
stays a function of (seed, epoch) and a resume continues it exactly. What they gain: docs/finetuning.md.

The sampler has two cursors. `__iter__` is an endless producer that starts at the state it
had when the iterator was created; `state_dict()` is the CONSUMED position, advanced by the
trainer calling `advance()` after each optimizer step. DataLoader workers may prefetch ahead,
but a checkpoint always records the consumed position, so a resume never skips or repeats data.

    sampler = ResumableBatchSampler(len(ds), global_batch=32, grad_accum=2, rank=0, world_size=2, seed=1)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    it = iter(loader)
    for step in range(steps):
        micro_batches = [next(it) for _ in range(2)]   # 8 examples each on this process
        ...
        sampler.advance()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from vegalm.errors import VegaError

GROUP_CHUNK = 50  # global batches per length-sorted chunk (transformers' LengthGroupedSampler uses up to 50)


@dataclass(frozen=True)
class Layout:
    """What an order strategy may know of its sampler (fixed for the run)."""

    num_samples: int
    global_batch: int
    seed: int


Order = Callable[[torch.Tensor, int, Layout], torch.Tensor]  # (permutation, epoch, layout) -> permutation


class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this process's micro-batches (lists of dataset indices) forever, across epochs."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        orders: Sequence[Order] = (),
    ):
        if global_batch % (grad_accum * world_size) != 0:
            raise VegaError(
                f"train.batch_size={global_batch} must be divisible by grad_accum ({grad_accum}) "
                f"x number of processes ({world_size})"
            )
        if num_samples < global_batch:
            raise VegaError(
                f"the training set has {num_samples} examples, fewer than one global batch "
                f"(train.batch_size={global_batch})"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.orders = tuple(orders)  # applied in order to each epoch's seeded permutation
        self.layout = Layout(num_samples, global_batch, seed)
        self.micro_batch = global_batch // grad_accum  # examples per micro-batch, all processes
        self.local_batch = self.micro_batch // world_size  # examples per micro-batch, this process
        self.epoch = 0
        self.position = 0  # consumed examples of the current epoch's permutation

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch  # incomplete last global batch dropped

    def permutation(self, epoch: int) -> torch.Tensor:
        """Epoch `epoch`'s order of the dataset: the seeded shuffle, then each order strategy."""
        if not self.shuffle:
            perm = torch.arange(self.num_samples)
        else:
            perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        for order in self.orders:
            perm = order(perm, epoch, self.layout)
        return perm

    def global_indices(self, epoch: int, position: int) -> list[int]:
        """The global batch that starts at `position` of epoch `epoch` (all processes, all micro-batches)."""
        return self.permutation(epoch)[position : position + self.global_batch].tolist()

    def local_micro_batches(self, epoch: int, position: int) -> list[list[int]]:
        """This process's `grad_accum` micro-batches for the step at (epoch, position)."""
        batch = self.global_indices(epoch, position)
        out = []
        for k in range(self.grad_accum):
            micro = batch[k * self.micro_batch : (k + 1) * self.micro_batch]
            out.append(micro[self.rank * self.local_batch : (self.rank + 1) * self.local_batch])
        return out

    def __iter__(self) -> Iterator[list[int]]:
        epoch, position = self.epoch, self.position
        while True:
            perm = self.permutation(epoch).tolist()
            while position + self.global_batch <= self.num_samples:
                batch = perm[position : position + self.global_batch]
                for k in range(self.grad_accum):
                    micro = batch[k * self.micro_batch : (k + 1) * self.micro_batch]
                    yield micro[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
                position += self.global_batch
            epoch, position = epoch + 1, 0

    def __len__(self) -> int:
        """Micro-batches per epoch on this process (the iterator itself never ends)."""
        return self.steps_per_epoch * self.grad_accum

    def advance(self, steps: int = 1) -> None:
        """Mark `steps` global batches as consumed (called by the trainer after each optimizer step)."""
        for _ in range(steps):
            self.position += self.global_batch
            if self.position + self.global_batch > self.num_samples:
                self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["global_batch"]) != self.global_batch or int(state["seed"]) != self.seed:
            raise VegaError(
                f"checkpoint was written with batch_size={state['global_batch']} seed={state['seed']}; "
                f"resuming with batch_size={self.global_batch} seed={self.seed} would change the data order"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---------------------------------------------------------------------------------- order strategies


def length_grouped_permutation(
    base: torch.Tensor, lengths: Sequence[int], global_batch: int, seed: int, chunk: int = GROUP_CHUNK
) -> torch.Tensor:
    """Reorder a (seeded) permutation so that each global batch holds examples of similar length.

    `base` is cut into chunks of `chunk * global_batch`; each chunk is sorted by length (longest first,
    ties keep `base` order) and cut into global batches; the batches are then shuffled with `seed`.
    The leftover tail (fewer than one global batch, dropped by the sampler) stays at the end, so the
    set of examples trained per epoch is the same as without grouping. Pure function of its inputs.
    """
    order = base.tolist()
    usable = len(order) - len(order) % global_batch
    size = chunk * global_batch
    batches: list[list[int]] = []
    for start in range(0, usable, size):
        part = sorted(order[start : min(start + size, usable)], key=lambda i: -lengths[i])
        batches.extend(part[j : j + global_batch] for j in range(0, len(part), global_batch))
    g = torch.Generator().manual_seed(seed)
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return torch.tensor([i for b in shuffled for i in b] + order[usable:], dtype=torch.long)


def sort_within_batches(base: torch.Tensor, lengths: Sequence[int], global_batch: int) -> torch.Tensor:
    """Sort each window of `global_batch` entries of a permutation by length (longest first, ties keep
    `base` order); the tail (fewer than one global batch) stays as it is. Same examples per window."""
    order = base.tolist()
    usable = len(order) - len(order) % global_batch
    out: list[int] = []
    for start in range(0, usable, global_batch):
        out.extend(sorted(order[start : start + global_batch], key=lambda i: -lengths[i]))
    return torch.tensor(out + order[usable:], dtype=torch.long)


def _check(lengths: list[int], layout: Layout, what: str) -> list[int]:
    if len(lengths) != layout.num_samples:
        raise VegaError(f"{what}: {len(lengths)} lengths for {layout.num_samples} examples")
    return lengths


def length_grouping(lengths: Sequence[int], chunk: int = GROUP_CHUNK) -> Order:
    """Order strategy: global batches of similar lengths (`length_grouped_permutation`), in a seeded order."""
    lengths = list(lengths)

    def order(perm: torch.Tensor, epoch: int, layout: Layout) -> torch.Tensor:
        seed = layout.seed * 1_000_003 + epoch  # a different stream from the base shuffle's seed + epoch
        return length_grouped_permutation(perm, _check(lengths, layout, "length grouping"), layout.global_batch,
                                          seed, chunk)

    return order


def sorted_micro_batches(lengths: Sequence[int]) -> Order:
    """Order strategy: each global batch sorted by length, so its `grad_accum` micro-batches pad alike."""
    lengths = list(lengths)

    def order(perm: torch.Tensor, epoch: int, layout: Layout) -> torch.Tensor:
        return sort_within_batches(perm, _check(lengths, layout, "sorted micro-batches"), layout.global_batch)

    return order
