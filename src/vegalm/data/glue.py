"""GLUE tasks: a registry of task facts and loaders for the official TSV files and the Hub copy.

Local files follow the layout the official `download_glue_data.py` writes (quirks included):

    <glue_dir>/CoLA/{train,dev}.tsv      no header: source, label, original-label, sentence
    <glue_dir>/CoLA/test.tsv             header: index, sentence
    <glue_dir>/MRPC/{train,dev}.tsv      UTF-8 BOM, header: Quality, #1 ID, #2 ID, #1 String, #2 String
    <glue_dir>/MNLI/dev_matched.tsv      ..., sentence1, sentence2, label1..label5, gold_label
    <glue_dir>/diagnostic/diagnostic.tsv AX (the script's name for it; `AX/AX.tsv` is accepted too)

Files are read with the csv module, tab-delimited and `quoting=csv.QUOTE_NONE`: a `"` in GLUE text is a
literal character, never a quote (MRPC, QQP and MNLI contain unbalanced quotes). `utf-8-sig` drops MRPC's
byte-order mark. Columns are found by header name wherever a header exists.

Labels are kept as GLUE writes them and turned into ids by their position in `TaskSpec.labels`:
CoLA/SST-2/MRPC/QQP/WNLI ("0", "1"); RTE/QNLI ("entailment", "not_entailment"); MNLI/AX
("contradiction", "entailment", "neutral"), the order of the original GLUE/BERT processors. Note that the
Hub copy (`nyu-mll/glue`) numbers MNLI differently (0=entailment, 1=neutral, 2=contradiction); the Hub
loader maps its ids by label *name*, so an `Example` means the same thing from either source.

Usage:

    from vegalm.data.glue import TASKS, load_split, load_task
    dev = load_split("rte", "dev", "../shared/data/glue")       # list[Example]
    dev[0].label, TASKS["rte"].labels[dev[0].label]               # 1, 'not_entailment'
    splits = load_task("mnli", glue_dir)                          # {"train": [...], "dev_matched": [...], ...}

Mistakes in files raise `GlueFormatError` with one line naming `file:line`.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vegalm.errors import VegaError

HUB_DATASET = "nyu-mll/glue"
ENV_GLUE_DIR = "VEGALM_GLUE_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[3]  # src/vegalm/data/glue.py -> repo root


class GlueFormatError(VegaError, ValueError):
    """A GLUE file that is missing or does not match the official layout. Message names file:line."""


@dataclass(frozen=True)
class TaskSpec:
    """Facts about one GLUE task. `labels` is None for regression (STS-B)."""

    name: str  # registry key: cola, sst2, ...
    dir_name: str  # folder under the GLUE dir ("diagnostic" for AX, as the official script writes it)
    labels: tuple[str, ...] | None
    is_pair: bool
    files: Mapping[str, str]  # split -> file name inside dir_name
    dev_splits: tuple[str, ...]
    test_splits: tuple[str, ...]
    submission_files: Mapping[str, str]  # test split -> leaderboard file name
    test_sizes: Mapping[str, int]  # test split -> canonical row count
    hub_config: str
    hub_splits: Mapping[str, str]  # our split -> Hub split name

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files)

    def label_id(self, label: str) -> int:
        """GLUE label string -> id (its position in `labels`)."""
        if self.labels is None or label not in self.labels:
            raise GlueFormatError(f"unknown label {label!r} for {self.name} (expected {_expected(self)})")
        return self.labels.index(label)


def _expected(spec: TaskSpec) -> str:
    return "|".join(spec.labels) if spec.labels else "a number"


def _spec(name, dir_name, labels, is_pair, test_sizes, *, dev=("dev",), hub_config=None, files=None, train=True):
    """Build a TaskSpec for the common one-dev/one-test layout; `files` overrides the file names."""
    test = tuple(test_sizes)
    if files is None:
        files = ({"train": "train.tsv"} if train else {}) | {s: f"{s}.tsv" for s in (*dev, *test)}
    hub = {"train": "train", "dev": "validation", "test": "test"}
    hub |= {s: s.replace("dev_", "validation_") for s in (*dev, *test) if "_" in s}
    stems = {"test": dir_name, "test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}
    return TaskSpec(
        name=name,
        dir_name=dir_name,
        labels=labels,
        is_pair=is_pair,
        files=MappingProxyType(dict(files)),
        dev_splits=tuple(dev),
        test_splits=test,
        submission_files=MappingProxyType({s: f"{stems[s]}.tsv" for s in test}),
        test_sizes=MappingProxyType(dict(test_sizes)),
        hub_config=hub_config or name,
        hub_splits=MappingProxyType({s: hub[s] for s in files}),
    )


_BINARY = ("0", "1")
_ENTAIL2 = ("entailment", "not_entailment")
_NLI3 = ("contradiction", "entailment", "neutral")

# Canonical test sizes are the leaderboard's row counts (also the Hub's test split sizes).
TASKS: dict[str, TaskSpec] = {
    "cola": _spec("cola", "CoLA", _BINARY, False, {"test": 1063}),
    "sst2": _spec("sst2", "SST-2", _BINARY, False, {"test": 1821}),
    "mrpc": _spec("mrpc", "MRPC", _BINARY, True, {"test": 1725}),
    "stsb": _spec("stsb", "STS-B", None, True, {"test": 1379}),
    "qqp": _spec("qqp", "QQP", _BINARY, True, {"test": 390965}),
    "mnli": _spec(
        "mnli", "MNLI", _NLI3, True, {"test_matched": 9796, "test_mismatched": 9847},
        dev=("dev_matched", "dev_mismatched"),
    ),
    "qnli": _spec("qnli", "QNLI", _ENTAIL2, True, {"test": 5463}),
    "rte": _spec("rte", "RTE", _ENTAIL2, True, {"test": 3000}),
    "wnli": _spec("wnli", "WNLI", _BINARY, True, {"test": 146}),
    # AX is test-only; the official script saves it as diagnostic/diagnostic.tsv. Predictions come from an
    # MNLI model, so it shares MNLI's labels. Its leaderboard file is AX.tsv.
    "ax": TaskSpec(
        name="ax", dir_name="diagnostic", labels=_NLI3, is_pair=True,
        files=MappingProxyType({"test": "diagnostic.tsv"}), dev_splits=(), test_splits=("test",),
        submission_files=MappingProxyType({"test": "AX.tsv"}), test_sizes=MappingProxyType({"test": 1104}),
        hub_config="ax", hub_splits=MappingProxyType({"test": "test"}),
    ),
}
# Other places an AX file is found in the wild (the leaderboard's own download is named AX.tsv).
_AX_FALLBACKS = (Path("AX") / "AX.tsv", Path("AX") / "test.tsv", Path("diagnostic") / "AX.tsv")


def get_task(task: str) -> TaskSpec:
    """Look up a task by name; case, '-' and '_' are ignored ("SST-2" -> sst2)."""
    key = str(task).lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise GlueFormatError(f"unknown GLUE task {task!r} (known: {', '.join(TASKS)})")
    return TASKS[key]


# ---------------------------------------------------------------- columns per task and split kind


@dataclass(frozen=True)
class _Layout:
    text_a: str
    text_b: str | None
    label: str | None  # None for test files
    index: str | None = None  # test files: the index column
    columns: tuple[str, ...] | None = None  # headerless files: the fixed column names


_PAIR_COLS = {  # task -> (text_a, text_b, label column) in labeled files
    "mrpc": ("#1 String", "#2 String", "Quality"),
    "stsb": ("sentence1", "sentence2", "score"),
    "qqp": ("question1", "question2", "is_duplicate"),
    "mnli": ("sentence1", "sentence2", "gold_label"),
    "qnli": ("question", "sentence", "label"),
    "rte": ("sentence1", "sentence2", "label"),
    "wnli": ("sentence1", "sentence2", "label"),
    "ax": ("sentence1", "sentence2", None),
}


def _layout(spec: TaskSpec, split: str) -> _Layout:
    test = split in spec.test_splits
    if spec.name == "cola":
        if test:
            return _Layout("sentence", None, None, index="index")
        return _Layout("sentence", None, "label", columns=("source", "label", "original_label", "sentence"))
    if spec.name == "sst2":
        return _Layout("sentence", None, None, index="index") if test else _Layout("sentence", None, "label")
    a, b, label = _PAIR_COLS[spec.name]
    if test:
        return _Layout(a, b, None, index="id" if spec.name == "qqp" else "index")
    return _Layout(a, b, label)


# ---------------------------------------------------------------- examples and loading


@dataclass(slots=True)
class Example:
    """One GLUE row. `label` is a label id (float for STS-B, None for test rows)."""

    guid: str  # "<task>-<split>-<index>", e.g. "rte-dev-12"
    index: int | None  # test: the file's index column; train/dev: the 0-based row number
    text_a: str
    text_b: str | None
    label: int | float | None


def default_glue_dir() -> Path:
    """$VEGALM_GLUE_DIR, else ../shared/data/glue from the working dir, else next to the repo.

    When nothing exists the working-dir candidate is returned, so error messages name a real place to look.
    """
    env = os.environ.get(ENV_GLUE_DIR)
    if env:
        return Path(env).expanduser()
    candidates = [Path.cwd().parent / "shared" / "data" / "glue", _REPO_ROOT.parent / "shared" / "data" / "glue"]
    for cand in candidates:
        if cand.is_dir():
            return cand
    return candidates[0]


# Import-time snapshot, for display and defaults; functions call `resolve_glue_dir` so the env var is re-read.
GLUE_DIR_DEFAULT: Path = default_glue_dir()


def resolve_glue_dir(glue_dir: str | Path | None = None) -> Path:
    return default_glue_dir() if glue_dir is None else Path(glue_dir).expanduser()


def _check_split(spec: TaskSpec, split: str) -> None:
    if split not in spec.files:
        raise GlueFormatError(f"{spec.name} has no split {split!r} (splits: {', '.join(spec.files)})")


def split_path(task: str, split: str, glue_dir: str | Path | None = None) -> Path:
    """Where the file for (task, split) lives; for AX the first existing known name."""
    spec = get_task(task)
    _check_split(spec, split)
    root = resolve_glue_dir(glue_dir)
    path = root / spec.dir_name / spec.files[split]
    if spec.name == "ax" and not path.is_file():
        for alt in _AX_FALLBACKS:
            if (root / alt).is_file():
                return root / alt
    return path


def available_splits(task: str, glue_dir: str | Path | None = None) -> list[str]:
    """The splits of `task` whose file exists under `glue_dir`, in the registry's order."""
    spec = get_task(task)
    return [s for s in spec.files if split_path(spec.name, s, glue_dir).exists()]  # a folder there: load_split says so


