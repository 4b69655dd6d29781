"""Folder names derived from a model argument, shared by the GLUE, WNLI and ablation record writers."""

from __future__ import annotations

import re
from pathlib import Path

from vegalm.config import ConfigError


def model_tag(model: str) -> str:
    """A folder name for a model: the alias itself, else the last two path parts ('runs/pt/discriminator'
    -> 'pt-discriminator'; a Hub id 'org/name' -> 'org-name')."""
    text = str(model).rstrip("/")
    parts = [p for p in Path(text).parts if p not in ("/", ".", "..")][-2:]
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts) or text).strip("-.")
    if not tag:
        raise ConfigError(f"model-tag: cannot derive a tag from model {model!r}; pass --model-tag")
    return tag
