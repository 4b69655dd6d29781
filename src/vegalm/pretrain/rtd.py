"""Pretraining models: RTD (ELECTRA / DeBERTa-v3) with optional SimCSE term, and the plain MLM baseline.

One RTD step (Clark et al. 2020, arXiv 2003.10555; He et al. 2021, arXiv 2111.09543):
  1. mask 15% of the tokens (`objective.masking`: DeBERTa-v3's 100% [MASK] by default for RTD,
     BERT's 80/10/10 for the MLM baseline) and run the generator (a smaller MLM);
     its vocabulary logits are computed at the masked positions only;
  2. sample a replacement for every masked position from the generator's softmax
     (Gumbel-max, temperature `sample_temperature`), no gradient through the sample;
  3. the discriminator labels every real token original (0) / replaced (1); a sampled token
     equal to the original counts as original;
  4. loss = L_MLM + lambda * L_RTD (+ cl_weight * L_SimCSE in phase 2), lambda = 50 as in both papers:
     the per-token binary loss is ~50x smaller than the vocabulary cross-entropy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from vegalm.model import EncoderConfig, VegaForMaskedLM, VegaForRTD
from vegalm.pretrain.contrastive import ProjectionHead, pool, simcse_loss
from vegalm.pretrain.gdes import reshare_embeddings, share_embeddings
from vegalm.pretrain.health import rtd_stats
from vegalm.pretrain.masking import mask_tokens, masking_fractions, special_positions


@dataclass
class ObjectiveConfig:
    kind: str = "rtd"  # rtd | mlm (the BERT-style baseline)
    mask_prob: float = 0.15
    masking: str | None = None  # bert | electra | deberta-v3 (masking.MASKING); None: deberta-v3 for rtd, bert for mlm
    mask_frac: float | None = None  # of the chosen tokens: [MASK]; None: from `masking`
    random_frac: float | None = None  # random token; the rest stay unchanged; None: from `masking`
    rtd_weight: float = 50.0  # lambda
    embedding_sharing: str = "gdes"  # gdes | shared | none
    gen_num_layers: int | None = None  # None: half the discriminator's depth (DeBERTa-v3)
    gen_hidden_size: int | None = None  # None: the discriminator's width (DeBERTa-v3); ELECTRA uses 1/4-1/3
    gen_intermediate_size: int | None = None  # None: 4 x gen_hidden_size
    gen_num_attention_heads: int | None = None  # None: gen_hidden_size / 64, at least 1
    sample_temperature: float = 1.0
    cl_weight: float = 0.0  # > 0 adds the SimCSE loss (phase 2)
    cl_temperature: float = 0.05
    cl_pooling: str = "cls"  # cls | mean
    cl_views: str = "dropout"  # dropout: two dropout passes of the clean segment (SimCSE);
    # corrupted: the clean segment vs the RTD-corrupted one (reuses the RTD pass: one extra forward, not two)
    cl_projection: bool = True  # SimCSE's training-only MLP over the pooled vector

    def __post_init__(self) -> None:
        from vegalm.errors import VegaError

        checks = {
            "kind": (self.kind, ("rtd", "mlm")),
            "embedding_sharing": (self.embedding_sharing, ("gdes", "shared", "none")),
            "cl_pooling": (self.cl_pooling, ("cls", "mean")),
            "cl_views": (self.cl_views, ("dropout", "corrupted")),
        }
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise VegaError(f"objective.{key}={value!r}: expected one of {', '.join(allowed)}")
        masking_fractions(self.masking, self.kind, self.mask_frac, self.random_frac)  # rejects an unknown rule

    def fractions(self) -> tuple[float, float]:
        """(mask_frac, random_frac) of the selected tokens, resolved from `masking` and the kind."""
        return masking_fractions(self.masking, self.kind, self.mask_frac, self.random_frac)


def generator_config(disc: EncoderConfig, obj: ObjectiveConfig) -> EncoderConfig:
    width = obj.gen_hidden_size or disc.hidden_size
    heads = obj.gen_num_attention_heads or (disc.num_attention_heads if width == disc.hidden_size else max(1, width // 64))
    return dataclasses.replace(
        disc,
        num_hidden_layers=obj.gen_num_layers or max(1, disc.num_hidden_layers // 2),
        hidden_size=width,
        num_attention_heads=heads,
        intermediate_size=obj.gen_intermediate_size or (disc.intermediate_size if width == disc.hidden_size else 4 * width),
        # Sharing needs equal tables: a narrower generator projects from the discriminator's embedding size.
        embedding_size=disc.emb_size if width != disc.emb_size else disc.embedding_size,
    )


class _Base(nn.Module):
    def __init__(self, obj: ObjectiveConfig, mask_id: int, special_ids: tuple[int, ...]):
        super().__init__()
        self.obj, self.mask_id, self.special_ids = obj, mask_id, special_ids

    def _mask(self, input_ids, attention_mask, vocab_size):
        special = special_positions(input_ids, attention_mask, self.special_ids)
        o = self.obj
        return mask_tokens(input_ids, special, self.mask_id, vocab_size, o.mask_prob, *o.fractions(),
                           first_regular_id=max(self.special_ids + (self.mask_id,)) + 1)  # fmt: skip


class RTDModel(_Base):
    """Generator + discriminator (+ SimCSE projection in phase 2). forward() returns {"loss", "logs"}."""

    def __init__(self, disc_cfg: EncoderConfig, obj: ObjectiveConfig, mask_id: int, special_ids: tuple[int, ...]):
        super().__init__(obj, mask_id, special_ids)
        self.generator = VegaForMaskedLM(generator_config(disc_cfg, obj))
        self.discriminator = VegaForRTD(disc_cfg)
        share_embeddings(self.generator, self.discriminator, obj.embedding_sharing)
        self.cl_head = ProjectionHead(disc_cfg.hidden_size) if obj.cl_weight > 0 and obj.cl_projection else None

    @classmethod
    def from_parts(cls, generator: VegaForMaskedLM, discriminator: VegaForRTD, obj: ObjectiveConfig, mask_id: int,
                   special_ids: tuple[int, ...]) -> "RTDModel":
        """Continue an exported pair (tapt.py): the embeddings are re-shared keeping both models' functions."""
        self = cls.__new__(cls)
        _Base.__init__(self, obj, mask_id, special_ids)
        self.generator, self.discriminator = generator, discriminator
        reshare_embeddings(generator, discriminator, obj.embedding_sharing)
        self.cl_head = ProjectionHead(discriminator.config.hidden_size) if obj.cl_weight > 0 and obj.cl_projection else None
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, replace_from: torch.Tensor | None = None,
                **_) -> dict:  # fmt: skip
        """replace_from: a token distribution to draw the replacements from instead of the generator (health.py's
        context-only AUC); the generator still runs, so every process takes the same path under FSDP."""
        o = self.obj
        vocab = self.generator.config.vocab_size
        masked, labels = self._mask(input_ids, attention_mask, vocab)
        gen = self.generator(masked, attention_mask, labels=labels)
        sel = gen["masked_positions"]
        with torch.no_grad():
            if replace_from is not None:
                sampled = torch.multinomial(replace_from.float(), sel.numel(), replacement=True) if sel.numel() else sel
            else:
                logits = gen.logits.float() / max(o.sample_temperature, 1e-6)
                gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_(1e-20, 1.0)))
                sampled = (logits + gumbel).argmax(-1)
            corrupted = input_ids.flatten().index_put((sel,), sampled).view_as(input_ids)
            replaced = (corrupted != input_ids) & (attention_mask > 0)
        disc_out = self.discriminator(corrupted, attention_mask, labels=replaced, output_hidden_states=False)
        loss = gen.loss + o.rtd_weight * disc_out.loss
        with torch.no_grad():
            real = attention_mask > 0
            pred = disc_out.logits > 0
            logs = {
                "mlm_loss": gen.loss.item(),
                "rtd_loss": disc_out.loss.item(),
                "gen_acc": (gen.logits.argmax(-1) == input_ids.flatten()[sel]).float().mean().item() if sel.numel() else 0.0,
                "disc_acc": ((pred == replaced) & real).sum().item() / max(real.sum().item(), 1),
                "replaced_frac": replaced.sum().item() / max(real.sum().item(), 1),
                "tokens": float(real.sum().item()),
                **rtd_stats(disc_out.logits, replaced, real),  # excess over the prior, AUC, P/R (health.py)
            }
        if o.cl_weight > 0:
            cl, acc = self._contrastive(input_ids, attention_mask, corrupted)
            loss = loss + o.cl_weight * cl
            logs.update(cl_loss=cl.item(), cl_acc=acc)
        return {"loss": loss, "logs": logs, "disc_logits": disc_out.logits.detach(), "replaced": replaced,
                "corrupted": corrupted,
                "terms": {"mlm": gen.loss, "rtd": disc_out.loss}}  # the separate losses (tests of GDES' routing)

    def _contrastive(self, input_ids, attention_mask, corrupted):
        enc = self.discriminator.deberta
        o = self.obj
        if o.cl_views == "dropout":
            both = enc(torch.cat([input_ids, input_ids]), torch.cat([attention_mask, attention_mask])).last_hidden_state
            z = pool(both, torch.cat([attention_mask, attention_mask]), o.cl_pooling)
            z1, z2 = z.chunk(2)
        else:
            h1 = enc(input_ids, attention_mask).last_hidden_state
            h2 = enc(corrupted, attention_mask).last_hidden_state
            z1, z2 = pool(h1, attention_mask, o.cl_pooling), pool(h2, attention_mask, o.cl_pooling)
        if self.cl_head is not None:
            z1, z2 = self.cl_head(z1), self.cl_head(z2)
        return simcse_loss(z1, z2, o.cl_temperature)