def _read_rows(path: Path, spec: TaskSpec, split: str):
    """Yield (line_number, fields) for non-blank lines; errors name the file and task/split."""
    if path.is_dir():
        raise GlueFormatError(f"{path}: is a directory, expected the TSV file of GLUE task {spec.name}, split {split}")
    if not path.is_file():
        raise GlueFormatError(
            f"{path}: file not found (GLUE task {spec.name}, split {split}); "
            f"pass glue_dir or set {ENV_GLUE_DIR}"
        )
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            for row in reader:
                if row:  # QUOTE_NONE: one physical line per row, so line_num is that row's line
                    yield reader.line_num, row
    except UnicodeDecodeError as e:
        raise GlueFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise GlueFormatError(f"{path}: unreadable TSV ({e})") from None


def _parse_label(spec: TaskSpec, raw: str, where: str) -> int | float:
    if spec.labels is None:
        try:
            return float(raw)
        except ValueError:
            raise GlueFormatError(f"{where}: score {raw!r} for {spec.name} is not a number") from None
    try:
        return spec.labels.index(raw)
    except ValueError:
        raise GlueFormatError(f"{where}: unknown label {raw!r} for {spec.name} (expected {_expected(spec)})") from None


def load_split(task: str, split: str, glue_dir: str | Path | None = None) -> list[Example]:
    """Read one official GLUE TSV (e.g. `load_split("mnli", "dev_matched", dir)`) into Examples."""
    spec = get_task(task)
    _check_split(spec, split)
    path = split_path(spec.name, split, glue_dir)
    layout = _layout(spec, split)
    rows = _read_rows(path, spec, split)
    if layout.columns is not None:  # headerless (CoLA train/dev)
        names = list(layout.columns)
    else:
        first = next(rows, None)
        if first is None:
            raise GlueFormatError(f"{path}: empty file (GLUE task {spec.name}, split {split})")
        names = first[1]
        wanted = [c for c in (layout.index, layout.text_a, layout.text_b, layout.label) if c is not None]
        for col in wanted:
            if col not in names:
                raise GlueFormatError(
                    f"{path}:{first[0]}: missing column {col!r} in header for {spec.name} {split} "
                    f"(found: {', '.join(names)})"
                )
    pos = {name: i for i, name in enumerate(names)}
    ncols = len(names)
    ia, ib = pos[layout.text_a], (pos[layout.text_b] if layout.text_b else None)
    il = pos[layout.label] if layout.label else None
    ii = pos[layout.index] if layout.index else None

    out: list[Example] = []
    seen: dict[int, int] = {}  # index -> line where it first appeared
    for line, row in rows:
        if len(row) != ncols:
            raise GlueFormatError(
                f"{path}:{line}: expected {ncols} tab-separated columns for {spec.name} {split}, "
                f"found {len(row)}"
            )
        if ii is not None:
            try:
                index = int(row[ii])
            except ValueError:
                raise GlueFormatError(f"{path}:{line}: index {row[ii]!r} is not an integer") from None
            if index in seen:
                raise GlueFormatError(f"{path}:{line}: duplicate index {index} (first on line {seen[index]})")
            seen[index] = line
        else:
            index = len(out)
        label = _parse_label(spec, row[il], f"{path}:{line}") if il is not None else None
        out.append(Example(f"{spec.name}-{split}-{index}", index, row[ia], row[ib] if ib is not None else None, label))
    if not out:
        raise GlueFormatError(f"{path}: empty file, no examples (GLUE task {spec.name}, split {split})")
    return out


