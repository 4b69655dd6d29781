"""Pretraining corpus: a robust streaming document reader and a packed, memory-mapped segment store.

Corpus format: plain `.txt` or `.txt.gz` files, documents separated by one or more blank lines. The reader streams
(it never holds a whole file), replaces and counts invalid UTF-8, strips a BOM, skips and counts empty files and
documents, and cuts over-long lines into pieces of at most `max_line_chars` characters, so a 10 MB line costs
linear time and bounded memory. A document longer than `max_doc_chars` is cut (at a line or piece boundary) into
several documents (each Gutenberg book, up to 1.2 MB, is one document here).

Packing (`build_segments`), DeBERTa/ELECTRA style, without NSP pairs: every document is tokenized whole; its
tokens are cut into consecutive runs of at most seq_len-2 tokens; each run becomes one segment
`[CLS] run [SEP] [PAD]...`. A segment never spans two documents; the last run of a document may be short (it is
padded, and `lengths.npy` records each segment's real token count, [CLS]/[SEP] included).

On disk (`out_dir/`): `input_ids.npy` [N, seq_len] (uint16 when the vocabulary has < 65536 entries, else int32,
padding = [PAD] = 0), `lengths.npy` [N] int32, and `meta.json` (written last: its presence marks a complete
store). Order and resumption are NOT handled here: the trainer's sampler draws a seeded permutation of
`range(len(store))` and keeps its position; `SegmentStore` is only a stable map-style dataset.

Usage:

    from vegalm.data.corpus import build_segments, iter_documents, CorpusStats
    store = build_segments("runs/tok", "../shared/data/corpus/wikipedia/*.txt.gz", "runs/seg128", seq_len=128, seed=0)
    store[0]  # {"input_ids": LongTensor[128], "attention_mask": LongTensor[128]}
    stats = CorpusStats(); n = sum(1 for _ in iter_documents("corpus/**/*.txt.gz", stats)); print(stats)
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import multiprocessing
import operator
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vegalm.errors import VegaError

DEFAULT_MAX_LINE_CHARS = 100_000
# ~1M characters ~ 250k tokens: one tokenizer call stays small, and only a few Gutenberg books get cut.
DEFAULT_MAX_DOC_CHARS = 1_000_000
# Text per tokenization task. At most 2 x num_proc tasks are in flight, so memory is a small multiple of
# num_proc x this (plus each task's encodings and rows), whatever the corpus size.
DEFAULT_CHUNK_CHARS = 1_000_000
FORMAT_VERSION = 1
IDS_FILE, LENGTHS_FILE, META_FILE = "input_ids.npy", "lengths.npy", "meta.json"
PACKING = (
    "document packing, no NSP: each document is tokenized whole and cut into runs of <= seq_len-2 tokens; "
    "each run is one segment [CLS] run [SEP] [PAD]...; a segment never spans two documents"
)
_BOM = b"\xef\xbb\xbf"
# A document with none of these characters (only whitespace, control or zero-width characters) counts as empty.
_VISIBLE = re.compile(r"[^\s\x00-\x1f\x7f-\x9f\u200b-\u200d\ufeff]")


@dataclass
class CorpusStats:
    """Counters filled in while reading. `bytes` counts decompressed bytes read."""

    files: int = 0
    empty_files: int = 0  # files that gave no document (0 bytes, or only blank lines)
    docs: int = 0  # documents yielded
    empty_docs: int = 0  # documents skipped because they held no visible character
    bad_utf8_lines: int = 0  # lines with at least one invalid UTF-8 sequence (replaced by U+FFFD)
    long_lines_split: int = 0  # lines longer than max_line_chars (read in pieces)
    long_docs_split: int = 0  # cuts made in documents longer than max_doc_chars
    bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- reading


def resolve_paths(paths_or_glob: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expand globs (`**` allowed), folders (all .txt/.txt.gz below) and comma-separated lists; keep order.

    A missing path, or a glob or folder matching nothing, raises VegaError naming it.
    """
    items = [paths_or_glob] if isinstance(paths_or_glob, (str, Path)) else list(paths_or_glob)
    if not items:
        raise VegaError("corpus: no paths given")
    out: list[Path] = []
    for item in items:
        text = os.path.expanduser(str(item))
        if isinstance(item, str) and "," in text and not os.path.exists(text):
            out.extend(resolve_paths([t for t in text.split(",") if t.strip()]))
        elif isinstance(item, str) and any(c in text for c in "*?["):
            found = [Path(m) for m in sorted(glob.glob(text, recursive=True)) if os.path.isfile(m)]
            if not found:
                raise VegaError(f"corpus: no files match {text}")
            out.extend(found)
        elif os.path.isdir(text):
            found = sorted(p for p in Path(text).rglob("*") if p.is_file() and p.name.endswith((".txt", ".txt.gz")))
            if not found:
                raise VegaError(f"corpus: no .txt or .txt.gz files under {text}")
            out.extend(found)
        elif os.path.isfile(text):
            out.append(Path(text))
        else:
            raise VegaError(f"corpus: path not found: {text}")
    seen: set[Path] = set()
    unique = []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _utf8_cut(buf: bytes) -> int:
    """Largest cut position <= len(buf) that does not split a UTF-8 sequence at the end of `buf`."""
    i = len(buf) - 1
    while i > 0 and len(buf) - i < 4 and (buf[i] & 0xC0) == 0x80:  # walk back over continuation bytes
        i -= 1
    lead = buf[i]
    need = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if lead >= 0xF0 else 1
    return i if i > 0 and i + need > len(buf) else len(buf)