class MLMModel(_Base):
    """The BERT-style baseline: one encoder trained with masked language modelling only."""

    def __init__(self, cfg: EncoderConfig, obj: ObjectiveConfig, mask_id: int, special_ids: tuple[int, ...]):
        super().__init__(obj, mask_id, special_ids)
        self.mlm = VegaForMaskedLM(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> dict:
        masked, labels = self._mask(input_ids, attention_mask, self.mlm.config.vocab_size)
        out = self.mlm(masked, attention_mask, labels=labels)
        sel = out["masked_positions"]
        with torch.no_grad():
            acc = (out.logits.argmax(-1) == input_ids.flatten()[sel]).float().mean().item() if sel.numel() else 0.0
        return {
            "loss": out.loss,
            "logs": {"mlm_loss": out.loss.item(), "gen_acc": acc, "tokens": float(attention_mask.sum().item())},
        }


def objective(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """The Trainer's objective: one call of the (possibly DDP-wrapped) pretraining model."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out["loss"], out["logs"]


def build_pretrain_model(cfg: EncoderConfig, obj: ObjectiveConfig, mask_id: int, special_ids: tuple[int, ...]):
    return (RTDModel if obj.kind == "rtd" else MLMModel)(cfg, obj, mask_id, special_ids)


__all__ = ["ObjectiveConfig", "RTDModel", "MLMModel", "objective", "build_pretrain_model", "generator_config"]
