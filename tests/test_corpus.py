"""Corpus reader robustness, segment packing on real data, cache reuse/invalidation, determinism, bounded memory."""

import gzip
import io
import os
import pickle
import shutil
import tracemalloc

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from vegalm.data.documents import (CorpusStats, _iter_pieces, documents_from_records, iter_documents,
                                   iter_documents_hub)
from vegalm.data.packing import build_segments
from vegalm.data.store import SegmentStore
from vegalm.data.tokenizer import train_tokenizer
from vegalm.cache import StaleStageError
from vegalm.errors import VegaError
from _data import CORPUS_DIR, needs_corpus, require

DATA = CORPUS_DIR
WIKI1 = DATA / "wikipedia" / "wiki-001.txt.gz"
BLAKE = DATA / "gutenberg" / "blake-poems.txt.gz"


# ---------------------------------------------------------------------------------------------- reader


def read(paths, **kw):
    stats = CorpusStats()
    return list(iter_documents(paths, stats, **kw)), stats


def test_reader_bad_utf8_bom_empty_and_gz(tmp_path):
    (tmp_path / "a_bad.txt").write_bytes(b"good line\n\xff\xfe bad\nmore\n\n\n\nsecond \xc3\x28 doc\n")
    (tmp_path / "b_bom.txt").write_bytes(b"\xef\xbb\xbfFirst doc.\r\nline two\r\n\r\nSecond doc.")
    (tmp_path / "c_empty.txt").write_bytes(b"")
    (tmp_path / "d_blank.txt").write_bytes(b"\n \n\t\n")
    (tmp_path / "e_invisible.txt").write_bytes("\x00\u200b\n\nvisible\n".encode())
    with gzip.open(tmp_path / "f.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gz doc one\n\ngz doc two\nstill two\n")
    docs, stats = read(str(tmp_path / "*.txt*"))
    assert docs == [
        "good line\n\ufffd\ufffd bad\nmore", "second \ufffd( doc",
        "First doc.\nline two", "Second doc.",
        "visible",
        "gz doc one", "gz doc two\nstill two",
    ]
    assert stats.as_dict() == dict(files=6, empty_files=2, docs=7, empty_docs=1, bad_utf8_lines=2,
                                   long_lines_split=0, long_docs_split=0, bytes=stats.bytes)
    plain = sum(os.path.getsize(p) for p in tmp_path.glob("*.txt"))  # decompressed bytes, BOM included
    assert stats.bytes == plain + len("gz doc one\n\ngz doc two\nstill two\n")


def test_reader_10mb_line_is_cut_linearly(tmp_path):
    line = "ab " * 1_000_000 + "ü" * 500_000 + "日本語" * 500_000 + "x" * 1_500_000 + " tail"
    assert len(line.encode()) > 10_000_000
    (tmp_path / "long.txt").write_text("short doc\n\n" + line + "\n\nlast doc\n", encoding="utf-8")
    docs, stats = read(tmp_path / "long.txt", max_doc_chars=50_000_000)
    assert docs == ["short doc", line, "last doc"]
    assert stats.long_lines_split == 1 and stats.docs == 3 and stats.bad_utf8_lines == 0
    docs, stats = read(tmp_path / "long.txt")  # default max_doc_chars: the line becomes ~1M-char documents
    assert "".join(docs[1:-1]) == line and max(map(len, docs)) <= 1_000_000 + 100_000
    assert stats.long_docs_split >= 4 and stats.docs == len(docs)


def test_pieces_respect_limit_and_char_boundaries():
    text = "héllo wörld " * 20 + "ü" * 200 + "日本" * 100 + "abc"
    stats = CorpusStats()
    pieces = list(_iter_pieces(io.BytesIO((text + "\nnext\n").encode()), 64, stats))
    assert all(len(p.encode()) <= 64 for p, _, _ in pieces)
    assert "".join(p for p, _, _ in pieces[:-1]) == text and pieces[-1] == ("next", True, True)
    assert "\ufffd" not in "".join(p for p, _, _ in pieces) and stats.long_lines_split == 1


@needs_corpus
def test_reader_limits_and_missing_paths(tmp_path):
    docs, stats = read(WIKI1, max_docs=5)
    assert len(docs) == 5 == stats.docs and all(d.strip() for d in docs)
    docs, _ = read(WIKI1, max_chars=3000)
    assert sum(map(len, docs)) >= 3000 and sum(map(len, docs[:-1])) < 3000
    with pytest.raises(VegaError, match="path not found: .*nope.txt"):
        iter_documents(tmp_path / "nope.txt")
    with pytest.raises(VegaError, match=r"no files match .*\*\.zzz"):
        iter_documents(str(tmp_path / "*.zzz"))
    with pytest.raises(VegaError, match="no .txt"):
        iter_documents(tmp_path)


