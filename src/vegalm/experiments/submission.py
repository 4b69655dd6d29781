"""The zip that gluebenchmark.com accepts: 11 TSV files of `index<TAB>prediction`, placeholders for tasks not run.

docs/glue.md ("The submission zip") has the label formats and the placeholder policy.
"""

from __future__ import annotations

import io
import math
import warnings
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vegalm.data.glue import TASKS, TaskSpec, load_split, resolve_glue_dir, split_path
from vegalm.errors import VegaError
from vegalm.io import atomic_write_bytes

# Leaderboard file stems, in the order the leaderboard lists them.
SUBMISSION_STEMS = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI-m", "MNLI-mm", "QNLI", "RTE", "WNLI", "AX")
STEM_TO_SPLIT: dict[str, tuple[str, str]] = {
    Path(fname).stem: (spec.name, split) for spec in TASKS.values() for split, fname in spec.submission_files.items()
}
STSB_RANGE = (0.0, 5.0)  # the STS-B scale; the server rejects scores outside it
HEADER = "index\tprediction"


class SubmissionError(VegaError, ValueError):
    """Predictions that cannot make a valid leaderboard file. Message names the file."""


def _format(spec: TaskSpec, value: Any, fname: str) -> str:
    if spec.labels is None:
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise SubmissionError(f"{fname}: prediction {value!r} is not a number") from None
        if math.isnan(score):
            raise SubmissionError(f"{fname}: prediction is NaN")
        return f"{min(max(score, STSB_RANGE[0]), STSB_RANGE[1]):.3f}"
    if isinstance(value, str):
        if value in spec.labels:
            return value
        raise SubmissionError(f"{fname}: unknown label {value!r} (expected {'|'.join(spec.labels)})")
    try:
        ident = int(value)
    except (TypeError, ValueError):
        raise SubmissionError(f"{fname}: prediction {value!r} is not a label id") from None
    if ident != value or not 0 <= ident < len(spec.labels):
        raise SubmissionError(f"{fname}: label id {value!r} out of range 0..{len(spec.labels) - 1}")
    return spec.labels[ident]


def _placeholder_value(spec: TaskSpec, root: Path, cache: dict) -> tuple[Any, str]:
    """Constant prediction for a task not run, and a phrase saying where it came from."""
    source = "mnli" if spec.name == "ax" else spec.name
    train = None
    if split_path(source, "train", root).is_file():
        if source not in cache:
            cache[source] = [ex.label for ex in load_split(source, "train", root)]
        train = cache[source]
    if spec.labels is None:
        if train:
            return sum(train) / len(train), "mean score of the train file"
        return 2.5, "no train file: middle of the 0-5 scale"
    if train:
        counts = Counter(train)
        top = max(counts.values())
        label = min(k for k, c in counts.items() if c == top)
        return label, f"majority class of {source} train"
    return 0, "no train file: first label"


def _test_indices(task: str, split: str, root: Path) -> list[int] | None:
    if not split_path(task, split, root).is_file():
        return None
    return [ex.index for ex in load_split(task, split, root)]


def _model_rows(stem: str, spec: TaskSpec, pair: Any, expected: list[int] | None, size: int, check: bool):
    fname = f"{stem}.tsv"
    try:
        indices, values = pair
    except (TypeError, ValueError):
        raise SubmissionError(f"{fname}: expected (indices, predictions), got {type(pair).__name__}") from None
    if len(indices) != len(values):
        raise SubmissionError(f"{fname}: {len(indices)} indices but {len(values)} predictions")
    try:
        idx = [int(i) for i in indices]
    except (TypeError, ValueError):
        raise SubmissionError(f"{fname}: indices must be integers") from None
    if len(set(idx)) != len(idx):
        dup = next(i for i, c in Counter(idx).items() if c > 1)
        raise SubmissionError(f"{fname}: index {dup} appears more than once")
    if expected is not None and set(idx) != set(expected):
        extra = sorted(set(idx) - set(expected))[:1] or ["none"]
        raise SubmissionError(
            f"{fname}: {len(idx)} predictions do not match the {len(expected)} test rows "
            f"(first unknown index: {extra[0]})"
        )
    if expected is None and check and len(idx) != size:
        raise SubmissionError(f"{fname}: {len(idx)} predictions, but the test split has {size} rows")
    return sorted(zip(idx, (_format(spec, v, fname) for v in values)))


def write_submission(
    preds: Mapping[str, tuple[Sequence[int], Sequence[Any]]],
    out_zip: str | Path,
    glue_dir: str | Path | None = None,
    *,
    check_sizes: bool = True,
) -> dict[str, str]:
    """Write the 11-file leaderboard zip; returns {file: "model" | "placeholder:majority" |
    "placeholder:canonical-size"}. `preds` maps a stem ("CoLA", "MNLI-m", ...) to (indices, predictions)."""
    unknown = [k for k in preds if k not in STEM_TO_SPLIT]
    if unknown:
        raise SubmissionError(f"unknown submission file {unknown[0]!r} (expected one of {', '.join(SUBMISSION_STEMS)})")
    root = resolve_glue_dir(glue_dir)
    manifest: dict[str, str] = {}
    texts: dict[str, str] = {}
    train_cache: dict = {}
    for stem in SUBMISSION_STEMS:
        task, split = STEM_TO_SPLIT[stem]
        spec = TASKS[task]
        fname = f"{stem}.tsv"
        expected = _test_indices(task, split, root)
        size = spec.test_sizes[split]
        if stem in preds:
            rows = _model_rows(stem, spec, preds[stem], expected, size, check_sizes)
            manifest[fname] = "model"
        else:
            value, why = _placeholder_value(spec, root, train_cache)
            text = _format(spec, value, fname)
            if expected is not None:
                indices, manifest[fname] = sorted(expected), "placeholder:majority"
                where = f"indices from {split_path(task, split, root)}"
            else:
                indices, manifest[fname] = list(range(size)), "placeholder:canonical-size"
                where = f"indices 0..{size - 1} (no test file under {root})"
            rows = [(i, text) for i in indices]
            warnings.warn(f"{fname}: placeholder, not a model: predicts {text} ({why}); {where}", stacklevel=2)
        buf = io.StringIO()
        buf.write(HEADER + "\n")
        buf.writelines(f"{i}\t{p}\n" for i, p in rows)
        texts[fname] = buf.getvalue()

    out = Path(out_zip)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for fname, text in texts.items():
            zf.writestr(fname, text)
    atomic_write_bytes(out, buf.getvalue())
    return manifest


def read_submission(zip_path: str | Path) -> dict[str, list[tuple[int, str]]]:
    """Read a submission zip back: {stem: [(index, prediction), ...]}; checks the header of each file."""
    out: dict[str, list[tuple[int, str]]] = {}
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            lines = zf.read(name).decode("utf-8").splitlines()
            if not lines or lines[0] != HEADER:
                raise SubmissionError(f"{zip_path}:{name}:1: header is not {HEADER!r}")
            rows = []
            for n, line in enumerate(lines[1:], start=2):
                parts = line.split("\t")
                if len(parts) != 2:
                    raise SubmissionError(f"{zip_path}:{name}:{n}: expected 2 columns, found {len(parts)}")
                rows.append((int(parts[0]), parts[1]))
            out[Path(name).stem] = rows
    return out