def _iter_pieces(f: BinaryIO, max_line_chars: int, stats: CorpusStats) -> Iterator[tuple[str, bool, bool]]:
    """Yield (text, ends_line, whole_line) for each line of `f`, long lines as several pieces.

    A piece has at most `max_line_chars` bytes, hence at most that many characters. It is cut after the last
    space in its second half when there is one (so words stay whole), else at a UTF-8 character boundary. Each
    byte is carried over at most once, so the cost is linear in the line length.
    """
    carry = b""
    split = bad = False
    first = True
    while True:
        want = max_line_chars - len(carry)
        raw = f.readline(want)
        stats.bytes += len(raw)
        line_done = raw.endswith(b"\n") or len(raw) < want  # a short read without "\n" means end of file
        if first:
            first = False
            if raw.startswith(_BOM):
                raw = raw[len(_BOM):]
        buf = carry + raw if carry else raw
        carry = b""
        if not buf:
            return
        if line_done:
            text, b = _decode(buf.rstrip(b"\r\n"))
            stats.bad_utf8_lines += bad or b
            stats.long_lines_split += split
            yield text, True, not split
            split = bad = False
            continue
        cut = buf.rfind(b" ", len(buf) // 2) + 1
        if cut <= 0:
            cut = _utf8_cut(buf)
        buf, carry = buf[:cut], buf[cut:]
        text, b = _decode(buf)
        bad = bad or b
        split = True
        yield text, False, False


def _finish(parts: list[str], stats: CorpusStats, continued: bool = False) -> str | None:
    """Join and count a document. An invisible tail left after a long-document cut is dropped, not counted."""
    text = "".join(parts)
    parts.clear()
    if text.endswith("\n"):
        text = text[:-1]
    if _VISIBLE.search(text) is None:
        stats.empty_docs += not continued
        return None
    stats.docs += 1
    return text


def _iter_file_documents(path: Path, stats: CorpusStats, max_line_chars: int, max_doc_chars: int) -> Iterator[str]:
    try:
        f = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise VegaError(f"corpus: cannot open {path}: {e.strerror or e}") from None
    stats.files += 1
    produced = stats.docs + stats.empty_docs
    parts: list[str] = []
    size = 0
    continued = False  # the current document is the rest of a cut one
    with f:
        try:
            for text, ends_line, whole_line in _iter_pieces(f, max_line_chars, stats):
                if whole_line and not text.strip():  # a blank line ends the document
                    if parts and (doc := _finish(parts, stats, continued)) is not None:
                        yield doc
                    size, continued = 0, False
                    continue
                parts.append(text)
                size += len(text)
                if ends_line:
                    parts.append("\n")
                    size += 1
                if size >= max_doc_chars:
                    stats.long_docs_split += 1
                    if (doc := _finish(parts, stats, continued)) is not None:
                        yield doc
                    size, continued = 0, True
            if parts and (doc := _finish(parts, stats, continued)) is not None:
                yield doc
        except (OSError, EOFError, gzip.BadGzipFile) as e:  # truncated or corrupt .gz
            raise VegaError(f"corpus: {path}: cannot read ({e})") from None
    if stats.docs + stats.empty_docs == produced:
        stats.empty_files += 1


def iter_documents(
    paths_or_glob: str | Path | Iterable[str | Path],
    stats: CorpusStats | None = None,
    *,
    max_docs: int | None = None,
    max_chars: int | None = None,
    max_line_chars: int = DEFAULT_MAX_LINE_CHARS,
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
) -> Iterator[str]:
    """Stream documents (str, lines joined by "\\n") from .txt/.txt.gz files; see the module docstring.

    Paths are checked at once (VegaError for a missing path or an empty glob), documents are read lazily.
    Stops after `max_docs` documents or once `max_chars` characters have been yielded.
    """
    if max_line_chars < 16:  # a piece must hold a whole UTF-8 character plus room to look for a space
        raise VegaError(f"max_line_chars: expected at least 16, got {max_line_chars}")
    if max_doc_chars < 1:
        raise VegaError(f"max_doc_chars: expected a positive number, got {max_doc_chars}")
    files = resolve_paths(paths_or_glob)
    stats = stats if stats is not None else CorpusStats()

    def generate() -> Iterator[str]:
        n = chars = 0
        if max_docs is not None and max_docs <= 0:
            return
        for path in files:
            for doc in _iter_file_documents(path, stats, max_line_chars, max_doc_chars):
                yield doc
                n += 1
                chars += len(doc)
                if (max_docs is not None and n >= max_docs) or (max_chars is not None and chars >= max_chars):
                    return

    return generate()


def _split_long_text(text: str, max_doc_chars: int, stats: CorpusStats) -> Iterator[str]:
    """Cut `text` into pieces of at most max_doc_chars characters, after a whitespace when one is near the end."""
    start = 0
    while len(text) - start > max_doc_chars:
        end = start + max_doc_chars
        space = max(text.rfind(" ", start + max_doc_chars // 2, end), text.rfind("\n", start + max_doc_chars // 2, end))
        end = space + 1 if space >= 0 else end
        stats.long_docs_split += 1
        yield text[start:end]
        start = end
    yield text[start:]


def documents_from_records(
    records: Iterable[Any],
    text_field: str = "text",
    stats: CorpusStats | None = None,
    *,
    max_docs: int | None = None,
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
) -> Iterator[str]:
    """Map dataset records (dicts) to documents: one record = one document (blank lines inside are kept)."""
    stats = stats if stats is not None else CorpusStats()
    n = 0
    for i, record in enumerate(records):
        try:
            text = record[text_field]
        except (KeyError, TypeError, IndexError):
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise VegaError(f"dataset record {i}: no field {text_field!r} (has {fields})") from None
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise VegaError(f"dataset record {i}: field {text_field!r} is {type(text).__name__}, expected text")
        stats.bytes += len(text.encode("utf-8", errors="replace"))
        for piece in _split_long_text(text, max_doc_chars, stats):
            if _VISIBLE.search(piece) is None:
                stats.empty_docs += 1
                continue
            stats.docs += 1
            yield piece
            n += 1
            if max_docs is not None and n >= max_docs:
                return


def iter_documents_hub(
    name: str,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    stats: CorpusStats | None = None,
    *,
    max_docs: int | None = None,
) -> Iterator[str]:
    """Stream documents from a Hugging Face Hub dataset (needs network), e.g. ("wikimedia/wikipedia", "20231101.en")."""
    from datasets import load_dataset

    try:
        ds = load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # network, unknown name, unknown config: all user-facing
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VegaError(f"dataset {name} ({config or 'default'}, {split}): cannot load: {reason}") from e
    return documents_from_records(ds, text_field, stats, max_docs=max_docs)


HUB_PREFIX = "hf:"


def hub_spec(spec: Any) -> dict | None:
    """'hf:NAME[:CONFIG[:SPLIT[:TEXT_FIELD]]]' -> iter_documents_hub kwargs; None for local paths.

    Example: corpus=hf:wikimedia/wikipedia:20231101.en:train:text (streams; needs network).
    """
    if not (isinstance(spec, str) and spec.startswith(HUB_PREFIX)):
        return None
    parts = spec[len(HUB_PREFIX):].split(":")
    if not parts[0]:
        raise VegaError(f"corpus: {spec!r}: expected hf:NAME[:CONFIG[:SPLIT[:TEXT_FIELD]]]")
    parts += [""] * (4 - len(parts))
    return {"name": parts[0], "config": parts[1] or None, "split": parts[2] or "train", "text_field": parts[3] or "text"}


def open_corpus(spec: Any, stats: CorpusStats, *, max_docs: int | None = None, **local_kw) -> tuple[Iterator[str], list]:
    """Documents of a local corpus (paths / globs / folders) or a Hub dataset (`hf:` spec), plus a
    description of the sources for cache keys (file sizes and mtimes; the spec itself for the Hub)."""
    hub = hub_spec(spec)
    if hub is not None:
        return iter_documents_hub(**hub, stats=stats, max_docs=max_docs), [{"hub": spec}]
    files = resolve_paths(spec)
    sources = []
    for p in files:
        st = p.stat()
        sources.append({"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return iter_documents(files, stats, max_docs=max_docs, **local_kw), sources


# ---------------------------------------------------------------------------------------------- packing


def _encode_fast(tok: Any, docs: list[str]) -> list:
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
        for encoding in _encode_fast(self.tok, docs):
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
        self.f.close()


def _tokenizer_identity(tokenizer: Any) -> tuple[str, str]:
    """(canonical tokenizer.json text, a name for meta.json) of any tokenizer `backend_tokenizer` accepts."""
    from tokenizers import Tokenizer

    from vegalm.data.tokenizer import backend_tokenizer

    tok = Tokenizer.from_str(backend_tokenizer(tokenizer).to_str())  # a private copy: we change its settings
    tok.no_truncation()
    tok.no_padding()
    name = str(tokenizer) if isinstance(tokenizer, (str, Path)) else getattr(tokenizer, "name_or_path", "") or ""
    return tok.to_str(), name


def _read_meta(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
) -> SegmentStore:
    """Tokenize and pack the corpus into `out_dir` (see the module docstring); reuse it when inputs match.

    `tokenizer`: a fast HF tokenizer, a `tokenizers.Tokenizer`, or a path/Hub name. It must have [PAD]=0, [CLS]
    and [SEP]. The cache key is (files with sizes and mtimes, tokenizer.json hash, seq_len, max_docs, reader
    limits, format version); `num_proc`, `chunk_chars` and `seed` do not change the output, so they are not in it.
    `seed` is recorded in meta.json only: packing is deterministic and the order is the sampler's job.
    The build writes `out_dir.tmp` and renames it, so `out_dir` is always either absent, old or complete.
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
    tok_json, tok_name = _tokenizer_identity(tokenizer)
    tok_hash = hashlib.sha256(tok_json.encode("utf-8")).hexdigest()
    from tokenizers import Tokenizer

    probe = Tokenizer.from_str(tok_json)
    vocab_size = probe.get_vocab_size(with_added_tokens=True)
    pad_id, cls_id, sep_id = (probe.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]"))
    if pad_id != 0 or cls_id is None or sep_id is None:
        raise VegaError(f"tokenizer {tok_name or ''}: need [PAD]=0, [CLS] and [SEP] (got {pad_id}, {cls_id}, {sep_id})")
    dtype = "uint16" if vocab_size <= 1 << 16 else "int32"

    key = {
        "format": FORMAT_VERSION, "seq_len": seq_len, "tokenizer_sha256": tok_hash, "vocab_size": vocab_size,
        "files": sources, "max_docs": max_docs, "max_line_chars": max_line_chars, "max_doc_chars": max_doc_chars,
    }
    key = json.loads(json.dumps(key))
    out_dir = Path(out_dir)
    old_meta = _read_meta(out_dir)
    if old_meta is not None and old_meta.get("key") == key:
        if (out_dir / IDS_FILE).is_file() and (out_dir / LENGTHS_FILE).is_file():
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
            "key": key,
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
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
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


class SegmentStore(Dataset):
    """Read-only, memory-mapped map-style dataset over a `build_segments` folder.

    `store[i]` -> {"input_ids": LongTensor[seq_len], "attention_mask": LongTensor[seq_len]}. Index i always gives
    the same row; shuffling, epochs and resuming belong to the trainer's sampler. `reused` tells whether
    `build_segments` found a valid cache. Safe to pickle into DataLoader workers (the memmaps are reopened).
    """

    def __init__(self, path: str | Path, *, reused: bool = False):
        self.path = Path(path)
        meta = _read_meta(self.path)
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


# ---------------------------------------------------------------------------------------------- benchmark


def measure_tokenization_mbps(tokenizer: Any, paths: str | Path | Iterable[str | Path], max_mb: float = 5) -> float:
    """Tokenizer throughput in MB/s (1 MB = 1e6 UTF-8 bytes) on the first `max_mb` MB of documents.

    Times only the batch encoding that `build_segments` uses (`encode_batch_fast`, on all cores through the
    tokenizers thread pool), not reading or packing.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_tokenizer_identity(tokenizer)[0])
    docs, nbytes = [], 0
    for doc in iter_documents(paths, CorpusStats()):
        docs.append(doc)
        nbytes += len(doc.encode("utf-8"))
        if nbytes >= max_mb * 1e6:
            break
    if not docs:
        raise VegaError(f"corpus: no documents in {paths}")
    start = time.perf_counter()
    _encode_fast(tok, docs)
    return nbytes / 1e6 / (time.perf_counter() - start)