def test_hub_record_mapping_on_local_dataset():
    from datasets import Dataset

    ds = Dataset.from_dict({"id": [1, 2, 3, 4], "text": ["Doc one.\n\nSame doc.", "", "  \n", "x" * 25]})
    stats = CorpusStats()
    docs = list(documents_from_records(ds, "text", stats, max_doc_chars=10))
    assert docs == ["Doc one.\n\n", "Same doc.", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxx"]
    assert stats.empty_docs == 2 and stats.docs == 5 and stats.long_docs_split == 3
    assert list(documents_from_records(ds, "text", max_docs=1)) == ["Doc one.\n\nSame doc."]
    with pytest.raises(VegaError, match="no field 'body'"):
        list(documents_from_records(ds, "body"))


# ---------------------------------------------------------------------------------------------- segments


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    require(CORPUS_DIR)
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(str(DATA / "wikipedia" / "wiki-000.txt.gz"), 1000, out, max_docs=500, seed_size=20_000,
                           shrinking_factor=0.5, n_sub_iterations=1, progress=False)


def test_segments_shapes_layout_and_contents(tok, tmp_path):
    store = build_segments(tok, [WIKI1, BLAKE], tmp_path / "seg", seq_len=64, seed=0, num_proc=1, max_docs=200,
                           progress=False)
    ids, lengths = np.asarray(store.input_ids), np.asarray(store.lengths)
    assert ids.dtype == np.uint16 and ids.shape == (len(store), 64) and len(store) > 200
    assert (ids[:, 0] == 1).all() and lengths.min() >= 3 and lengths.max() == 64
    pos = np.arange(64)[None, :]
    assert (ids[np.arange(len(ids)), lengths - 1] == 2).all()
    assert (ids[pos >= lengths[:, None]] == 0).all()  # padding after [SEP]
    body = ids[(pos > 0) & (pos < lengths[:, None] - 1)]
    assert not np.isin(body, [0, 1, 2]).any()
    assert store.meta["n_tokens"] == lengths.sum() and store.meta["stats"]["docs"] == 200
    assert store.meta["files"][0]["size"] == WIKI1.stat().st_size and store.meta["vocab_size"] == len(tok)

    # The segments are exactly the documents' tokens, cut into runs of seq_len-2, a new segment per document.
    raw = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    docs = list(iter_documents(WIKI1, max_docs=3))
    expected = []
    for doc in docs:
        t = raw.encode(doc, add_special_tokens=False).ids
        expected += [[1, *t[i : i + 62], 2] for i in range(0, len(t), 62)]
    got = [list(ids[r, : lengths[r]]) for r in range(len(expected))]
    assert got == expected

    item = store[-1]
    assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (64,)
    assert int(item["attention_mask"].sum()) == lengths[-1] and item["attention_mask"][0] == 1
    with pytest.raises(IndexError):
        store[len(store)]
    reopened = SegmentStore(tmp_path / "seg")
    assert len(reopened) == len(store) and torch.equal(reopened[5]["input_ids"], store[5]["input_ids"])
    with pytest.raises(VegaError, match="not a segment store"):
        SegmentStore(tmp_path)
    clone = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < 20_000 and torch.equal(clone[3]["input_ids"], store[3]["input_ids"])


def test_literal_special_tokens_in_text_become_unk(tok, tmp_path):
    (tmp_path / "c.txt").write_text("A [MASK] and a [SEP] and [PAD] in text.\n", encoding="utf-8")
    store = build_segments(tok, tmp_path / "c.txt", tmp_path / "seg", seq_len=64, seed=0, num_proc=1, progress=False)
    row = store.input_ids[0, : store.lengths[0]]
    assert not np.isin(row[1:-1], [0, 1, 2, 4]).any() and (row == 3).sum() == 3
    assert store.meta["special_tokens_in_text"] == 3


def test_cache_reuse_and_invalidation(tok, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(BLAKE, corpus / "blake.txt.gz")
    (corpus / "extra.txt").write_text("A small extra document.\n\nAnd another one.\n", encoding="utf-8")
    out = tmp_path / "seg"
    first = build_segments(tok, corpus, out, seq_len=64, seed=0, num_proc=1, progress=False)
    stamp = (out / "input_ids.npy").stat().st_mtime_ns
    again = build_segments(tok, corpus, out, seq_len=64, seed=1, num_proc=2, progress=False)
    assert not first.reused and again.reused and len(again) == len(first)
    assert (out / "input_ids.npy").stat().st_mtime_ns == stamp and not (tmp_path / "seg.tmp").exists()

    (corpus / "extra.txt").write_text("A small extra document.\n\nAnd another one.\n\nAnd a third.\n", encoding="utf-8")
    with pytest.raises(StaleStageError, match=r"seg was made with other settings \(files\[1\]\.mtime_ns: .*"
                                              r"files\[1\]\.size: 42 → 56\); pass --retrain"):
        build_segments(tok, corpus, out, seq_len=64, seed=0, num_proc=1, progress=False)
    assert (out / "input_ids.npy").stat().st_mtime_ns == stamp  # refused: the old store is untouched
    changed = build_segments(tok, corpus, out, seq_len=64, seed=0, num_proc=1, progress=False, retrain=True)
    assert not changed.reused and len(changed) == len(first) + 1
    other_len = build_segments(tok, corpus, out, seq_len=32, seed=0, num_proc=1, progress=False, retrain=True)
    assert not other_len.reused and other_len.input_ids.shape[1] == 32 and len(other_len) > len(changed)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(VegaError, match="not a segment store"):
        build_segments(tok, corpus, tmp_path / "mine", seq_len=64, seed=0, num_proc=1, progress=False)
    (tmp_path / "blank.txt").write_text("\n\n \n", encoding="utf-8")
    with pytest.raises(VegaError, match="no documents in .*blank.txt"):
        build_segments(tok, tmp_path / "blank.txt", tmp_path / "none", seq_len=64, seed=0, progress=False)
    assert not (tmp_path / "none").exists() and not (tmp_path / "none.tmp").exists()
    with pytest.raises(VegaError, match="seq_len"):
        build_segments(tok, corpus, out, seq_len=2, seed=0, progress=False)


def test_deterministic_across_num_proc(tok, tmp_path):
    kw = dict(seq_len=48, seed=0, max_docs=300, chunk_chars=30_000, progress=False)
    a = build_segments(tok, [WIKI1, BLAKE], tmp_path / "a", num_proc=1, **kw)
    b = build_segments(tok, [WIKI1, BLAKE], tmp_path / "b", num_proc=2, **kw)
    assert a.meta["build"]["chunks"] > 4
    for name in ("input_ids.npy", "lengths.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    c = build_segments(tok, [WIKI1, BLAKE], tmp_path / "c", num_proc=1, **kw)
    assert (tmp_path / "c" / "input_ids.npy").read_bytes() == (tmp_path / "a" / "input_ids.npy").read_bytes()


def test_build_memory_is_bounded_by_chunk_not_corpus(tok, tmp_path):
    """Peak Python-heap memory (numpy arrays included) stays far below the output array: nothing holds the corpus.

    Documents are capped at 20k characters and chunks at 20k characters, so the build should never hold more
    than a few hundred kB while it writes ~2.7 MB of segments.
    """
    tracemalloc.start()
    try:
        store = build_segments(tok, WIKI1, tmp_path / "seg", seq_len=64, seed=0, num_proc=1, max_docs=1500,
                               chunk_chars=20_000, max_doc_chars=20_000, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out_bytes = store.input_ids.nbytes
    assert out_bytes > 2_000_000
    assert peak < out_bytes / 4, (peak, out_bytes)
    assert store.meta["build"]["max_chunk_rows"] < len(store) / 20


def _hub_files(tmp_path, n=200):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"Document {i} talks about topic {i % 7} in several plain words." for i in range(n)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    (tmp_path / "c.txt").write_text("".join(t + "\n" for t in texts))  # the text builder: one line = one record
    pq.write_table(pa.table({"body": texts}), tmp_path / "c.parquet")
    return texts


@pytest.mark.parametrize(("builder", "file", "field"), [("json", "c.jsonl", "body"), ("text", "c.txt", "text"),
                                                        ("parquet", "c.parquet", "body")])
def test_hub_spec_reads_local_files_through_real_load_dataset(tmp_path, monkeypatch, builder, file, field):
    from vegalm.data.documents import hub_spec, open_corpus

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    texts = _hub_files(tmp_path)
    spec = f"hf:{builder}:{tmp_path / file}:train:{field}"
    assert hub_spec(spec) == {"name": builder, "config": str(tmp_path / file), "split": "train", "text_field": field}
    stats = CorpusStats()
    docs, sources = open_corpus(spec, stats)
    assert list(docs) == texts and stats.docs == len(texts)
    assert sources[0] == {"hub": spec} and sources[1]["path"] == str((tmp_path / file).resolve())
    halves = [list(iter_documents_hub(builder, str(tmp_path / file), "train", field, rank=r, world_size=2))
              for r in range(2)]
    assert sorted(halves[0] + halves[1]) == sorted(texts) and not set(halves[0]) & set(halves[1]) and halves[0]


def test_hub_spec_packs_and_keys_like_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _hub_files(tmp_path)
    spec = f"hf:json:{tmp_path / '*.jsonl'}:train:body"
    tok = train_tokenizer(spec, 100, tmp_path / "tok", progress=False, seed_size=5000)
    store = build_segments(tok, spec, tmp_path / "seg", seq_len=128, seed=0, num_proc=1, progress=False)
    assert len(store) == 200 and store[0]["input_ids"][0].item() == 1  # one short document per segment; [CLS]
    assert build_segments(tok, spec, tmp_path / "seg", seq_len=128, seed=0, num_proc=1, progress=False).reused
    with open(tmp_path / "c.jsonl", "a") as f:
        f.write('{"body": "One more document."}\n')
    with pytest.raises(StaleStageError, match=r"files\[1\]\.size"):
        build_segments(tok, spec, tmp_path / "seg", seq_len=128, seed=0, num_proc=1, progress=False)
    assert len(build_segments(tok, spec, tmp_path / "seg", seq_len=128, seed=0, num_proc=1, progress=False,
                              retrain=True)) == 201
    with pytest.raises(VegaError, match="hf:json: no files match"):
        build_segments(tok, f"hf:json:{tmp_path / 'none*.jsonl'}", tmp_path / "x", seq_len=128, seed=0, progress=False)
