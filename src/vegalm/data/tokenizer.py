"""SentencePiece-style Unigram tokenizer, trained from the pretraining corpus (as DeBERTa-v3 does).

The pipeline mirrors the Hugging Face fast DeBERTa-v3 tokenizer:

- normaliser: NFKC, control characters removed, every whitespace run (newlines included) -> one space, stripped.
  Case is KEPT: DeBERTa-v3 is a cased model, and cased text costs little at vocabularies of 32k and up.
- pre-tokeniser: Metaspace (space -> "▁", a "▁" prepended to the text), so pieces carry their leading space and
  decoding is lossless up to normalisation.
- model: Unigram (the SentencePiece default), trained with `tokenizers`.
- fixed special ids: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 [MASK]=4.
- post-processor: `[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]`, token_type_ids 0 for A (with its [CLS]/[SEP]) and 1
  for B (with its [SEP]).

The folder written by `train_tokenizer` loads with `transformers.AutoTokenizer.from_pretrained(out_dir)`. Its
`tokenizer_config.json` names `PreTrainedTokenizerFast` (transformers 5 maps it to `TokenizersBackend`), which runs
tokenizer.json verbatim, so ids, token_type_ids, attention masks and truncation match the `tokenizers` object
exactly. We do not name a DeBERTa class: in transformers 5 those rebuild their own pipeline.

Usage:

    from vegalm.data.tokenizer import train_tokenizer, load_tokenizer
    tok = train_tokenizer("../shared/data/corpus/wikipedia/*.txt.gz", vocab_size=32000, out_dir="runs/tok")
    tok = load_tokenizer("runs/tok")          # or a Hub name such as "microsoft/deberta-v3-base" when online
    tok("A first sentence.", "A second one.")  # input_ids, token_type_ids, attention_mask

CLI (wired by the lead): `vegalm tokenizer train --corpus GLOB --vocab-size N --out DIR [--max-docs N]`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm

from vegalm.cache import check_stage, clear_stage, stage_key, write_stage
from vegalm.data.documents import DEFAULT_MAX_DOC_CHARS, DEFAULT_MAX_LINE_CHARS, CorpusStats, open_corpus
from vegalm.errors import VegaError
from vegalm.io import atomic_write_json

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")
PAD_ID, CLS_ID, SEP_ID, UNK_ID, MASK_ID = range(len(SPECIAL_TOKENS))
# DeBERTa's default maximum position; only used by transformers for its "sequence too long" warning.
DEFAULT_MODEL_MAX_LENGTH = 512
# C0/C1 control characters except tab/newline/CR (those become spaces), plus zero-width space/joiners and the BOM.
_CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\ufeff]"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
INFO_FILE = "vegalm_tokenizer.json"
# The files save_tokenizer writes: a folder holding one of them but no INFO_FILE is someone else's tokenizer.
_WRITTEN = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FORMAT_VERSION = 1  # bump when the pipeline (normaliser, pre-tokeniser, specials) changes what training gives
_SMALL_VOCAB = 0.5  # warn when training ends below this fraction of the requested vocabulary


def new_unigram_tokenizer() -> Tokenizer:
    """An untrained tokenizer with the normaliser, pre-tokeniser and decoder described in the module docstring."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Replace(Regex(_CONTROL_CHARS), ""),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return tok


def _post_processor() -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)],
    )


SCORE_DECIMALS = 6  # trained log-probabilities differ across runs by ~1e-15 (below); 1e-6 keeps ~7 digits
_CHAR_STEP = 1e-4  # the trainer appends required characters at min_score, min_score - 1e-4, ... (then flat)