def load_task(task: str, glue_dir: str | Path | None = None) -> dict[str, list[Example]]:
    """All splits of `task` present under `glue_dir` (QNLI here has dev/test only)."""
    spec = get_task(task)
    present = available_splits(spec.name, glue_dir)
    if not present:
        where = resolve_glue_dir(glue_dir) / spec.dir_name
        raise GlueFormatError(
            f"{where}: no GLUE files for {spec.name} (expected {', '.join(spec.files.values())}); "
            f"pass glue_dir or set {ENV_GLUE_DIR}"
        )
    return {s: load_split(spec.name, s, glue_dir) for s in present}


# ---------------------------------------------------------------- Hugging Face Hub copy

# Hub text columns per task, and the Hub's label names in id order (from the nyu-mll/glue dataset card).
_HUB_TEXT = {
    "cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"), "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
    "ax": ("premise", "hypothesis"),
}
_HUB_NAMES = {
    "cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
    "wnli": ("not_entailment", "entailment"), "rte": _ENTAIL2, "qnli": _ENTAIL2,
    "mnli": ("entailment", "neutral", "contradiction"), "ax": ("entailment", "neutral", "contradiction"),
}


def _hub_to_glue_string(task: str, name: str) -> str | None:
    """Hub label name -> GLUE label string: the binary tasks' names stand for "0"/"1" in Hub order."""
    names = _HUB_NAMES[task]
    if TASKS[task].labels == _BINARY:
        return str(names.index(name)) if name in names else None
    return name if name in names else None


