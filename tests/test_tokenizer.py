"""Unigram tokenizer: fixed special ids, AutoTokenizer round trip (singles, pairs, truncation, padding), decode."""

import json
import re

import pytest
from tokenizers import Tokenizer

from vegalm.cache import STAGE_FILE, StaleStageError
from vegalm.data.documents import iter_documents
from vegalm.data.tokenizer import SPECIAL_TOKENS, canonical_unigram, load_tokenizer, tokenizer_train_main, train_tokenizer
from vegalm.errors import VegaError
from _data import CORPUS_DIR, needs_corpus, require

DATA = CORPUS_DIR
WIKI = DATA / "wikipedia"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    require(CORPUS_DIR)
    out = tmp_path_factory.mktemp("tok")
    # 2000 real documents (~4 MB); a small seed set, fast shrinking and one EM sub-iteration keep it to seconds.
    hf = train_tokenizer(str(WIKI / "wiki-000.txt.gz"), 1500, out, max_docs=2000, seed_size=20_000,
                         shrinking_factor=0.5, n_sub_iterations=1, progress=False)
    return hf, out, Tokenizer.from_file(str(out / "tokenizer.json"))


@pytest.fixture(scope="module")
def sentences():
    """~100 real sentences from a file the tokenizer did not see."""
    require(CORPUS_DIR)
    out = []
    for doc in iter_documents(WIKI / "wiki-001.txt.gz", max_docs=60):
        out += [s.strip() for s in re.split(r"(?<=\.) ", doc.replace("\n", " ")) if len(s.split()) >= 4]
    assert len(out) >= 100
    return out[:100]


def test_special_ids_fixed_and_saved_files(trained):
    hf, out, raw = trained
    assert [raw.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.unk_token_id, hf.mask_token_id) == (0, 1, 2, 3, 4)
    assert 1000 < len(hf) <= 1500
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    info = json.loads((out / "vegalm_tokenizer.json").read_text())
    assert info["corpus_stats"]["docs"] == 2000


def test_round_trip_single_sentences(trained, sentences):
    _, out, raw = trained
    auto = load_tokenizer(out)
    for s in sentences:
        enc, got = raw.encode(s), auto(s)
        assert got["input_ids"] == enc.ids
        assert got["token_type_ids"] == enc.type_ids == [0] * len(enc.ids)
        assert got["attention_mask"] == enc.attention_mask
        assert enc.ids[0] == 1 and enc.ids[-1] == 2


def test_round_trip_pairs_token_type_ids(trained, sentences):
    _, out, raw = trained
    auto = load_tokenizer(out)
    for a, b in zip(sentences[::2], sentences[1::2]):
        enc, got = raw.encode(a, b), auto(a, b)
        assert got["input_ids"] == enc.ids and got["token_type_ids"] == enc.type_ids
        n_a = len(raw.encode(a).ids)  # [CLS] A [SEP]
        assert enc.type_ids == [0] * n_a + [1] * (len(enc.ids) - n_a)
        assert enc.ids[n_a - 1] == 2 and enc.ids[-1] == 2


def test_round_trip_truncation_and_padding(trained, sentences):
    _, out, _ = trained
    auto = load_tokenizer(out)
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    raw.enable_truncation(max_length=12)
    for a, b in zip(sentences[::2], sentences[1::2]):
        for args in ((a,), (a, b)):
            enc, got = raw.encode(*args), auto(*args, truncation=True, max_length=12)
            assert got["input_ids"] == enc.ids and got["token_type_ids"] == enc.type_ids
            assert len(enc.ids) <= 12 and enc.ids[-1] == 2
    raw.no_truncation()
    raw.enable_padding(pad_id=0, pad_token="[PAD]")
    encs = raw.encode_batch(sentences[:8])
    got = auto(sentences[:8], padding=True)
    assert got["input_ids"] == [e.ids for e in encs]
    assert got["attention_mask"] == [e.attention_mask for e in encs]
    assert any(0 in m for m in got["attention_mask"])  # padding really happened


