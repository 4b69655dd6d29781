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

from collections.abc import Iterator

import torch

from vegalm.errors import VegaError


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
        self.micro_batch = global_batch // grad_accum  # examples per micro-batch, all processes
        self.local_batch = self.micro_batch // world_size  # examples per micro-batch, this process
        self.epoch = 0
        self.position = 0  # consumed examples of the current epoch's permutation

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch  # incomplete last global batch dropped

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g)

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
