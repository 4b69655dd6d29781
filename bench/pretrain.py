"""RTD pretraining step: vegalm vs a naive RTD loop built from transformers' DebertaV2 classes.

    python bench/pretrain.py            # B32 x S128, vocab 32k, fp32, 5 timed steps each
    python bench/pretrain.py --quick    # 3 timed steps, smaller tokenizer sample
    python bench/pretrain.py --dtype bf16 --shape xsmall   # bf16 autocast; DeBERTa-v3-xsmall's 12x384 shape

Naive loop (what users write today): `DebertaV2ForMaskedLM` generator computing full-vocabulary
logits at every position, multinomial sampling, a `DebertaV2ForTokenClassification`-style
discriminator (num_labels=1, BCE), ELECTRA-style plain embedding sharing, AdamW.
Ours: `vegalm.pretrain.rtd.RTDModel` (masked-position generator logits, fused disentangled
attention, GDES). Same tiny sizes (discriminator 4x256, generator 2x256, vocab 32k, sequence
128), same masking code, same optimizer; the two alternate step by step in one process and
each figure is the median of the timed steps after 2 warm-up steps (torch.set_num_threads(2)).

Also measured: tokenization throughput of the corpus pipeline (MB/s of raw text, real corpus).
The last stdout line is one JSON object with `speedup_rtd`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vegalm.model import EncoderConfig
from vegalm.pretrain.masking import mask_tokens, special_positions
from vegalm.pretrain.rtd import ObjectiveConfig, RTDModel, generator_config

V, B, L = 32000, 32, 128
SHAPES = {  # discriminators; each generator is generator_config's narrow ELECTRA-style half-depth model
    "tiny": EncoderConfig(vocab_size=V, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=1024),
    "xsmall": EncoderConfig(vocab_size=V, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                            intermediate_size=1536),  # DeBERTa-v3-xsmall's shape (its vocabulary is 128k)
}
DISC = SHAPES["tiny"]
SPECIAL, MASK = (1, 2, 0), 4
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"


def naive_models(disc_cfg: EncoderConfig = DISC):
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM, DebertaV2ForTokenClassification

    def hf_cfg(c: EncoderConfig, **kw):
        return DebertaV2Config(**c.to_hf_dict(), **kw)

    gen = DebertaV2ForMaskedLM(hf_cfg(generator_config(disc_cfg, ObjectiveConfig()), legacy=False))
    disc = DebertaV2ForTokenClassification(hf_cfg(disc_cfg, num_labels=1))
    disc.deberta.embeddings.word_embeddings = gen.deberta.embeddings.word_embeddings  # ELECTRA sharing
    return torch.nn.ModuleDict({"gen": gen, "disc": disc})


def _autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


def naive_step_fn(models, ids, att, opt, dtype: str = "fp32"):
    def step():
        special = special_positions(ids, att, SPECIAL)
        masked, labels = mask_tokens(ids, special, MASK, V)
        with _autocast(dtype):
            g = models["gen"](input_ids=masked, attention_mask=att, labels=labels)  # full [B, L, V] logits
        with torch.no_grad():
            sel = labels != -100
            probs = g.logits[sel].float().softmax(-1)
            corrupted = ids.clone()
            corrupted[sel] = torch.multinomial(probs, 1).squeeze(-1)
            replaced = ((corrupted != ids) & (att > 0)).float()
        with _autocast(dtype):
            d = models["disc"](input_ids=corrupted, attention_mask=att).logits.squeeze(-1)
        rtd = F.binary_cross_entropy_with_logits(d[att > 0].float(), replaced[att > 0])
        (g.loss + 50.0 * rtd).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ours_step_fn(model, ids, att, opt, dtype: str = "fp32"):
    def step():
        with _autocast(dtype):
            loss = model(ids, att)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure_tokenization_mbps(tokenizer, paths, max_mb: float = 5) -> float:
    """Tokenizer throughput in MB/s (1 MB = 1e6 UTF-8 bytes) on the first `max_mb` MB of documents.

    Times only the batch encoding that `build_segments` uses (`encode_fast`, on all cores through the
    tokenizers thread pool), not reading or packing.
    """
    from tokenizers import Tokenizer

    from vegalm.data.documents import iter_documents
    from vegalm.data.packing import encode_fast, tokenizer_identity

    tok = Tokenizer.from_str(tokenizer_identity(tokenizer)[0])
    docs, nbytes = [], 0
    for doc in iter_documents(paths):
        docs.append(doc)
        nbytes += len(doc.encode("utf-8"))
        if nbytes >= max_mb * 1e6:
            break
    start = time.perf_counter()
    encode_fast(tok, docs)
    return nbytes / 1e6 / (time.perf_counter() - start)


def tokenization_mbps(quick: bool) -> float | None:
    from vegalm.data.tokenizer import train_tokenizer

    files = sorted(CORPUS.glob("wikipedia/*.txt.gz"))
    if not files:
        return None
    with tempfile.TemporaryDirectory() as d:
        tok = train_tokenizer(files[:1], 8000, d, max_docs=1000 if quick else 3000)
        return measure_tokenization_mbps(tok, files[1:2], max_mb=2 if quick else 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, both loops")
    ap.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    ap.add_argument("--no-tokenize", action="store_true", help="skip the tokenization throughput")
    args = ap.parse_args()
    disc = SHAPES[args.shape]
    torch.set_num_threads(2)
    repeats = 3 if args.quick else args.repeats
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    att = torch.ones(B, L, dtype=torch.long)
    naive = naive_models(disc).train()
    ours = RTDModel(disc, ObjectiveConfig(), MASK, SPECIAL).train()
    steps = {
        "naive_hf": naive_step_fn(naive, ids, att, torch.optim.AdamW(naive.parameters(), lr=1e-5), args.dtype),
        "ours": ours_step_fn(ours, ids, att, torch.optim.AdamW(ours.parameters(), lr=1e-5), args.dtype),
    }
    times = {k: [] for k in steps}
    for i in range(2 + repeats):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            if i >= 2:
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tok_s = {k: B * L / v for k, v in med.items()}
    print(f"{'':<10}{'s/step':>9}{'tokens/s':>10}")
    for k in steps:
        print(f"{k:<10}{med[k]:>9.3f}{tok_s[k]:>10.0f}")
    mbps = None if args.no_tokenize else tokenization_mbps(args.quick)
    if mbps is not None:
        print(f"tokenization (corpus pipeline, 8k Unigram, 2 cores): {mbps:.2f} MB/s")
    print(json.dumps({
        "speedup_rtd": round(med["naive_hf"] / med["ours"], 3),
        "naive_tok_s": round(tok_s["naive_hf"]), "ours_tok_s": round(tok_s["ours"]),
        "tokenize_mb_s": None if mbps is None else round(mbps, 2),
        "batch": B, "seq_len": L, "vocab": V, "repeats": repeats, "dtype": args.dtype, "shape": args.shape,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
