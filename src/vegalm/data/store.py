"""The packed segment store: a read-only, memory-mapped map-style dataset over a folder `packing.build_segments`
wrote: `input_ids.npy` [N, seq_len] (uint16 below 65536 vocabulary entries, else int32; padding = [PAD] = 0),
`lengths.npy` [N] int32 (real tokens, [CLS]/[SEP] included) and `meta.json`. Order and resumption belong to the
trainer's sampler, which permutes `range(len(store))`.
"""

from __future__ import annotations

import json
import operator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vegalm.errors import VegaError

IDS_FILE, LENGTHS_FILE, META_FILE = "input_ids.npy", "lengths.npy", "meta.json"


def read_meta(out_dir: Path) -> dict | None:
    """A store's meta.json, or None when it is absent or unreadable."""
    try:
        return json.loads((Path(out_dir) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class SegmentStore(Dataset):
    """Read-only, memory-mapped map-style dataset over a `build_segments` folder.

    `store[i]` -> {"input_ids": LongTensor[seq_len], "attention_mask": LongTensor[seq_len]}. Index i always gives
    the same row; shuffling, epochs and resuming belong to the trainer's sampler. `reused` tells whether
    `build_segments` found a valid cache. Safe to pickle into DataLoader workers (the memmaps are reopened).
    """

    def __init__(self, path: str | Path, *, reused: bool = False):
        self.path = Path(path)
        meta = read_meta(self.path)
        if meta is None:
            raise VegaError(f"segments: {self.path} is not a segment store (no readable {META_FILE})")
        self.meta: dict = meta
        self.reused = reused
        self.seq_len = int(meta["seq_len"])
        self._ids: np.ndarray | None = None
        self._lengths: np.ndarray | None = None
        if self.input_ids.shape != (int(meta["n_segments"]), self.seq_len) or len(self.lengths) != len(self):
            raise VegaError(f"segments: {self.path}/{IDS_FILE} does not match {META_FILE}; rebuild it")

    @property
    def input_ids(self) -> np.ndarray:
        """The [N, seq_len] token array (read-only memmap)."""
        if self._ids is None:
            self._ids = np.load(self.path / IDS_FILE, mmap_mode="r")
        return self._ids

    @property
    def lengths(self) -> np.ndarray:
        """Real tokens per segment ([CLS]/[SEP] included), [N] int32."""
        if self._lengths is None:
            self._lengths = np.load(self.path / LENGTHS_FILE, mmap_mode="r")
        return self._lengths

    def __len__(self) -> int:
        return int(self.meta["n_segments"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"segment {index} out of range for {n} segments")
        ids = torch.from_numpy(self.input_ids[i].astype(np.int64))
        mask = (torch.arange(self.seq_len) < int(self.lengths[i])).long()
        return {"input_ids": ids, "attention_mask": mask}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_ids"] = state["_lengths"] = None  # a pickled memmap would copy the whole array
        return state
