"""Encoder configuration and the size recipes.

Field names follow transformers' `DebertaV2Config` so that `config.json` converts
one to one and the same names work in YAML recipes and `model.hidden_size=...`
overrides.

Size recipes (all DeBERTa-v3 style: shared attention keys, 256 log buckets,
layer-normed relative embeddings, no absolute positions in the input):

| name      | layers | hidden | heads | FFN   | non-embedding params |
|-----------|--------|--------|-------|-------|----------------------|
| tiny      | 4      | 256    | 4     | 1024  | 3.2M   (CPU default)  |
| xsmall    | 12     | 384    | 6     | 1536  | 21M   (DeBERTa-v3-xsmall) |
| small     | 6      | 768    | 12    | 3072  | 43M   (DeBERTa-v3-small) |
| base      | 12     | 768    | 12    | 3072  | 86M   (DeBERTa-v3-base) |
| large     | 24     | 1024   | 16    | 4096  | 303M  (DeBERTa-v3-large) |
| vega-1.3b | 48     | 1536   | 24    | 6144  | 1.36B (DeBERTa-xxlarge-v2 shape, the paper's 1.3B) |

Per layer: 4·h² (Q, K, V, out) + 2·h·FFN (two FFN matrices) ≈ 12·h² for FFN = 4h.
48 · 12 · 1536² = 1.359B, matching the ~1.3B of Vega v1. A 128k vocabulary adds
128100 · 1536 = 0.197B of embeddings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vegalm.errors import VegaError


@dataclass
class EncoderConfig:
    vocab_size: int = 32000
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    relative_attention: bool = True
    max_relative_positions: int = -1  # < 1 means max_position_embeddings
    position_buckets: int = 256  # 0 / -1 = no log bucketing
    pos_att_type: list[str] = field(default_factory=lambda: ["p2c", "c2p"])
    share_att_key: bool = True
    norm_rel_ebd: str = "layer_norm"
    position_biased_input: bool = False
    pad_token_id: int = 0
    embedding_size: int | None = None  # None = hidden_size; else an embed_proj maps it up
    pooler_dropout: float = 0.0
    pooler_hidden_act: str = "gelu"
    cls_dropout: float | None = None
    # Not part of the HF format: which attention kernel to use (see model/attention.py).
    attn_impl: str = "auto"  # auto | eager | fused | sdpa | flex  (auto: fused on CPU, sdpa on CUDA)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise VegaError(
                f"model.hidden_size={self.hidden_size} is not a multiple of "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        bad = [t for t in self.pos_att_type if t not in ("c2p", "p2c")]
        if bad:
            raise VegaError(f"model.pos_att_type: unsupported term {bad[0]!r} (supported: c2p, p2c)")
        if self.attn_impl not in ("auto", "eager", "fused", "sdpa", "flex"):
            raise VegaError(f"model.attn_impl={self.attn_impl!r}: expected auto, eager, fused, sdpa or flex")
        if self.hidden_act not in ("gelu", "relu", "gelu_new", "gelu_python", "silu"):
            raise VegaError(f"model.hidden_act={self.hidden_act!r} is not supported")

    # Derived sizes, named as in the DeBERTa papers.
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_rel(self) -> int:
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def att_span(self) -> int:
        """Half the number of relative-position embeddings (k in the DeBERTa paper)."""
        return self.position_buckets if self.position_buckets > 0 else self.max_rel

    @property
    def emb_size(self) -> int:
        return self.embedding_size or self.hidden_size

    # ---- transformers interop -------------------------------------------------------------
    def to_hf_dict(self, **extra: Any) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "attn_impl"}
        if d["embedding_size"] is None:
            d.pop("embedding_size")
        if d["cls_dropout"] is None:
            d.pop("cls_dropout")
        d["pos_att_type"] = list(self.pos_att_type)
        d["model_type"] = "deberta-v2"
        d.update(extra)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "EncoderConfig":
        mt = d.get("model_type")
        if mt != "deberta-v2":
            raise VegaError(f"{source}: model_type {mt!r} is not supported (expected 'deberta-v2')")
        if d.get("conv_kernel_size", 0) and d["conv_kernel_size"] > 0:
            raise VegaError(
                f"{source}: conv_kernel_size={d['conv_kernel_size']} (DeBERTa-v2 convolution layer) is not supported"
            )
        head = d.get("attention_head_size")
        if head is not None and head * d.get("num_attention_heads", 1) != d.get("hidden_size"):
            raise VegaError(f"{source}: attention_head_size={head} != hidden_size/num_attention_heads")
        if d.get("z_steps", 0) and d["z_steps"] > 1:
            raise VegaError(f"{source}: z_steps={d['z_steps']} is not supported")
        pat = d.get("pos_att_type") or []
        if isinstance(pat, str):
            pat = [x.strip() for x in pat.lower().split("|") if x.strip()]
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and k != "attn_impl"}
        kw["pos_att_type"] = list(pat)
        kw.setdefault("position_buckets", -1)  # HF defaults differ from ours: absent = off
        kw.setdefault("share_att_key", False)
        kw.setdefault("norm_rel_ebd", "none")
        kw.setdefault("position_biased_input", True)
        kw.setdefault("relative_attention", False)
        kw.setdefault("type_vocab_size", 0)
        if kw.get("pad_token_id") is None:
            kw["pad_token_id"] = 0
        try:
            return cls(**kw)
        except TypeError as e:
            raise VegaError(f"{source}: {e}") from None


SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "xsmall": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "small": dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "vega-1.3b": dict(hidden_size=1536, num_hidden_layers=48, num_attention_heads=24, intermediate_size=6144),
}


def config_for_size(name: str, **overrides: Any) -> EncoderConfig:
    if name not in SIZES:
        raise VegaError(f"unknown model size {name!r} (known: {', '.join(SIZES)})")
    return EncoderConfig(**{**SIZES[name], **overrides})
