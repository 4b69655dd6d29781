"""Honest health metrics for RTD / MLM pretraining (docs/pretraining.md, "Health metrics").

`disc_acc` is uninformative (predicting the prior scores 1 - replaced_frac), so we log what a
prior-only discriminator cannot fake: the loss in excess of the prior's entropy, the replaced-token
ROC AUC, precision / recall at p = 0.5, the generator's loss beside the corpus unigram entropy, and
the same on a held-out set of packed segments every `health.eval_every` steps (`HealthCallback`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from vegalm.train.ema import unwrap


@dataclass
class HealthConfig:
    heldout_segments: int = field(default=512, metadata={"help": "packed segments kept out of training for the "
                                                                 "held-out metrics (0: none)"})  # fmt: skip
    eval_every: int = field(default=250, metadata={"help": "optimizer steps between held-out evaluations "
                                                           "(evaluated at the first log step past each multiple, "
                                                           "and at the last step)"})  # fmt: skip
    eval_batch_size: int = field(default=64, metadata={"help": "segments per held-out forward pass"})
    seed: int = field(default=1234, metadata={"help": "seeds the held-out split and its masks / samples (the "
                                                      "same corruption at every evaluation)"})  # fmt: skip
    sts_dev: str | None = field(default="../shared/data/glue/STS-B/dev.tsv",
                                metadata={"path": True, "help": "STS-B dev TSV for the zero-shot probe after each phase (probe.py); "
                                                  "None or a missing file: skipped"})  # fmt: skip
    sts_pooling: str = field(default="cls", metadata={"help": "cls | mean: the probe's sentence embedding"})


def binary_entropy(p: float) -> float:
    """Entropy in nats of a Bernoulli(p): the loss of always predicting the base rate p."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties sharing their average rank (as scipy.stats.rankdata)."""
    x = x.flatten().double()
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC (Mann-Whitney U / n_pos n_neg); nan when a class is absent."""
    labels = labels.flatten().bool()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = average_ranks(scores)
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def rtd_stats(logits: torch.Tensor, replaced: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """Discriminator health on the real (non-padding) tokens: loss, excess over the prior, AUC, P/R at 0.5."""
    real = real.bool()
    s, y = logits.detach().float()[real], replaced[real].float()
    if y.numel() == 0:
        return {}
    loss = float(torch.nn.functional.binary_cross_entropy_with_logits(s, y))
    frac = float(y.mean())
    pred = s > 0  # sigmoid(s) > 0.5
    tp = float((pred & (y > 0)).sum())
    return {
        "rtd_excess": loss - binary_entropy(frac),  # < 0: better than the prior; ~0: not learning
        "rtd_auc": roc_auc(s, y),
        "rtd_precision": tp / max(float(pred.sum()), 1.0),
        "rtd_recall": tp / max(float(y.sum()), 1.0),
    }


def unigram_distribution(input_ids: np.ndarray, special_ids: tuple[int, ...], vocab_size: int) -> torch.Tensor:
    """The corpus's token frequencies over non-special tokens (float64, sums to 1)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(input_ids), 8192):  # chunks: the memmap is never read whole into memory
        counts += np.bincount(np.asarray(input_ids[start : start + 8192]).ravel(), minlength=vocab_size)[:vocab_size]
    counts[list(special_ids)] = 0
    return torch.from_numpy(counts / counts.sum())


def unigram_entropy(p: torch.Tensor) -> float:
    """Entropy (nats) of a unigram distribution: the loss of a generator that ignores context, which a learning
    generator must go below."""
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def split_heldout(n: int, k: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): k segments drawn with `seed`, the rest in store order."""
    if k <= 0:
        return list(range(n)), []
    held = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    mask = torch.ones(n, dtype=torch.bool)
    mask[held] = False
    return torch.nonzero(mask).flatten().tolist(), sorted(held.tolist())


class TokenCosine:
    """Mean pairwise cosine similarity of an encoder's output vectors over the real tokens it has seen (a forward
    hook). Near 1, every position carries the same vector: the encoder has collapsed and its head can only output
    a constant, which is how a discriminator stuck at the prior looks from inside (docs/pretraining.md)."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.n = 0
        self.mask: torch.Tensor | None = None

    def add(self, h: torch.Tensor, mask: torch.Tensor) -> None:
        """Count the vectors h[mask] ([B, L, H] and [B, L])."""
        u = torch.nn.functional.normalize(h.float()[mask.bool()], dim=-1)
        self.sum = u.sum(0) if self.sum is None else self.sum + u.sum(0)
        self.n += u.shape[0]

    def hook(self, module, args, out) -> None:
        if self.mask is None:  # only the first call per batch: phase 2's SimCSE views call the encoder again
            return
        self.add(out.last_hidden_state, self.mask)
        self.mask = None

    def value(self) -> float:
        if self.sum is None or self.n < 2:
            return float("nan")
        return float((self.sum.pow(2).sum() - self.n) / (self.n * (self.n - 1)))  # the off-diagonal mean of U U^T


