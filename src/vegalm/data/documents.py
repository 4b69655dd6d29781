"""Corpus documents: a robust streaming reader for local `.txt` / `.txt.gz` files, and Hub dataset input.

Documents are separated by one or more blank lines. The reader streams (it never holds a whole file), replaces and
counts invalid UTF-8, strips a BOM, skips and counts empty files and documents, cuts over-long lines into pieces of
at most `max_line_chars` characters (linear time, bounded memory) and over-long documents into several. See
docs/data.md for the format and the `hf:` corpus spec.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from vegalm.errors import VegaError

DEFAULT_MAX_LINE_CHARS = 100_000
# ~1M characters ~ 250k tokens: one tokenizer call stays small, and only a few Gutenberg books get cut.
DEFAULT_MAX_DOC_CHARS = 1_000_000
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


def load_hub_dataset(name: str, config: str | None = None, split: str = "train", *, rank: int = 0,
                     world_size: int = 1) -> Any:
    """`datasets.load_dataset(..., streaming=True)` of a Hub id or a file builder (see iter_documents_hub), cut to
    this rank's disjoint shard when `world_size` > 1 (`datasets.distributed.split_dataset_by_node`)."""
    from datasets import load_dataset

    try:
        if name in FILE_BUILDERS:
            ds = load_dataset(name, data_files=[str(p) for p in _builder_files(name, config)], split=split,
                              streaming=True)
        else:
            ds = load_dataset(name, config, split=split, streaming=True)
    except VegaError:
        raise
    except Exception as e:  # network, unknown name, unknown config: all user-facing
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VegaError(f"dataset {name} ({config or 'default'}, {split}): cannot load: {reason}") from e
    if world_size > 1:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return ds


def iter_documents_hub(
    name: str,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    stats: CorpusStats | None = None,
    *,
    max_docs: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[str]:
    """Stream documents from a Hugging Face dataset through `datasets.load_dataset(..., streaming=True)`.

    `name` is a Hub id, e.g. ("wikimedia/wikipedia", "20231101.en"), or a file builder (text, json, parquet, csv)
    whose `config` is a path or glob of local files (read offline). With `world_size` > 1, this rank reads only
    its disjoint shard (`datasets.distributed.split_dataset_by_node`).
    """
    ds = load_hub_dataset(name, config, split, rank=rank, world_size=world_size)
    return documents_from_records(ds, text_field, stats, max_docs=max_docs)


# `hf:BUILDER:FILES` reads local files through datasets' packaged builders (no network).
FILE_BUILDERS = ("text", "json", "parquet", "csv")


def _builder_files(name: str, pattern: str | None) -> list[Path]:
    if not pattern:
        raise VegaError(f"corpus: hf:{name}: expected hf:{name}:PATH_OR_GLOB[:SPLIT[:TEXT_FIELD]]")
    text = os.path.expanduser(pattern)
    found = [Path(m) for m in sorted(glob.glob(text, recursive=True)) if os.path.isfile(m)]
    if not found:
        raise VegaError(f"corpus: hf:{name}: no files match {text}")
    return found


def _file_source(p: Path) -> dict:
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


HUB_PREFIX = "hf:"


def hub_spec(spec: Any) -> dict | None:
    """'hf:NAME[:CONFIG[:SPLIT[:TEXT_FIELD]]]' -> iter_documents_hub kwargs; None for local paths.

    Examples: corpus=hf:wikimedia/wikipedia:20231101.en:train:text (streams; needs network), and
    corpus=hf:json:data/*.jsonl:train:body (local files through datasets' json builder).
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
    description of the sources for cache keys (file sizes and mtimes; the spec itself for the Hub, and
    the sizes and mtimes of the local files a file builder reads)."""
    hub = hub_spec(spec)
    if hub is not None:
        sources = corpus_sources(spec)
        return iter_documents_hub(**hub, stats=stats, max_docs=max_docs), sources
    files = resolve_paths(spec)
    return iter_documents(files, stats, max_docs=max_docs, **local_kw), [_file_source(p) for p in files]


def corpus_sources(spec: Any) -> list:
    """What a cache key holds for a corpus (open_corpus's `sources`): `{"hub": spec}` then the size and mtime of
    each local file a file builder reads, or the size and mtime of each local file."""
    hub = hub_spec(spec)
    if hub is None:
        return [_file_source(p) for p in resolve_paths(spec)]
    files = _builder_files(hub["name"], hub["config"]) if hub["name"] in FILE_BUILDERS else []
    return [{"hub": spec}, *map(_file_source, files)]
