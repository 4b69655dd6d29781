"""GLUE examples -> model features, the dynamic-padding collate, and the per-task default hyper-parameters.

    ds = GlueDataset.from_examples(load_split("rte", "train", glue_dir), tok, "rte", max_length=256)
    batch = Collator(tok.pad_token_id)([ds[0], ds[1]])   # input_ids/attention_mask/token_type_ids/labels/index
    task_defaults("rte", "vega")                          # TaskDefaults(lr=1e-4, epochs=10, ...)

Tokenisation, padding, batching by length and why each default is what it is: docs/finetuning.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vegalm.data.glue import TASKS, Example, TaskSpec, get_task
from vegalm.errors import VegaError

DEFAULT_SETS = ("vega", "run_glue")


@dataclass(frozen=True)
class TaskDefaults:
    lr: float
    epochs: float
    batch_size: int
    warmup_ratio: float
    max_length: int


_RUN_GLUE = TaskDefaults(lr=2e-5, epochs=3, batch_size=32, warmup_ratio=0.0, max_length=128)
_SMALL = TaskDefaults(lr=1e-4, epochs=3, batch_size=32, warmup_ratio=0.1, max_length=128)  # ELECTRA config

DEFAULTS: dict[str, dict[str, TaskDefaults]] = {
    "run_glue": {task: _RUN_GLUE for task in TASKS},
    "vega": {
        "cola": dataclasses.replace(_SMALL, epochs=5),
        "sst2": _SMALL,
        "mrpc": dataclasses.replace(_SMALL, epochs=10),
        "stsb": dataclasses.replace(_SMALL, epochs=10),
        "qqp": _SMALL,
        "mnli": _SMALL,
        "qnli": _SMALL,
        "rte": dataclasses.replace(_SMALL, epochs=10, max_length=256),
        "wnli": dataclasses.replace(_RUN_GLUE, warmup_ratio=0.1),
        "ax": _SMALL,
    },
}
# Optimizer settings that come with each set (not per task).
SET_OPTIM: dict[str, dict[str, float]] = {
    "run_glue": {"weight_decay": 0.0, "adam_eps": 1e-8},  # transformers TrainingArguments defaults
    "vega": {"weight_decay": 0.01, "adam_eps": 1e-6},  # ELECTRA / DeBERTa fine-tuning
}


def task_defaults(task: str, defaults: str = "vega") -> TaskDefaults:
    """The default hyper-parameters of `task` in set `defaults` ("vega" or "run_glue")."""
    if defaults not in DEFAULTS:
        raise VegaError(f"defaults: expected one of {', '.join(DEFAULT_SETS)}, got {defaults!r}")
    return DEFAULTS[defaults][get_task(task).name]


# ---------------------------------------------------------------------------------------- features


def encode_examples(
    examples: Sequence[Example], tokenizer: Any, spec: TaskSpec | str, max_length: int
) -> list[dict[str, Any]]:
    """Tokenise Examples into features: input_ids, [token_type_ids], index, [labels] (absent for test rows)."""
    spec = get_task(spec) if isinstance(spec, str) else spec
    if max_length < 8:
        raise VegaError(f"max_length: expected >= 8 tokens, got {max_length}")
    if not examples:
        return []
    texts_a = [ex.text_a for ex in examples]
    if spec.is_pair:
        missing = next((ex.guid for ex in examples if ex.text_b is None), None)
        if missing is not None:
            raise VegaError(f"{missing}: {spec.name} is a sentence-pair task but the example has no second text")
        enc = tokenizer(texts_a, [ex.text_b for ex in examples], truncation=True, max_length=max_length)
    else:
        enc = tokenizer(texts_a, truncation=True, max_length=max_length)
    keep = [k for k in ("input_ids", "token_type_ids") if k in enc]
    feats = []
    for i, ex in enumerate(examples):
        f: dict[str, Any] = {k: list(enc[k][i]) for k in keep}
        f["index"] = int(ex.index) if ex.index is not None else i
        if ex.label is not None:
            f["labels"] = float(ex.label) if spec.is_regression else int(ex.label)
        feats.append(f)
    return feats


class GlueDataset(torch.utils.data.Dataset):
    """Map-style dataset of tokenised features (lists of ints; tensors are made by the collator)."""

    def __init__(self, features: list[dict[str, Any]], task: str):
        self.features = features
        self.task = task

    @classmethod
    def from_examples(cls, examples: Sequence[Example], tokenizer: Any, task: str, max_length: int) -> GlueDataset:
        spec = get_task(task)
        return cls(encode_examples(examples, tokenizer, spec, max_length), spec.name)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]

    @property
    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]

    @property
    def has_labels(self) -> bool:
        return bool(self.features) and "labels" in self.features[0]


class Collator:
    """Pad a list of features to the longest one (optionally rounded up to `pad_to_multiple_of`)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise VegaError("the tokenizer has no pad token; dynamic padding needs one")
        self.pad_token_id = int(pad_token_id)
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            longest = -(-longest // self.multiple) * self.multiple
        n = len(features)
        ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        types = torch.zeros((n, longest), dtype=torch.long) if "token_type_ids" in features[0] else None
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[i, :k] = 1
            if types is not None:
                types[i, :k] = torch.tensor(f["token_type_ids"], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            batch["token_type_ids"] = types
        if "labels" in features[0]:
            regression = isinstance(features[0]["labels"], float)
            batch["labels"] = torch.tensor([f["labels"] for f in features],
                                           dtype=torch.float32 if regression else torch.long)
        batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
        return batch
