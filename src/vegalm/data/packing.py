"""Packing, DeBERTa/ELECTRA style, without NSP pairs: each document is tokenized whole and its tokens are cut into
runs of at most seq_len-2; each run becomes one segment `[CLS] run [SEP] [PAD]...`, so a segment never spans two
documents. Tokenization runs in a process pool on bounded chunks, in input order, streaming into the .npy files
of a `store.SegmentStore`. The folder is a stage keyed by its inputs (`vegalm.cache`).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vegalm.cache import check_stage, stage_key, write_stage
from vegalm.data.documents import DEFAULT_MAX_DOC_CHARS, DEFAULT_MAX_LINE_CHARS, CorpusStats, open_corpus
from vegalm.data.store import IDS_FILE, LENGTHS_FILE, META_FILE, SegmentStore, read_meta
from vegalm.data.tokenizer import backend_tokenizer
from vegalm.errors import VegaError
from vegalm.io import atomic_write_json

log = logging.getLogger(__name__)

# Text per tokenization task. At most 2 x num_proc tasks are in flight, so memory is a small multiple of
# num_proc x this (plus each task's encodings and rows), whatever the corpus size.
DEFAULT_CHUNK_CHARS = 1_000_000
FORMAT_VERSION = 1
PACKING = (
    "document packing, no NSP: each document is tokenized whole and cut into runs of <= seq_len-2 tokens; "
    "each run is one segment [CLS] run [SEP] [PAD]...; a segment never spans two documents"
)


def encode_fast(tok: Any, docs: list[str]) -> list:
    """encode_batch without character offsets (about 2x faster; we only need ids)."""
    encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch  # encode_batch_fast: tokenizers >= 0.20
    return encode(docs, add_special_tokens=False)


class _Packer:
    """Tokenize a list of documents and pack them into segments (runs in a worker process or in-process)."""

    def __init__(self, tok_json: str, seq_len: int, cls_id: int, sep_id: int, dtype: str):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tok_json)
        self.seq_len, self.cls_id, self.sep_id, self.dtype = seq_len, cls_id, sep_id, np.dtype(dtype)
        # A special token typed literally in a document ("[MASK]", "[SEP]") is matched as that token, both by the
        # added-token pass and by the Unigram model (the pieces are in its vocabulary). Inside a segment it would
        # fake a mask or a boundary, so it becomes [UNK] (or is dropped when there is no [UNK]) and is counted.
        self.unk_id = self.tok.token_to_id("[UNK]")
        specials = [i for i, t in self.tok.get_added_tokens_decoder().items() if t.special and i != self.unk_id]
        self.reserved = np.zeros(self.tok.get_vocab_size(with_added_tokens=True), dtype=bool)
        self.reserved[specials] = True

    def _ids(self, encoding: Any) -> tuple[np.ndarray, int]:
        a = np.asarray(encoding.ids, dtype=self.dtype)
        bad = self.reserved[a]
        n_bad = int(bad.sum())
        if n_bad:
            a = a[~bad] if self.unk_id is None else np.where(bad, self.unk_id, a).astype(self.dtype)
        return a, n_bad

    def __call__(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray, int, int]:
        body = self.seq_len - 2
        ids, literal = [], 0
        for encoding in encode_fast(self.tok, docs):
            a, n_bad = self._ids(encoding)
            ids.append(a)
            literal += n_bad
        n_rows = sum(-(-len(a) // body) for a in ids)
        rows = np.zeros((n_rows, self.seq_len), dtype=self.dtype)  # 0 = [PAD]
        lengths = np.zeros(n_rows, dtype=np.int32)
        r = no_tokens = 0
        for a in ids:
            if len(a) == 0:
                no_tokens += 1
                continue
            full, rest = divmod(len(a), body)
            if full:
                rows[r : r + full, 1 : body + 1] = a[: full * body].reshape(full, body)
                rows[r : r + full, 0] = self.cls_id
                rows[r : r + full, body + 1] = self.sep_id
                lengths[r : r + full] = self.seq_len
                r += full
            if rest:
                rows[r, 0] = self.cls_id
                rows[r, 1 : rest + 1] = a[full * body :]
                rows[r, rest + 1] = self.sep_id
                lengths[r] = rest + 2
                r += 1
        return rows, lengths, no_tokens, literal


_WORKER_PACKER: _Packer | None = None


def _init_worker(packer_args: tuple) -> None:
    global _WORKER_PACKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no nested thread pools
    _WORKER_PACKER = _Packer(*packer_args)


def _pack_in_worker(docs: list[str]) -> tuple[np.ndarray, np.ndarray, int, int]:
    assert _WORKER_PACKER is not None
    return _WORKER_PACKER(docs)


def _chunks(docs: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= chunk_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _packed(chunks: Iterable[list[str]], packer_args: tuple, num_proc: int) -> Iterator[tuple[int, tuple]]:
    """Yield (n_docs, packer result) per chunk, IN INPUT ORDER, so the output does not depend on num_proc.

    Why a Pool and not `datasets.map(num_proc=...)`: map needs a materialised Dataset (the whole corpus as Arrow
    on disk, then its tokenized copy), while this streams straight from the reader into the .npy file. Why
    apply_async with a window and not `Pool.imap`: imap drains its input iterator as fast as it can, so a slow
    consumer would let the whole corpus pile up in the task queue; the window keeps 2 chunks per worker in flight.
    """
    if num_proc == 1:
        packer = _Packer(*packer_args)
        for chunk in chunks:
            yield len(chunk), packer(chunk)
        return
    # fork: workers start in milliseconds and inherit the imported modules; spawn elsewhere (macOS, Windows).
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(packer_args,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((len(chunk), pool.apply_async(_pack_in_worker, (chunk,))))
            if len(pending) >= 2 * num_proc:
                n, result = pending.popleft()
                yield n, result.get()
        while pending:
            n, result = pending.popleft()
            yield n, result.get()


class _NpyAppender:
    """Write a .npy file whose first dimension grows as chunks are appended; the header is fixed up at close.

    numpy pads .npy headers so that shape[0] can grow to 21 digits without changing the header size, which lets
    us rewrite it in place (`np.lib.format.open_memmap` would need the final row count up front).
    """

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]):
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), tuple(row_shape), 0
        self.f = open(path, "wb")
        self._write_header()
        self.data_start = self.f.tell()

    def _write_header(self) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows, *self.row_shape)}
        np.lib.format.write_array_header_1_0(self.f, header)

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if arr.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {arr.shape[1:]}, expected {self.row_shape}")
        self.f.write(arr.data)
        self.rows += len(arr)

    def close(self) -> None:
        self.f.seek(0)
        self._write_header()
        if self.f.tell() != self.data_start:
            raise RuntimeError(f"{self.path}: .npy header changed size")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def tokenizer_identity(tokenizer: Any) -> tuple[str, str]:
    """(canonical tokenizer.json text, a name for meta.json) of any tokenizer `backend_tokenizer` accepts."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(backend_tokenizer(tokenizer).to_str())  # a private copy: we change its settings
    tok.no_truncation()
    tok.no_padding()
    name = str(tokenizer) if isinstance(tokenizer, (str, Path)) else getattr(tokenizer, "name_or_path", "") or ""
    return tok.to_str(), name


