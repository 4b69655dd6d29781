"""Ablation combos: the `--tricks` names of `vegalm ablate`, each a set of tricks plus stages (finetune/stages)."""

from __future__ import annotations

from dataclasses import dataclass

from vegalm.config import ConfigError
from vegalm.finetune.tricks import TRICKS

DEFAULT_COMBOS = "vanilla,adv,selfcal,transductive,all"
VANILLA, TRANSDUCTIVE, ALL, TAPT = "vanilla", "transductive", "all", "tapt"
ALL_TRICKS = ("adv", "selfcal")  # + transductive; docs/ablation.md says why not ema
SET_BY_ABLATION = ("task", "model", "out", "seed", "tricks", "extra_train")
SELF_TRAINING = "self_training"  # the stage names, in the order they run (finetune/stages)


@dataclass(frozen=True)
class Combo:
    name: str
    tricks: tuple[str, ...]
    stages: tuple[str, ...] = ()  # (TAPT, SELF_TRAINING) or a part of it, in that order

    @property
    def transductive(self) -> bool:  # self-training on test pseudo-labels (the `transductive` part)
        return SELF_TRAINING in self.stages

    @property
    def tapt(self) -> bool:  # task-adaptive RTD first; our own encoders only
        return TAPT in self.stages


def _trick_registry() -> list[str]:
    return list(TRICKS)


def valid_combo_names() -> list[str]:
    return [VANILLA, TRANSDUCTIVE, ALL, TAPT] + [t for t in _trick_registry() if t not in (VANILLA, TRANSDUCTIVE, ALL)]


def parse_combos(text: str | list[str]) -> list[Combo]:
    """'vanilla,adv,all' -> Combos; a part joined with '+' adds to the same combo ('adv+ema')."""
    names = text.split(",") if isinstance(text, str) else list(text)
    registry = _trick_registry()
    out: list[Combo] = []
    for raw in (n.strip() for n in names):
        if not raw or raw in (c.name for c in out):
            continue
        tricks: list[str] = []
        transductive = tapt = False
        parts = raw.split("+")
        for part in parts:
            if part == VANILLA and len(parts) == 1:
                continue
            if part == TRANSDUCTIVE:
                transductive = True
            elif part == TAPT:
                tapt = True
            elif part == ALL:
                transductive = True
                tricks += [t for t in ALL_TRICKS if t not in tricks]
            elif part in registry:
                if part not in tricks:
                    tricks.append(part)
            else:
                raise ConfigError(f"tricks: unknown combo {raw!r} (valid: {', '.join(valid_combo_names())}; "
                                  "join parts with '+', e.g. adv+ema)")
        out.append(Combo(raw, tuple(tricks), (TAPT,) * tapt + (SELF_TRAINING,) * transductive))
    if not out:
        raise ConfigError(f"tricks: no combo given (e.g. --tricks {DEFAULT_COMBOS})")
    return out

def _record_name(combo: str, task: str, seed: int) -> str:
    return f"{combo}__{task}__seed{seed}.json"
