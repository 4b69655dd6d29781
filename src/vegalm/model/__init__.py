"""DeBERTa-v2/v3 encoder (disentangled attention) with HF-compatible checkpoints."""

from vegalm.model.config import SIZES, EncoderConfig, config_for_size
from vegalm.model.modeling import (
    VegaForMaskedLM,
    VegaForRTD,
    VegaForSequenceClassification,
    VegaModel,
    VegaPreTrained,
)

__all__ = [
    "SIZES",
    "EncoderConfig",
    "config_for_size",
    "VegaForMaskedLM",
    "VegaForRTD",
    "VegaForSequenceClassification",
    "VegaModel",
    "VegaPreTrained",
]
