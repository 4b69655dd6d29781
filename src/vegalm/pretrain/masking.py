"""Dynamic masking for MLM and for the RTD generator, with each source's replacement rule (`MASKING`).

Each call draws a fresh mask from the global torch RNG (which the trainer checkpoints), so
masks change every epoch and a resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import torch

from vegalm.errors import VegaError

IGNORE = -100

# (mask_frac, random_frac) of the selected tokens; the rest stay unchanged.
MASKING = {
    "bert": (0.8, 0.1),  # BERT (Devlin et al. 2019, sec. 3.1): 80% [MASK], 10% random, 10% kept
    "electra": (0.85, 0.0),  # ELECTRA (Clark et al. 2020, sec. 3.2 / released code): 85% [MASK], 15% kept
    "deberta-v3": (1.0, 0.0),  # DeBERTa-v3 RTD (He et al. 2021, released code): 100% [MASK]
}
DEFAULT_MASKING = {"rtd": "deberta-v3", "mlm": "bert"}  # objective kind -> rule, when a recipe names none


def masking_fractions(rule: str | None, kind: str, mask_frac: float | None, random_frac: float | None) -> tuple[float, float]:
    """Resolve a recipe's masking: explicit fractions win, else the named rule, else the kind's default."""
    name = rule or DEFAULT_MASKING[kind]
    if name not in MASKING:
        raise VegaError(f"objective.masking={name!r}: expected one of {', '.join(MASKING)}")
    m, r = MASKING[name]
    return (m if mask_frac is None else mask_frac), (r if random_frac is None else random_frac)


def mask_tokens(
    input_ids: torch.Tensor,
    special: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
    first_regular_id: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (corrupted input, labels). labels is -100 except at the chosen positions.

    `special` marks positions that are never chosen ([CLS], [SEP], [PAD]). Of the chosen
    positions, `mask_frac` become [MASK], `random_frac` a random regular token (ids >=
    `first_regular_id`, so never a special token) and the rest stay unchanged.
    """
    if not 0.0 < prob <= 1.0 or mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1.0 + 1e-9:
        raise ValueError(f"bad masking fractions: prob={prob}, mask_frac={mask_frac}, random_frac={random_frac}")
    chosen = (torch.rand(input_ids.shape, device=input_ids.device) < prob) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    u = torch.rand(input_ids.shape, device=input_ids.device)
    to_mask = chosen & (u < mask_frac)
    to_random = chosen & (u >= mask_frac) & (u < mask_frac + random_frac)
    out = input_ids.masked_fill(to_mask, mask_id)
    rand = torch.randint(first_regular_id, vocab_size, input_ids.shape, device=input_ids.device)
    return torch.where(to_random, rand, out), labels


def special_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: tuple[int, ...]) -> torch.Tensor:
    out = attention_mask == 0
    for t in special_ids:
        out |= input_ids == t
    return out