def canonical_unigram(tok: Tokenizer) -> Tokenizer:
    """The same Unigram model made a function of the corpus and settings alone: scores rounded to SCORE_DECIMALS,
    the pieces after the special tokens ordered by (score descending, piece), and the trailing block of required
    single characters (scores min, min - 1e-4, ...) reassigned those scores in code-point order.

    `tokenizers`' Unigram trainer iterates randomly seeded hash maps, parallel or not: three trainings of the same
    1000 documents here gave one set of pieces but three id orders (scores differing in the 15th digit, required
    characters given their scores in another order), and so different token ids for the same text.
    """
    spec = json.loads(tok.to_str())
    model = spec["model"]
    if model.get("type") != "Unigram":
        raise VegaError(f"canonical_unigram: expected a Unigram model, got {model.get('type')}")
    n = len(SPECIAL_TOKENS)
    head = [list(x) for x in model["vocab"][:n]]
    if [piece for piece, _ in head] != list(SPECIAL_TOKENS):
        raise VegaError(f"canonical_unigram: the first pieces are {[p for p, _ in head]}, expected {SPECIAL_TOKENS}")
    rest = sorted(([piece, round(score, SCORE_DECIMALS)] for piece, score in model["vocab"][n:]),
                  key=lambda x: (-x[1], x[0]))  # fmt: skip
    start = len(rest)  # the required-characters block: single characters whose scores step by 0 or -1e-4
    while start > 1 and len(rest[start - 1][0]) == 1 and round(rest[start - 2][1] - rest[start - 1][1], 5) in (
            0.0, _CHAR_STEP):  # fmt: skip
        start -= 1
    if start > 0 and len(rest[start - 1][0]) == 1:  # the block's first character (at min_score) steps from a
        start -= 1  # learned piece's score: it stopped the scan, yet it is one of the reassigned characters
    block = rest[start:]
    rest[start:] = [[piece, score] for piece, score in zip(sorted(p for p, _ in block), [s for _, s in block])]
    model["vocab"] = head + rest
    return Tokenizer.from_str(json.dumps(spec))


def _check_special_ids(tok: Tokenizer, where: str) -> None:
    for want, token in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(token)
        if got != want:
            raise VegaError(f"{where}: special token {token} has id {got}, expected {want}")


def train_tokenizer(
    files: list[str | Path] | str | Path,
    vocab_size: int,
    out_dir: str | Path,
    max_docs: int | None = None,
    max_chars: int | None = None,
    *,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    seed_size: int = 1_000_000,
    shrinking_factor: float = 0.75,
    n_sub_iterations: int = 2,
    max_piece_length: int = 16,
    progress: bool = True,
    retrain: bool = False,
) -> Any:
    """Train a Unigram tokenizer on documents from `files` (paths, a glob, or a folder; .txt or .txt.gz; `hf:` spec).

    `max_docs` / `max_chars` cap how much text is read. The keyword-only knobs are the Unigram trainer's
    (defaults = `tokenizers`/SentencePiece defaults); tests lower `seed_size` and `shrinking_factor` for speed.
    `out_dir` is a stage (`vegalm.cache`) keyed by the corpus files (path, size, mtime; or the `hf:` spec) and every
    setting above: a finished one with the same key is reused, another key retrains when `retrain`, else
    `StaleStageError`. Returns the saved tokenizer reloaded through `load_tokenizer`, i.e. what later code will see.
    """
    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS) + 1:
        raise VegaError(f"vocab_size: expected an integer above {len(SPECIAL_TOKENS) + 1}, got {vocab_size!r}")
    out_dir = Path(out_dir)
    stats = CorpusStats()
    docs: Iterable[str]
    docs, sources = open_corpus(files, stats, max_docs=max_docs, max_chars=max_chars)
    trainer_args = {"seed_size": seed_size, "shrinking_factor": shrinking_factor,
                    "n_sub_iterations": n_sub_iterations, "max_piece_length": max_piece_length}
    key = stage_key(format=FORMAT_VERSION, corpus=sources, vocab_size=vocab_size, max_docs=max_docs,
                    max_chars=max_chars, max_line_chars=DEFAULT_MAX_LINE_CHARS, max_doc_chars=DEFAULT_MAX_DOC_CHARS,
                    model_max_length=model_max_length, trainer=trainer_args)
    if check_stage(out_dir, key, retrain=retrain) == "done":
        log.info("tokenizer: %s matches its corpus and settings; reused", out_dir)
        return load_tokenizer(out_dir)
    foreign = next((n for n in _WRITTEN if (out_dir / n).exists()), None)
    if foreign is not None and not (out_dir / INFO_FILE).is_file():
        raise VegaError(f"tokenizer: {out_dir} already holds {foreign}, which vegalm did not write (no {INFO_FILE}); "
                        "not overwriting it")
    docs = tqdm(docs, total=max_docs, unit="doc", desc="tokenizer: reading", disable=not progress)

    tok = new_unigram_tokenizer()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # added first, in this order -> ids 0..4
        unk_token="[UNK]",
        show_progress=progress,
        seed_size=seed_size,
        shrinking_factor=shrinking_factor,
        n_sub_iterations=n_sub_iterations,
        max_piece_length=max_piece_length,
    )
    start = time.perf_counter()
    tok.train_from_iterator(docs, trainer=trainer)
    seconds = time.perf_counter() - start
    if stats.docs == 0:
        raise VegaError(f"no documents found in {', '.join(str(x.get('path', x.get('hub'))) for x in sources)}")
    tok = canonical_unigram(tok)
    tok.post_processor = _post_processor()
    _check_special_ids(tok, "trained tokenizer")
    clear_stage(out_dir)  # the old files are about to be replaced
    save_tokenizer(tok, out_dir, model_max_length=model_max_length)
    _warn_if_small(tok.get_vocab_size(), vocab_size, stats)
    info = {
        "vocab_size_requested": vocab_size,
        "vocab_size": tok.get_vocab_size(),
        "train_seconds": round(seconds, 2),
        "files": [x.get("path", x.get("hub")) for x in sources],
        "corpus_stats": stats.as_dict(),
        "max_docs": max_docs,
        "max_chars": max_chars,
        "trainer": trainer_args,
    }
    atomic_write_json(out_dir / INFO_FILE, info)
    write_stage(out_dir, key)  # last: its presence marks a finished tokenizer
    return load_tokenizer(out_dir)


