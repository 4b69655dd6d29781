"""Streaming segments (vegalm.data.streaming) through the real `datasets.load_dataset` on small local files:
equality with the offline store, disjoint rank shards, exact resume (mid-document, across epochs, through
torch.save), and the one-line errors."""

import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vegalm.cache import read_stage
from vegalm.data.packing import build_segments
from vegalm.data.streaming import StreamingSegments
from vegalm.data.tokenizer import train_tokenizer
from vegalm.errors import VegaError

SEQ = 16  # 14 body tokens: the longer documents below give several segments each
WORDS = "river stone light garden window market winter silver forest letter".split()


def _texts(n=30):
    # Document i has 3 + 4 * (i % 6) words after its header; i % 11 == 5 is an empty record (skipped, as offline).
    return ["" if i % 11 == 5 else f"Document {i} says " + " ".join(WORDS[(i + j) % 10] for j in range(3 + 4 * (i % 6)))
            for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    texts = _texts()
    (d / "c.txt").write_text("".join(t + "\n" for t in texts))  # text builder: one line = one record
    (d / "a.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts[:15])))
    (d / "b.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts[15:])))
    pq.write_table(pa.table({"body": texts}), d / "c.parquet")
    (d / "local.txt").write_text("\n\n".join(t for t in texts if t) + "\n")  # the local reader: blank-line separated
    tok = train_tokenizer(str(d / "local.txt"), 100, d / "tok", progress=False, seed_size=5000)
    return d, tok


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def specs(d):
    return {"text": f"hf:text:{d / 'c.txt'}", "json1": f"hf:json:{d / 'a.jsonl'}:train:body",
            "json2": f"hf:json:{d / '*.jsonl'}:train:body", "parquet": f"hf:parquet:{d / 'c.parquet'}:train:body",
            "local": str(d / "local.txt")}


def rows(segments):
    return [(tuple(s["input_ids"].tolist()), tuple(s["attention_mask"].tolist())) for s in segments]


def take(ds, n):
    out = []
    for seg in ds:
        out.append(seg)
        if len(out) == n:
            break
    return out


def one_epoch(ds):
    out = []
    for seg in ds:
        if ds.epoch > 0:
            break
        out.append(seg)
    return out


@pytest.mark.parametrize("kind", ["text", "json2", "parquet", "local"])
def test_streamed_segments_equal_offline_store(data, tmp_path, kind):
    d, tok = data
    spec = specs(d)[kind]
    store = build_segments(tok, spec, tmp_path / "seg", seq_len=SEQ, seed=0, num_proc=1, progress=False)
    ds = StreamingSegments(spec, tok, SEQ)
    assert len(store) > 40  # several segments per long document
    got = take(ds, len(store) + 1)
    assert rows(got[:-1]) == rows(store[i] for i in range(len(store)))
    assert rows(got[-1:]) == rows([store[0]]) and ds.epoch == 1  # exhausted: starts again
    assert all(s["input_ids"].dtype == torch.long and s["input_ids"].shape == (SEQ,) for s in got)
    key = ds.describe()  # the offline stage key's fields, plus the stream's own settings
    assert key.pop("streaming") == {"shuffle_buffer": 0, "seed": None} and key == read_stage(tmp_path / "seg")
    assert (key["files"][0] == {"hub": spec}) == (kind != "local")


@pytest.mark.parametrize(("kind", "shuffle"), [("json1", 0), ("json2", 0), ("local", 0), ("json1", 8)])
def test_ranks_read_disjoint_shards_covering_every_document(data, tmp_path, kind, shuffle):
    # 1 file (1 shard < 2 ranks): datasets splits by example; 2 files: by shard; local: document round-robin.
    d, tok = data
    spec = specs(d)[kind]
    store = build_segments(tok, spec, tmp_path / "seg", seq_len=SEQ, seed=0, num_proc=1, progress=False)
    parts = [rows(one_epoch(StreamingSegments(spec, tok, SEQ, rank=r, world_size=2, seed=5, shuffle_buffer=shuffle)))
             for r in range(2)]
    assert parts[0] and parts[1]
    assert Counter(parts[0]) + Counter(parts[1]) == Counter(rows(store[i] for i in range(len(store))))
    if kind == "json2":  # by shard: each rank reads its own file, in order
        first = rows(one_epoch(StreamingSegments(f"hf:json:{d / 'a.jsonl'}:train:body", tok, SEQ)))
        assert parts[0] == first


def _reference(make, n):
    ds = make()
    segs, states = [], [ds.state_dict()]
    for seg in ds:
        segs.append(seg)
        states.append(ds.state_dict())
        if len(segs) == n:
            break
    return rows(segs), states


def _resume_points(states, epoch_len):
    mid = next(k for k in range(1, len(states) - 1)  # inside a document that has more segments to come
               if states[k]["seg"] == 1 and states[k + 1]["doc"] == states[k]["doc"] and states[k]["epoch"] == 0)
    # seek mode: inside the 2nd+ document cut from one long record (its earlier pieces are skipped after the seek)
    piece = [k for k in range(len(states)) if states[k]["skip"] and states[k]["source"] is not None][:1]
    return [0, mid, mid + 1, epoch_len - 1, epoch_len, epoch_len + 1, *piece]


@pytest.mark.parametrize(("kind", "world_size", "shuffle", "max_doc_chars"),
                         [("json1", 1, 0, 40), ("text", 1, 0, None), ("parquet", 1, 0, None), ("json2", 1, 8, None),
                          ("json1", 2, 0, None), ("json2", 2, 0, 40), ("local", 2, 0, None)])  # fmt: skip
def test_resume_is_exact_mid_document_and_across_epochs(data, kind, world_size, shuffle, max_doc_chars):
    d, tok = data
    spec = specs(d)[kind]
    rank = world_size - 1
    limits = {"max_doc_chars": max_doc_chars} if max_doc_chars else {}  # 40: long records give several documents

    def make():
        return StreamingSegments(spec, tok, SEQ, rank=rank, world_size=world_size, seed=3, shuffle_buffer=shuffle,
                                 **limits)  # fmt: skip

    epoch_len = len(one_epoch(make()))
    n = epoch_len + 6
    ref, states = _reference(make, n)
    seek = not shuffle and kind != "local"  # these resume through datasets' own state_dict
    assert any(s["source"] is not None for s in states) == seek
    assert any(s["skip"] for s in states) == (not seek or max_doc_chars is not None)
    if shuffle:  # a shuffled epoch is a permutation of the file order, another one each epoch
        plain = rows(one_epoch(StreamingSegments(spec, tok, SEQ)))
        assert ref[:epoch_len] != plain and sorted(ref[:epoch_len]) == sorted(plain)
        assert ref[epoch_len:] != ref[: n - epoch_len]
    for k in _resume_points(states, epoch_len):
        buf = io.BytesIO()
        torch.save(states[k], buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        assert json.loads(json.dumps(state)) == states[k]  # plain values only
        ds = make()
        ds.load_state_dict(state)
        assert rows(take(ds, n - k)) == ref[k:], k
        assert ds.state_dict() == states[n]


def test_load_state_stops_the_live_iterator(data):
    d, tok = data
    ds = StreamingSegments(specs(d)["json1"], tok, SEQ)
    ref, states = _reference(lambda: StreamingSegments(specs(d)["json1"], tok, SEQ), 12)
    it = iter(ds)
    take(it, 9)
    ds.load_state_dict(states[4])
    assert list(it) == []  # the old iterator ends instead of moving the loaded position
    assert rows(take(ds, 8)) == ref[4:12]


def test_streaming_errors(data, tmp_path):
    d, tok = data
    spec = specs(d)["json1"]
    with pytest.raises(VegaError, match="hf:json: no files match"):
        StreamingSegments(f"hf:json:{tmp_path / 'none*.jsonl'}:train:body", tok, SEQ)
    with pytest.raises(VegaError, match="path not found"):
        StreamingSegments(str(tmp_path / "missing.txt"), tok, SEQ)
    with pytest.raises(VegaError, match="no field 'nope'"):
        take(StreamingSegments(f"hf:json:{d / 'a.jsonl'}:train:nope", tok, SEQ), 1)
    with pytest.raises(VegaError, match="shuffle_buffer needs an hf: corpus"):
        StreamingSegments(str(d / "local.txt"), tok, SEQ, shuffle_buffer=4)
    with pytest.raises(VegaError, match="rank 2 is not below world_size 2"):
        StreamingSegments(spec, tok, SEQ, rank=2, world_size=2)
    with pytest.raises(VegaError, match="seq_len"):
        StreamingSegments(spec, tok, 2)
    state = StreamingSegments(spec, tok, SEQ, rank=0, world_size=2).state_dict()
    with pytest.raises(VegaError, match="written by rank 0 of world size 2, this is rank 0 of 1"):
        StreamingSegments(spec, tok, SEQ).load_state_dict(state)
    with pytest.raises(VegaError, match="another corpus"):
        StreamingSegments(spec, tok, SEQ + 1).load_state_dict(StreamingSegments(spec, tok, SEQ).state_dict())
    (tmp_path / "one.jsonl").write_text(json.dumps({"body": "Only one document."}) + "\n")
    with pytest.raises(VegaError, match="rank 1 of 2 got no segment"):
        take(StreamingSegments(f"hf:json:{tmp_path / 'one.jsonl'}:train:body", tok, SEQ, rank=1, world_size=2), 1)


def test_the_trainer_takes_a_stream_only_as_it_can_resume_it(data):
    """Trainer's checks for a streamed dataset: no DataLoader workers (the position is the reader's), no epochs
    (no length), whole local batches; each names its key."""
    from vegalm.config import ConfigError
    from vegalm.train.trainer import TrainConfig, _check_stream

    d, tok = data
    ds = StreamingSegments(specs(d)["text"], tok, SEQ)
    _check_stream(ds, TrainConfig(batch_size=8, grad_accum=2), 2)  # 2 per process and micro-batch: fine
    for cfg, procs, key in [(TrainConfig(num_workers=1), 1, "num_workers"), (TrainConfig(epochs=1.0), 1, "epochs"),
                            (TrainConfig(batch_size=6, grad_accum=2), 2, "batch_size")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"train.{key}"):
            _check_stream(ds, cfg, procs)
    class Endless(torch.utils.data.IterableDataset):  # no state_dict: it could not resume
        def __iter__(self):
            yield from iter(int, 1)

    with pytest.raises(VegaError, match="state_dict"):
        _check_stream(Endless(), TrainConfig(), 1)
