"""GLUE examples -> model features, dynamic-padding collate, length grouping, and per-task defaults.

    from vegalm.finetune.tasks import GlueDataset, Collator, task_defaults
    tok = AutoTokenizer.from_pretrained("runs/pt/discriminator")
    ds = GlueDataset.from_examples(load_split("rte", "train", glue_dir), tok, "rte", max_length=256)
    batch = Collator(tok.pad_token_id)([ds[0], ds[1]])   # input_ids/attention_mask/token_type_ids/labels/index
    task_defaults("rte", "vega")                          # TaskDefaults(lr=1e-4, epochs=10, ...)

Tokenisation. Single-sentence tasks (CoLA, SST-2) call the tokenizer on text A; pair tasks on (A, B), so
the tokenizer's own pair template applies (`[CLS] A [SEP] B [SEP]`, token_type_ids 0 for A and 1 for B
when the tokenizer returns them). `max_length` truncates with the tokenizer's `longest_first` rule: the
longer of the two texts loses tokens first, so a short hypothesis survives a long premise. Each feature
keeps the example's `index` (the test file's index column, the row number for train/dev), which the
test predictions are written against.

Collate. Batches are padded to their longest member (dynamic padding), not to `max_length`: GLUE
sentences are short (median 10-56 WordPiece tokens, see below), so padding every batch to 128 would
spend most of the compute on padding. `attention_mask` marks real tokens; labels are int64 (classes)
or float32 (STS-B scores); `index` is int64.

Padding costs compute: with random batches of 32 the padded tokens of an epoch are 2.62x the real ones
on RTE (max_length 256), 2.49x on STS-B, 2.03x on CoLA and 1.50x on MRPC (MiniLM-L6 WordPiece, train
sets), and on a CPU the step time follows the padded tokens. Two remedies, both keeping runs
deterministic and checkpoints resumable (they only transform the sampler's seeded permutation):

* Length-sorted micro-batches (`grad_accum=k`, k > 1): each global batch is sorted by length before it
  is cut into its k micro-batches (`sort_within_batches`), so each micro-batch pads to a similar length.
  The examples of every optimizer step, and so the averaged gradient, are those of `grad_accum=1`; only
  the float summation order and the dropout masks' random stream differ. k = 4 brings the padded tokens
  to 1.12-1.30x the real ones (1.05-1.13x at k = 8). Recommended on a CPU, where it was measured
  (bench/length_grouping.py); on a GPU, k micro-batches mean k times the kernel launches (not timed).
* Length grouping (`group_by_length=true`, off by default in both sets, as in transformers): the
  permutation is sorted by length inside chunks of `GROUP_CHUNK` global batches and the batches' order
  is then shuffled with the same seed (`length_grouped_permutation`); padded tokens fall to 1.02-1.05x.
  It changes which examples share a batch, i.e. the optimisation. On MiniLM-L6 (7 task/seed pairs, CPU)
  the mean dev change was -0.02 points, within a seed spread of +-3 (BENCHMARKS.md), which cannot rule
  out a small effect; it stays opt-in.

Per-task defaults (`defaults=` in FinetuneConfig; any field given explicitly wins):

| set      | task  | lr     | epochs | batch | warmup | max_len |
|----------|-------|--------|--------|-------|--------|---------|
| run_glue | all   | 2e-05  | 3      | 32    | 0.0    | 128     |
| vega     | cola  | 1e-04  | 5      | 32    | 0.1    | 128     |
| vega     | sst2  | 1e-04  | 3      | 32    | 0.1    | 128     |
| vega     | mrpc  | 1e-04  | 10     | 32    | 0.1    | 128     |
| vega     | stsb  | 1e-04  | 10     | 32    | 0.1    | 128     |
| vega     | qqp   | 1e-04  | 3      | 32    | 0.1    | 128     |
| vega     | mnli  | 1e-04  | 3      | 32    | 0.1    | 128     |
| vega     | qnli  | 1e-04  | 3      | 32    | 0.1    | 128     |
| vega     | rte   | 1e-04  | 10     | 32    | 0.1    | 256     |
| vega     | wnli  | 2e-05  | 3      | 32    | 0.1    | 128     |
| vega     | ax    | 1e-04  | 3      | 32    | 0.1    | 128     |

`run_glue` is the transformers `run_glue.py` recipe (lr 2e-5, batch 32, 3 epochs, max length 128,
linear decay, no warm-up) with its optimizer defaults (weight decay 0, Adam eps 1e-8); it is the
anchor that `bench/glue_anchor.py` checks our loop against.

`vega` is tuned for SMALL encoders (MiniLM-L6: 6 layers, hidden 384, 22M params; our tiny/xsmall
sizes), with weight decay 0.01 and Adam eps 1e-6. Why each number:
  * lr 1e-4 with 10% warm-up: the ELECTRA fine-tuning defaults (google-research/electra
    configure_finetuning.py: learning_rate 1e-4 for small and base, 5e-5 only for large;
    warmup_proportion 0.1, batch 32, max_seq_length 128). Google's BERT miniatures (2-12 layers,
    hidden 128-768; google-research/bert README) choose lr from {3e-4, 1e-4, 5e-5, 3e-5} with 4 epochs.
    2e-5 is tuned for 110M-340M BERTs; a 6-layer 384-wide model moves too little at 2e-5 in 3 epochs on
    the small tasks. The warm-up protects the freshly initialised head at this higher lr. ELECTRA also
    uses layer-wise lr decay 0.8; here it stays off (`layerwise_lr_decay=1.0`, an ablation knob), so
    every layer sees the full 1e-4, one reason not to go higher (e.g. the miniatures' 3e-4).
  * 10 epochs for RTE and STS-B: ELECTRA's own rule (10 for rte/sts, 3 otherwise). MRPC gets 10 too:
    it is smaller than STS-B (3.7k vs 5.7k pairs, 114 steps per epoch at batch 32), and ELECTRA trains
    it on both sentence orders (`double_unordered`), i.e. twice the updates per epoch that we do.
  * CoLA 5 epochs: 8.5k single sentences (267 steps per epoch); small models trail most on CoLA
    (MiniLM-L6 47.5 MCC vs BERT-base 58.9, MiniLM README), and 5 epochs gives it about as many
    updates (1.3k) as STS-B's 10 (1.8k), in between ELECTRA's 3 and the small tasks' 10.
  * SST-2, QQP, MNLI, QNLI (67k-393k examples): 3 epochs already mean 6k-37k updates.
  * RTE max length 256: with the MiniLM WordPiece tokenizer 12.2% of RTE train pairs exceed 128
    tokens (p99 = 197, max 289) and truncation cuts the premise, where the evidence is; 256 covers
    99.9%. Every other local task has < 0.5% of examples above 128 (MRPC/STS-B/WNLI max 103-125, CoLA
    47, SST-2 66; QNLI dev 0.46%), and with dynamic padding max_len only costs on those rare long ones.
  * WNLI stays at the gentle run_glue lr: its dev set reuses train sentences with flipped labels, so
    nothing beats the majority class (56.3 dev); longer or hotter training only goes below it.
  * AX has no training data: it is predicted by the MNLI model (its row mirrors MNLI).
For BASE-size and larger encoders (hidden >= 768) lr 1e-4 is too high: pass `lr=2e-5` (or 1e-5 for
large / 1.3B); the runner warns when `vega` defaults meet such a model without an explicit lr.
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
GROUP_CHUNK = 50  # global batches per length-sorted chunk (transformers' LengthGroupedSampler uses up to 50)


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


# ---------------------------------------------------------------------------------- length grouping


def length_grouped_permutation(
    base: torch.Tensor, lengths: Sequence[int], global_batch: int, seed: int, chunk: int = GROUP_CHUNK
) -> torch.Tensor:
    """Reorder a (seeded) permutation so that each global batch holds examples of similar length.

    `base` is cut into chunks of `chunk * global_batch`; each chunk is sorted by length (longest first,
    ties keep `base` order) and cut into global batches; the batches are then shuffled with `seed`.
    The leftover tail (fewer than one global batch, dropped by the sampler) stays at the end, so the
    set of examples trained per epoch is the same as without grouping. Pure function of its inputs.
    """
    order = base.tolist()
    usable = len(order) - len(order) % global_batch
    size = chunk * global_batch
    batches: list[list[int]] = []
    for start in range(0, usable, size):
        part = sorted(order[start : min(start + size, usable)], key=lambda i: -lengths[i])
        batches.extend(part[j : j + global_batch] for j in range(0, len(part), global_batch))
    g = torch.Generator().manual_seed(seed)
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return torch.tensor([i for b in shuffled for i in b] + order[usable:], dtype=torch.long)


def sort_within_batches(base: torch.Tensor, lengths: Sequence[int], global_batch: int) -> torch.Tensor:
    """Sort each window of `global_batch` entries of a permutation by length (longest first, ties keep
    `base` order); the tail (fewer than one global batch) stays as it is. Same examples per window."""
    order = base.tolist()
    usable = len(order) - len(order) % global_batch
    out: list[int] = []
    for start in range(0, usable, global_batch):
        out.extend(sorted(order[start : start + global_batch], key=lambda i: -lengths[i]))
    return torch.tensor(out + order[usable:], dtype=torch.long)


def enable_sorted_micro_batches(sampler: Any, lengths: Sequence[int]) -> None:
    """Make a `ResumableBatchSampler` sort each global batch by length before cutting it into its
    `grad_accum` micro-batches. Wraps the sampler's current `permutation` (so it composes with
    `enable_length_grouping` called before it). Call before `trainer.train()`."""
    if len(lengths) != sampler.num_samples:
        raise VegaError(f"sorted micro-batches: {len(lengths)} lengths for {sampler.num_samples} examples")
    inner = sampler.permutation
    lengths = list(lengths)
    sampler.permutation = lambda epoch: sort_within_batches(inner(epoch), lengths, sampler.global_batch)


def enable_length_grouping(sampler: Any, lengths: Sequence[int], chunk: int = GROUP_CHUNK) -> None:
    """Make a `ResumableBatchSampler` (the Trainer's `trainer.sampler`) draw length-grouped epochs.

    Overrides the instance's `permutation(epoch)`, which `__iter__` and `global_indices` use; the
    sampler's cursor, `state_dict` and resume logic are untouched. Call before `trainer.train()`.
    """
    if len(lengths) != sampler.num_samples:
        raise VegaError(f"length grouping: {len(lengths)} lengths for {sampler.num_samples} examples")
    plain = type(sampler).permutation.__get__(sampler)
    lengths = list(lengths)

    def permutation(epoch: int) -> torch.Tensor:
        seed = sampler.seed * 1_000_003 + epoch  # a different stream from the base shuffle's seed + epoch
        return length_grouped_permutation(plain(epoch), lengths, sampler.global_batch, seed, chunk)

    sampler.permutation = permutation
