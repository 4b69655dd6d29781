"""Zero-shot STS-B: the sentence-embedding probe of SimCSE (Gao et al. 2021, sec. 4 / SentEval).

Each dev sentence is encoded alone, pooled ([CLS] or mean, no projection head, no fine-tuning), and the
cosine similarity of a pair is correlated (Spearman, x 100) with the gold score. Phase 2's SimCSE term
exists to raise this number, so `vegalm pretrain` measures it after phase 1 and after phase 2.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F

from vegalm.pretrain.contrastive import pool
from vegalm.pretrain.health import average_ranks


def read_stsb(path: str | Path, limit: int | None = None) -> tuple[list[str], list[str], list[float]]:
    """(sentence1s, sentence2s, gold scores) of a GLUE STS-B TSV with labels (train or dev)."""
    a, b, y = [], [], []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            a.append(row["sentence1"])
            b.append(row["sentence2"])
            y.append(float(row["score"]))
            if limit is not None and len(y) >= limit:
                break
    return a, b, y


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-12))


@torch.no_grad()
def embed(encoder, tokenizer, sentences: list[str], pooling: str = "cls", max_length: int = 128,
          batch_size: int = 64) -> torch.Tensor:  # fmt: skip
    """Pooled last-layer embeddings [N, H] (fp32) of `sentences` by a VegaModel-like encoder, in eval mode."""
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for i in range(0, len(sentences), batch_size):
            enc = tokenizer(sentences[i : i + batch_size], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")  # fmt: skip
            ids, am = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            h = encoder(ids, am).last_hidden_state.float()
            out.append(pool(h, am, pooling).cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out)


def sts_zero_shot(encoder, tokenizer, path: str | Path, pooling: str = "cls", limit: int | None = None) -> float:
    """Spearman x 100 between cos(emb(s1), emb(s2)) and the gold similarity of an STS-B TSV."""
    a, b, y = read_stsb(path, limit)
    cos = F.cosine_similarity(embed(encoder, tokenizer, a, pooling), embed(encoder, tokenizer, b, pooling), dim=-1)
    return 100.0 * spearman(cos, torch.tensor(y))


def encoder_of(model) -> torch.nn.Module:
    """The encoder to probe in a pretraining model: the RTD discriminator's, or the MLM baseline's."""
    inner = model.discriminator if hasattr(model, "discriminator") else model.mlm
    return inner.deberta


__all__ = ["read_stsb", "spearman", "embed", "sts_zero_shot", "encoder_of"]
