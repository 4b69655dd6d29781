"""vegalm: the Vega v1 recipe (DeBERTa-style encoder, RTD + GDES pretraining, contrastive phase 2, GLUE tricks)."""

__version__ = "0.1.0"