def test_decode_and_case(trained, sentences):
    hf, _, raw = trained
    checked = 0
    for s in sentences:
        ids = hf(s)["input_ids"]
        if 3 in ids:  # a character outside the small vocabulary; decoding cannot restore it
            continue
        assert hf.decode(ids, skip_special_tokens=True) == raw.normalizer.normalize_str(s)
        checked += 1
    assert checked >= 50
    assert hf.decode(hf("Paris is big.")["input_ids"]) == "[CLS] Paris is big.[SEP]"
    assert hf("Paris")["input_ids"] != hf("paris")["input_ids"]  # case is kept
    assert raw.normalizer.normalize_str("  a\u00a0b\n\tc\x00 ") == "a b c"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(VegaError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(VegaError, match="not found"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(VegaError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path)


@needs_corpus
def test_cli_main_and_bad_inputs(tmp_path, capsys):
    corpus = str(DATA / "gutenberg" / "blake-poems.txt.gz") + "," + str(WIKI / "wiki-002.txt.gz")
    assert tokenizer_train_main(corpus, 300, str(tmp_path / "t"), max_docs=100) == 0
    assert "vocab" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "t")("hello")["input_ids"][0] == 1
    with pytest.raises(VegaError, match="no files match"):
        train_tokenizer(str(tmp_path / "*.txt.gz"), 300, tmp_path / "u")
    with pytest.raises(VegaError, match="vocab_size"):
        train_tokenizer(str(WIKI / "wiki-002.txt.gz"), 3, tmp_path / "u")


def _tiny_train(corpus, vocab, out, **kw):
    return train_tokenizer(corpus, vocab, out, seed_size=5000, shrinking_factor=0.5, n_sub_iterations=1,
                           progress=False, **kw)


@needs_corpus
def test_stale_tokenizer_is_never_reused_silently(tmp_path):
    """The issue's case: a tokenizer left by a run on a one-line corpus must not serve the corrected run."""
    tiny = tmp_path / "one_line.txt"
    tiny.write_text("Only one short line here.\n")
    out = tmp_path / "tok"
    _tiny_train(tiny, 300, out)
    small = json.loads((out / "tokenizer.json").read_text())
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    assert _tiny_train(tiny, 300, out) is not None and (out / "tokenizer.json").stat().st_mtime_ns == stamp  # reused
    real = str(DATA / "gutenberg" / "blake-poems.txt.gz")
    with pytest.raises(StaleStageError, match=r"tok was made with other settings \(corpus\[0\]\.mtime_ns: .*"
                                              r"corpus\[0\]\.path: .*one_line.txt\" → .*poems.txt.gz\";"
                                              r".*; pass --retrain"):
        _tiny_train(real, 300, out)
    with pytest.raises(StaleStageError, match=r"vocab_size: 300 → 400"):
        _tiny_train(tiny, 400, out)
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp  # refused: nothing rewritten
    hf = _tiny_train(real, 300, out, max_docs=200, retrain=True)
    assert len(hf) == 300 and json.loads((out / "tokenizer.json").read_text()) != small


@needs_corpus
def test_legacy_tokenizer_folder_without_stage_record_is_retrained(tmp_path):
    tiny = tmp_path / "one_line.txt"
    tiny.write_text("Only one short line here.\n")
    out = tmp_path / "tok"
    _tiny_train(tiny, 300, out)
    (out / STAGE_FILE).unlink()  # what an older vegalm left: files, no key
    hf = _tiny_train(str(DATA / "gutenberg" / "blake-poems.txt.gz"), 300, out, max_docs=200)
    assert len(hf) == 300 and (out / STAGE_FILE).is_file()


@needs_corpus
def test_someone_elses_tokenizer_folder_is_not_overwritten(tmp_path):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "tokenizer.json").write_text("{}")
    with pytest.raises(VegaError, match="already holds tokenizer.json, which vegalm did not write"):
        _tiny_train(str(WIKI / "wiki-002.txt.gz"), 300, tmp_path / "theirs", max_docs=50)
    assert (tmp_path / "theirs" / "tokenizer.json").read_text() == "{}"


@needs_corpus
def test_degenerate_vocabulary_warns_loudly(tmp_path, capsys, caplog):
    tiny = tmp_path / "one_line.txt"
    tiny.write_text("Only one short line here.\n")
    with caplog.at_level("WARNING", logger="vegalm.data.tokenizer"):
        hf = _tiny_train(tiny, 1000, tmp_path / "tok")
    line = f"tokenizer: only {len(hf)} pieces for 1000 asked"
    assert len(hf) < 500
    assert any(line in r.getMessage() for r in caplog.records)
    err = capsys.readouterr().err.splitlines()
    assert sum(line in e for e in err) == 1
    capsys.readouterr()
    _tiny_train(str(DATA / "gutenberg" / "blake-poems.txt.gz"), 300, tmp_path / "ok", max_docs=200)
    assert "pieces for" not in capsys.readouterr().err


def test_training_twice_gives_one_tokenizer_json(trained, tmp_path):
    """tokenizers' Unigram trainer orders tied pieces differently from run to run (randomly seeded hash maps);
    canonical_unigram makes the saved file, and so every token id, a function of the corpus and settings."""
    _, first, _ = trained
    train_tokenizer(str(WIKI / "wiki-000.txt.gz"), 1500, tmp_path / "again", max_docs=2000, seed_size=20_000,
                    shrinking_factor=0.5, n_sub_iterations=1, progress=False)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    saved = Tokenizer.from_file(str(first / "tokenizer.json"))
    assert canonical_unigram(saved).to_str() == saved.to_str()  # idempotent
    vocab = json.loads(saved.to_str())["model"]["vocab"]
    assert [p for p, _ in vocab[:len(SPECIAL_TOKENS)]] == list(SPECIAL_TOKENS)
    assert [s for _, s in vocab[len(SPECIAL_TOKENS):]] == sorted((s for _, s in vocab[len(SPECIAL_TOKENS):]),
                                                                 reverse=True)  # fmt: skip