def build_segments(
    tokenizer: Any,
    paths: str | Path | Iterable[str | Path],
    out_dir: str | Path,
    seq_len: int,
    seed: int,
    num_proc: int = 2,
    max_docs: int | None = None,
    *,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    max_line_chars: int = DEFAULT_MAX_LINE_CHARS,
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
    progress: bool = True,
    retrain: bool = False,
) -> SegmentStore:
    """Tokenize and pack the corpus into `out_dir` (see the module docstring); reuse it when its key matches.

    `tokenizer`: a fast HF tokenizer, a `tokenizers.Tokenizer`, or a path/Hub name, with [PAD]=0, [CLS] and [SEP].
    The stage key is (corpus files with sizes and mtimes, or the `hf:` spec; the tokenizer.json sha256; seq_len,
    max_docs, reader limits, format version); `num_proc`, `chunk_chars` and `seed` do not change the output and are
    not in it (`seed` is recorded in meta.json only). A finished store with another key is rebuilt when `retrain`,
    else `cache.StaleStageError`. The build writes `out_dir.tmp` and renames it: `out_dir` is absent, old or complete.
    """
    if not isinstance(seq_len, int) or not 3 <= seq_len <= 1 << 20:
        raise VegaError(f"seq_len: expected an integer between 3 and {1 << 20}, got {seq_len!r}")
    if not isinstance(num_proc, int) or num_proc < 1:
        raise VegaError(f"num_proc: expected a positive integer, got {num_proc!r}")
    if chunk_chars < 1:
        raise VegaError(f"chunk_chars: expected a positive integer, got {chunk_chars!r}")
    stats = CorpusStats()
    docs, sources = open_corpus(paths, stats, max_docs=max_docs, max_line_chars=max_line_chars,
                                max_doc_chars=max_doc_chars)
    tok_json, tok_name = tokenizer_identity(tokenizer)
    tok_hash = hashlib.sha256(tok_json.encode("utf-8")).hexdigest()
    from tokenizers import Tokenizer

    probe = Tokenizer.from_str(tok_json)
    vocab_size = probe.get_vocab_size(with_added_tokens=True)
    pad_id, cls_id, sep_id = (probe.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]"))
    if pad_id != 0 or cls_id is None or sep_id is None:
        raise VegaError(f"tokenizer {tok_name or ''}: need [PAD]=0, [CLS] and [SEP] (got {pad_id}, {cls_id}, {sep_id})")
    dtype = "uint16" if vocab_size <= 1 << 16 else "int32"

    key = stage_key(format=FORMAT_VERSION, seq_len=seq_len, tokenizer_sha256=tok_hash, vocab_size=vocab_size,
                    files=sources, max_docs=max_docs, max_line_chars=max_line_chars, max_doc_chars=max_doc_chars)
    out_dir = Path(out_dir)
    old_meta = read_meta(out_dir)
    if old_meta is not None and old_meta.get("key") == key:  # a store from before stage records: adopt it
        write_stage(out_dir, key)
    state = check_stage(out_dir, key, retrain=retrain, flag="--retrain")
    if state == "done" and (out_dir / IDS_FILE).is_file() and (out_dir / LENGTHS_FILE).is_file():
        log.info("segments: %s matches its inputs; reused", out_dir)
        return SegmentStore(out_dir, reused=True)
    if out_dir.exists() and old_meta is None and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise VegaError(f"segments: {out_dir} exists and is not a segment store (no {META_FILE}); not overwriting it")

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    try:
        ids_out = _NpyAppender(tmp / IDS_FILE, np.dtype(dtype), (seq_len,))
        len_out = _NpyAppender(tmp / LENGTHS_FILE, np.dtype(np.int32), ())
        n_tokens = no_tokens = literal = n_chunks = max_chunk_rows = 0
        bar = tqdm(total=max_docs, unit="doc", desc="segments", disable=not progress)
        packer_args = (tok_json, seq_len, cls_id, sep_id, dtype)
        for n_docs, (rows, lengths, empty, n_literal) in _packed(_chunks(docs, chunk_chars), packer_args, num_proc):
            ids_out.append(rows)
            len_out.append(lengths)
            n_tokens += int(lengths.sum())
            no_tokens += empty
            literal += n_literal
            n_chunks += 1
            max_chunk_rows = max(max_chunk_rows, len(rows))
            bar.update(n_docs)
        bar.close()
        ids_out.close()
        len_out.close()
        if stats.docs == 0:
            raise VegaError(f"segments: no documents in {', '.join(str(x.get('path', x.get('hub'))) for x in sources)}")
        n = ids_out.rows
        meta = {
            "seq_len": seq_len,
            "vocab_size": vocab_size,
            "dtype": dtype,
            "n_segments": n,
            "n_tokens": n_tokens,  # real tokens, [CLS]/[SEP] included
            "fill": round(n_tokens / (n * seq_len), 4) if n else 0.0,
            "docs_without_tokens": no_tokens,
            "special_tokens_in_text": literal,  # literal "[MASK]" etc. in documents, stored as [UNK]
            "tokenizer": {"path": tok_name, "sha256": tok_hash, "cls_id": cls_id, "sep_id": sep_id, "pad_id": 0},
            "files": [{k: v for k, v in s.items() if k != "mtime_ns"} for s in sources],
            "stats": stats.as_dict(),
            "packing": PACKING,
            "seed": seed,
            "build": {"num_proc": num_proc, "chunk_chars": chunk_chars, "chunks": n_chunks,
                      "max_chunk_rows": max_chunk_rows, "seconds": round(time.perf_counter() - start, 2)},
        }
        atomic_write_json(tmp / META_FILE, meta)
        write_stage(tmp, key)  # last: its presence marks a finished store
        if out_dir.exists():
            old = out_dir.with_name(out_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SegmentStore(out_dir, reused=False)
