"""Streaming pretraining input: segments packed on the fly from a corpus, with an exact, document-level resume.

`StreamingSegments` reads an `hf:` corpus through `datasets.load_dataset(..., streaming=True)` (or local .txt files
through the local reader), packs each document with the offline packer (`packing._Packer`), so a streamed segment
equals the store's segment of the same document, and yields segments forever, epoch after epoch. Each rank reads a
disjoint shard. `state_dict()` is the position just after the last yielded segment: (epoch, document, segments
already yielded from it), plus, for an unshuffled `hf:` stream, datasets' own state before the record holding that
document, so a resume seeks there instead of re-reading the epoch. See docs/data.md, "Streaming".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from vegalm.data.documents import (DEFAULT_MAX_DOC_CHARS, DEFAULT_MAX_LINE_CHARS, CorpusStats, corpus_sources,
                                   documents_from_records, hub_spec, iter_documents, load_hub_dataset, resolve_paths)
from vegalm.data.packing import FORMAT_VERSION, _Packer, tokenizer_identity
from vegalm.errors import VegaError

STATE_VERSION = 1
_START = {"epoch": 0, "doc": 0, "seg": 0, "skip": 0, "source": None}  # the very first segment of the stream


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise VegaError(f"streaming: {name}: expected an integer >= {low}, got {value!r}")
    return value


class StreamingSegments(IterableDataset):
    """Endless stream of `{"input_ids": LongTensor[seq_len], "attention_mask": LongTensor[seq_len]}`, as
    `SegmentStore[i]` gives them, for one rank.

    `corpus`: an `hf:NAME[:CONFIG[:SPLIT[:TEXT_FIELD]]]` spec, or local paths / globs / folders (read by
    `iter_documents`; rank r keeps documents r, r + world_size, ...). `tokenizer`: anything `tokenizer_identity`
    takes, with [PAD]=0, [CLS] and [SEP]. `max_docs`: documents per epoch and rank. `shuffle_buffer` > 0 (hf: only)
    shuffles each epoch with `ds.shuffle(seed=seed + epoch, buffer_size=shuffle_buffer)`; its resume re-reads the
    epoch up to the position (datasets' state drops the buffer), which is exact but costs reading time. With 0 the
    order is the files' order and a resume seeks. One live iterator at a time: a new `iter()` or `load_state_dict`
    stops the previous one. Made for `DataLoader(num_workers=0)`, where this object's state is the consumer's.
    """

    def __init__(self, corpus: Any, tokenizer: Any, seq_len: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, max_docs: int | None = None, max_line_chars: int = DEFAULT_MAX_LINE_CHARS,
                 max_doc_chars: int = DEFAULT_MAX_DOC_CHARS, shuffle_buffer: int = 0):  # fmt: skip
        super().__init__()
        if not isinstance(seq_len, int) or not 3 <= seq_len <= 1 << 20:
            raise VegaError(f"seq_len: expected an integer between 3 and {1 << 20}, got {seq_len!r}")
        self.world_size = _int("world_size", world_size, 1)
        self.rank = _int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise VegaError(f"streaming: rank {rank} is not below world_size {world_size}")
        self.seq_len, self.seed = seq_len, int(seed)
        self.max_docs = None if max_docs is None else _int("max_docs", max_docs, 1)
        self.max_line_chars = _int("max_line_chars", max_line_chars, 16)  # the local reader's own minimum
        self.max_doc_chars = _int("max_doc_chars", max_doc_chars, 1)
        self.shuffle_buffer = _int("shuffle_buffer", shuffle_buffer, 0)
        self.stats = CorpusStats()  # counts every document read (skipped ones on a resume included)

        self.hub = hub_spec(corpus)
        if self.hub is None and self.shuffle_buffer:
            raise VegaError("streaming: shuffle_buffer needs an hf: corpus; local files stream in file order")
        self.corpus = corpus if isinstance(corpus, str) else [str(p) for p in (
            [corpus] if isinstance(corpus, Path) else corpus)]  # fmt: skip
        sources = corpus_sources(corpus)  # VegaError for missing files, before anything is read
        if self.hub is not None:
            self._ds = load_hub_dataset(self.hub["name"], self.hub["config"], self.hub["split"], rank=self.rank,
                                        world_size=self.world_size)  # fmt: skip
        else:
            self._files = resolve_paths(corpus)
        self._seek = self.hub is not None and not self.shuffle_buffer  # resume through datasets' state_dict

        tok_json, tok_name = tokenizer_identity(tokenizer)
        from tokenizers import Tokenizer

        probe = Tokenizer.from_str(tok_json)
        vocab_size = probe.get_vocab_size(with_added_tokens=True)
        pad_id, cls_id, sep_id = (probe.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]"))
        if pad_id != 0 or cls_id is None or sep_id is None:
            raise VegaError(f"tokenizer {tok_name or ''}: need [PAD]=0, [CLS] and [SEP] (got {pad_id}, {cls_id}, {sep_id})")
        dtype = "uint16" if vocab_size <= 1 << 16 else "int32"  # as build_segments: same rows, same dtype
        self._packer = _Packer(tok_json, seq_len, cls_id, sep_id, dtype)
        # The same fields as build_segments' stage key, plus the stream's own settings.
        self._describe = {
            "format": FORMAT_VERSION, "seq_len": seq_len, "vocab_size": vocab_size, "files": sources,
            "tokenizer_sha256": hashlib.sha256(tok_json.encode("utf-8")).hexdigest(), "max_docs": self.max_docs,
            "max_line_chars": self.max_line_chars, "max_doc_chars": self.max_doc_chars,
            "streaming": {"shuffle_buffer": self.shuffle_buffer, "seed": self.seed if self.shuffle_buffer else None},
        }
        text = json.dumps(self._describe, sort_keys=True, default=str)
        self._key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]  # 64 bits: tells runs apart
        self._pos = dict(_START)
        self._token: object | None = None  # identifies the live iterator

    # ------------------------------------------------------------------------------------------ position

    def describe(self) -> dict:
        """What a cache or stage key should hold: build_segments' key fields (corpus sources with sizes and
        mtimes, tokenizer sha256, seq_len, limits, format) plus the shuffle settings. Rank-independent."""
        return json.loads(json.dumps(self._describe, default=str))

    @property
    def epoch(self) -> int:
        return self._pos["epoch"]

    def state_dict(self) -> dict:
        """The position just after the last yielded segment, as plain ints and strings (fits
        `torch.save(..., weights_only=True)` and JSON)."""
        return {"version": STATE_VERSION, "key": self._key, "rank": self.rank, "world_size": self.world_size,
                **self._pos}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a stream over the same corpus, tokenizer, settings and world size."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise VegaError(f"streaming state: expected a StreamingSegments state of version {STATE_VERSION}")
        if (state.get("world_size"), state.get("rank")) != (self.world_size, self.rank):
            raise VegaError(f"streaming state: written by rank {state.get('rank')} of world size "
                            f"{state.get('world_size')}, this is rank {self.rank} of {self.world_size}; "
                            "resume with the world size it was written with")  # fmt: skip
        if state.get("key") != self._key:
            raise VegaError("streaming state: written for another corpus (or changed files), tokenizer or settings;"
                            " compare describe() of both runs")  # fmt: skip
        pos = {k: state.get(k) for k in _START}
        if not all(isinstance(pos[k], int) and pos[k] >= 0 for k in ("epoch", "doc", "seg", "skip")) or not (
                pos["source"] is None or isinstance(pos["source"], str)):  # fmt: skip
            raise VegaError(f"streaming state: bad position {pos}")
        self._pos = pos
        self._token = None  # a live iterator would overwrite the loaded position: stop it

    # ------------------------------------------------------------------------------------------ reading

    def _documents(self, epoch: int, source: str | None) -> Iterator[tuple[str, str | None, int]]:
        """(document, position before its record, its index among its record's documents) of one epoch.

        In seek mode the position is datasets' state_dict (JSON) after the previous record; None = epoch start.
        """
        if self.hub is None:
            docs = iter_documents(self._files, self.stats, max_line_chars=self.max_line_chars,
                                  max_doc_chars=self.max_doc_chars)  # fmt: skip
            if self.world_size > 1:
                docs = islice(docs, self.rank, None, self.world_size)
            for doc in docs:
                yield doc, None, 0
            return
        if self._seek:
            view = self._ds
            view.load_state_dict(None if source is None else json.loads(source))  # None: from the start
        else:
            view = self._ds.shuffle(seed=self.seed + epoch, buffer_size=self.shuffle_buffer)
        box = {"before": source, "record": -1}

        def records() -> Iterator[Any]:
            before = source
            for record in view:
                box["before"], box["record"] = before, box["record"] + 1
                yield record
                # Resumed here, datasets' state is just after `record`: the seek point of the next one.
                before = json.dumps(view.state_dict()) if self._seek else None

        last, piece = -1, 0
        for doc in documents_from_records(records(), self.hub["text_field"], self.stats,
                                          max_doc_chars=self.max_doc_chars):  # fmt: skip
            piece = piece + 1 if box["record"] == last else 0
            last = box["record"]
            yield doc, box["before"], piece

    def _segment(self, row: np.ndarray, length: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(row.astype(np.int64))
        mask = (torch.arange(self.seq_len) < int(length)).long()
        return {"input_ids": ids, "attention_mask": mask}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        token = self._token = object()
        while True:
            pos = self._pos
            resumed = bool(pos["doc"] or pos["seg"] or pos["skip"] or pos["source"] is not None)
            epoch, doc_index, seg_skip, skip = pos["epoch"], pos["doc"], pos["seg"], pos["skip"]
            n = 0
            docs = self._documents(epoch, pos["source"])
            try:
                for doc, before, piece in docs:
                    if skip:  # documents before the position (after seeking: earlier documents of its record)
                        skip -= 1
                        continue
                    if self.max_docs is not None and doc_index >= self.max_docs:
                        break
                    rows, lengths, _, _ = self._packer([doc])
                    for j in range(seg_skip, len(rows)):
                        if self._token is not token:
                            return
                        self._pos = {"epoch": epoch, "doc": doc_index, "seg": j + 1,
                                     "skip": piece if self._seek else doc_index, "source": before}  # fmt: skip
                        n += 1
                        yield self._segment(rows[j], lengths[j])
                    seg_skip = 0
                    doc_index += 1
            finally:
                docs.close()
            if self._token is not token:
                return
            if n == 0 and not resumed:
                raise VegaError(f"streaming: {self.corpus}: rank {self.rank} of {self.world_size} got no segment "
                                "in a whole epoch (no documents in its shard?)")  # fmt: skip
            self._pos = {**_START, "epoch": epoch + 1}