def _warn_if_small(got: int, asked: int, stats: CorpusStats) -> None:
    """A vocabulary far below the one asked for means the corpus was too small for it: say so loudly."""
    if got >= _SMALL_VOCAB * asked:
        return
    msg = (f"tokenizer: only {got} pieces for {asked} asked ({stats.docs} documents, {stats.bytes} bytes read); "
           "the corpus is too small for this vocab_size")
    log.warning(msg)
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> None:
    """Write tokenizer.json + tokenizer_config.json so that `AutoTokenizer.from_pretrained(out_dir)` loads it."""
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # keep decode faithful ("a ." stays "a .")
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],  # token_type_ids are off by default
    )
    hf.save_pretrained(str(out_dir))
    # transformers 5 writes its internal name "TokenizersBackend"; the public alias loads in transformers 4 and 5.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_json(cfg_path, cfg, ensure_ascii=False)


def load_tokenizer(path_or_name: str | Path) -> Any:
    """`AutoTokenizer.from_pretrained` for a local folder or a Hub name ("microsoft/deberta-v3-base").

    A local-looking path that does not exist raises VegaError at once (no Hub round trip).
    """
    from transformers import AutoTokenizer

    text = str(path_or_name)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() or not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
            raise VegaError(f"tokenizer: {path} is not a tokenizer folder (no tokenizer.json)")
        return AutoTokenizer.from_pretrained(str(path))
    if isinstance(path_or_name, Path) or not _HUB_NAME.match(text):
        raise VegaError(f"tokenizer not found: {text}")
    try:
        return AutoTokenizer.from_pretrained(text)
    except (OSError, ValueError) as e:
        raise VegaError(
            f"tokenizer {text!r}: not a local folder and could not be loaded from the Hub ({type(e).__name__})"
        ) from None


def backend_tokenizer(tokenizer: Any) -> Tokenizer:
    """The underlying `tokenizers.Tokenizer` of a fast HF tokenizer, a `Tokenizer`, or a path/Hub name."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise VegaError(f"tokenizer: need a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    return backend


def tokenizer_train_main(corpus: str, vocab_size: int, out: str, max_docs: int | None = None,
                         retrain: bool = False) -> int:
    """Body of `vegalm tokenizer train --corpus GLOB --vocab-size N --out DIR [--max-docs N] [--retrain]`."""
    start = time.perf_counter()
    tok = train_tokenizer(corpus, vocab_size, out, max_docs=max_docs, retrain=retrain)
    info = json.loads((Path(out) / INFO_FILE).read_text(encoding="utf-8"))
    stats = info["corpus_stats"]
    print(
        f"tokenizer: Unigram vocab {len(tok)} (asked {vocab_size}) from {stats['docs']} docs "
        f"in {len(info['files'])} files, {time.perf_counter() - start:.1f} s -> {out}"
    )
    return 0