def _encoder(model):
    """The encoder whose collapse is watched: the discriminator's (RTD) or the MLM model's, under any DDP wrapper."""
    model = unwrap(model)
    part = getattr(model, "discriminator", None) or getattr(model, "mlm", None)
    return getattr(part, "deberta", None)


@torch.no_grad()
def evaluate(model, batches: list[dict], seed: int, autocast=None, unigram: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out metrics of an RTDModel / MLMModel on fixed batches, with fixed masks and samples.

    With `unigram` (the corpus's token distribution), an RTD model also gets `heldout_context_auc`: the AUC against
    replacements drawn from that distribution instead of from the generator. A token is then as likely to be a
    replacement as an original whatever its identity, so only context can score above 0.5; the generator's samples
    let a discriminator score from rare tokens alone. The global RNG is forked, so training draws the same masks as
    without the evaluation."""
    device = next(model.parameters()).device
    was_training = model.training
    logits, replaced, real, mlm, n = [], [], [], 0.0, 0
    ctx_logits, ctx_replaced = [], []
    cos, enc = TokenCosine(), _encoder(model)
    handle = enc.register_forward_hook(cos.hook) if enc is not None else None
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.eval()
        try:
            for b in batches:
                ids, am = b["input_ids"].to(device), b["attention_mask"].to(device)
                cos.mask = am
                with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
                    out = model(input_ids=ids, attention_mask=am)
                mlm += out["logs"]["mlm_loss"] * len(ids)
                n += len(ids)
                if "disc_logits" in out:
                    logits.append(out["disc_logits"].float().cpu().flatten())
                    replaced.append(out["replaced"].cpu().flatten())
                    real.append(am.cpu().flatten() > 0)
                    if unigram is not None:
                        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
                            ctx = model(input_ids=ids, attention_mask=am, replace_from=unigram.to(device))
                        ctx_logits.append(ctx["disc_logits"].float().cpu().flatten())
                        ctx_replaced.append(ctx["replaced"].cpu().flatten())
        finally:
            model.train(was_training)
            if handle is not None:
                handle.remove()
    res = {"heldout_mlm_loss": mlm / max(n, 1)}
    if enc is not None:
        res["heldout_token_cos"] = cos.value()
    if logits:
        stats = rtd_stats(torch.cat(logits), torch.cat(replaced), torch.cat(real))
        res.update({f"heldout_{k}": v for k, v in stats.items()})
    if ctx_logits:
        mask = torch.cat(real)
        res["heldout_context_auc"] = roc_auc(torch.cat(ctx_logits)[mask], torch.cat(ctx_replaced)[mask])
    return res


def build_health(cfg: HealthConfig, store, collate, special_ids: tuple[int, ...], vocab_size: int):
    """(training dataset without the held-out segments, HealthCallback) for one segment store."""
    from torch.utils.data import Subset

    train_idx, held_idx = split_heldout(len(store), cfg.heldout_segments, cfg.seed)
    batches = [collate([store[i] for i in held_idx[j : j + cfg.eval_batch_size]])
               for j in range(0, len(held_idx), cfg.eval_batch_size)]  # fmt: skip
    unigram = unigram_distribution(store.input_ids, special_ids, vocab_size)  # the whole corpus, held-out included
    return (Subset(store, train_idx) if held_idx else store), HealthCallback(batches, cfg, unigram)


class HealthCallback:
    """Trainer callback: adds the unigram baseline to every log line, the held-out metrics every
    `eval_every` steps (logged to metrics.jsonl and TensorBoard with the rest of the line)."""

    def __init__(self, heldout_batches: list[dict], cfg: HealthConfig, unigram: torch.Tensor | None):
        self.batches, self.cfg, self.distribution = heldout_batches, cfg, unigram
        self.unigram = unigram_entropy(unigram) if unigram is not None else None
        self.last_eval: dict[str, float] = {}

    def extra_metrics(self, trainer, metrics: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.unigram is not None:
            out["unigram_entropy"] = self.unigram
            if metrics.get("mlm_loss") is not None:
                out["gen_excess_unigram"] = metrics["mlm_loss"] - self.unigram  # < 0: the generator uses context
        step, every, window = trainer.step, self.cfg.eval_every, trainer.cfg.log_every
        crossed = every > 0 and step // every != max(step - window, 0) // every
        if self.batches and (crossed or step == trainer.max_steps):
            self.last_eval = evaluate(trainer.model, self.batches, self.cfg.seed, trainer.accelerator.autocast,
                                      self.distribution)
            out.update(self.last_eval)
        return out


__all__ = ["HealthConfig", "HealthCallback", "TokenCosine", "binary_entropy", "average_ranks", "roc_auc", "rtd_stats",
           "unigram_distribution", "unigram_entropy", "split_heldout", "evaluate", "build_health"]
