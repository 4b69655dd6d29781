"""`vegalm tokenizer train`: train the SentencePiece-style Unigram tokenizer."""

from __future__ import annotations


def register(sub, formatter) -> None:
    tok = sub.add_parser("tokenizer", help="tokenizer tools", formatter_class=formatter,
                         description="Tokenizer tools (one action so far: train).\n\n"
                         "example: vegalm tokenizer train --corpus '../shared/data/corpus/*/*.gz' --vocab-size 8000 "
                         "--out runs/tok")
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    p = tsub.add_parser(
        "train",
        help="train a Unigram tokenizer on a text corpus",
        description="Train a DeBERTa-v3-style Unigram tokenizer ([PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 [MASK]=4)\n"
        "and save it so that transformers.AutoTokenizer.from_pretrained(OUT) loads it.\n\n"
        "example: vegalm tokenizer train --corpus '../shared/data/corpus/*/*.gz' --vocab-size 8000 "
        "--max-docs 20000 --out runs/tok",
        formatter_class=formatter,
    )
    p.add_argument("--corpus", required=True, help="glob, folder, file or comma-separated list (.txt or .txt.gz)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--max-docs", type=int, default=None, help="train on the first N documents only")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_train)


def _train(args) -> int:
    from vegalm.data.tokenizer import tokenizer_train_main

    return tokenizer_train_main(args.corpus, args.vocab_size, args.out, args.max_docs)