def examples_from_hub(task: str, split: str, dataset: Any) -> list[Example]:
    """Map a Hub `datasets.Dataset` (columns as in nyu-mll/glue) to Examples with our label ids.

    Hub label ids are translated through their names (`dataset.features["label"].names` when it is a
    ClassLabel, else the published order), so MNLI's Hub 0=entailment becomes our id 1. Label -1 (Hub test
    rows) becomes None. `index` is the Hub `idx` column (the row number, as in the TSVs).
    """
    spec = get_task(task)
    _check_split(spec, split)
    col_a, col_b = _HUB_TEXT[spec.name]
    cols = set(dataset.column_names)
    for col in (col_a, col_b, "label"):
        if col is not None and col not in cols:
            raise GlueFormatError(f"Hub {spec.hub_config}/{split}: missing column {col!r} (found: {sorted(cols)})")
    remap: list[int] | None = None
    if spec.labels is not None:
        feature = dataset.features["label"]
        names = list(getattr(feature, "names", None) or _HUB_NAMES[spec.name])
        remap = []
        for name in names:
            glue = _hub_to_glue_string(spec.name, name)
            if glue is None:
                raise GlueFormatError(f"Hub {spec.hub_config}: unknown label name {name!r} (expected {names})")
            remap.append(spec.labels.index(glue))
    texts_a = list(dataset[col_a])
    texts_b = list(dataset[col_b]) if col_b else [None] * len(texts_a)
    labels = list(dataset["label"])
    idxs = list(dataset["idx"]) if "idx" in cols else list(range(len(texts_a)))
    out = []
    for i, (a, b, lab, idx) in enumerate(zip(texts_a, texts_b, labels, idxs)):
        if lab is None or lab == -1:
            label = None
        elif remap is None:
            label = float(lab)
        elif 0 <= int(lab) < len(remap):
            label = remap[int(lab)]
        else:
            raise GlueFormatError(f"Hub {spec.hub_config}/{split} row {i}: label id {lab} out of range")
        out.append(Example(f"{spec.name}-{split}-{int(idx)}", int(idx), a, b, label))
    return out


def load_split_hub(task: str, split: str, *, cache_dir: str | Path | None = None) -> list[Example]:
    """Download (task, split) from the Hub dataset nyu-mll/glue and map it like `load_split`."""
    spec = get_task(task)
    _check_split(spec, split)
    try:
        from datasets import load_dataset

        ds = load_dataset(HUB_DATASET, spec.hub_config, split=spec.hub_splits[split], cache_dir=cache_dir)
    except Exception as e:  # offline, missing dataset, auth: one line for the user
        raise GlueFormatError(
            f"could not load {HUB_DATASET} {spec.hub_config}/{spec.hub_splits[split]} from the Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); use local files via glue_dir"
        ) from e
    return examples_from_hub(spec.name, split, ds)


def task_texts(task: str, glue_dir: str | Path | None = None) -> list[str]:
    """All text fields (text_a, text_b) of every split of `task` under glue_dir, deduplicated in order."""
    spec = get_task(task)
    splits = load_task(spec.name, glue_dir)
    seen: dict[str, None] = {}
    for split in spec.files:  # registry order: train, dev(s), test(s)
        for ex in splits.get(split, ()):
            for text in (ex.text_a, ex.text_b):
                if text and text not in seen:
                    seen[text] = None
    return list(seen)


def train_subset(examples: list, n: int | None) -> list:
    """`max_train_samples`: a random sample of n examples (seed 0, the same for every run seed), in file order."""
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(0).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def load_extra_train(path: str | Path, spec: TaskSpec) -> list[Example]:
    """A JSONL of labelled rows (guid, index, text_a, text_b, label: class id, or a float score for STS-B)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                label = float(row["label"]) if spec.is_regression else int(row["label"])
                ex = Example(str(row["guid"]), int(row["index"]), str(row["text_a"]), row.get("text_b"), label)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise VegaError(f"{path}:{line_no}: bad extra_train row ({type(e).__name__}: {e})") from None
            if not spec.is_regression and not 0 <= label < spec.num_labels:
                raise VegaError(f"{path}:{line_no}: label {label} outside [0, {spec.num_labels}) for {spec.name}")
            out.append(ex)
    return out

