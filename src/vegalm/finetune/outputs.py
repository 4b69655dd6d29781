"""What a fine-tuning run writes into `out/`: prediction TSVs, logits, results.json, the saved model, and
its checkpoint folder. Only folders vegalm marked (vegalm.outdir) are ever deleted; a folder holding the
user's own files under these names is refused with one line before any work. See docs/output-folders.md.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from vegalm.data.glue import TaskSpec
from vegalm.finetune.predict import metric_key
from vegalm.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from vegalm.model.hf import save_tokenizer
from vegalm.outdir import MARKER, OutputDirError, claim_dir, read_marker, safe_rmtree

log = logging.getLogger(__name__)

KIND = "finetune"
SUBDIRS = ("checkpoints", "model")  # folders a run replaces or deletes: each carries its own marker
# everything a run writes into out/ (the Trainer adds metrics.jsonl and tb/)
NAMES = (*SUBDIRS, "results.json", "dev_predictions.tsv", "test_predictions.tsv", "dev_logits.npy",
         "test_logits.npy", "metrics.jsonl", "tb")
STAMP = "config_hash"  # out/checkpoints/config_hash: the cache key of the run the checkpoints belong to
_HASH = re.compile(r"^[0-9a-f]{16}$")  # a config hash (vegalm.cache.config_hash)


def _results_hash(out: Path) -> str | None:
    try:
        res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    key = res.get("config_hash") if isinstance(res, dict) else None
    return key if isinstance(key, str) and _HASH.match(key) else None


def _stamp(ckpts: Path) -> str | None:
    try:
        key = (ckpts / STAMP).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return key if _HASH.match(key) else None


def _legacy(out: Path) -> dict[str, str]:
    """Unmarked folders that a run made before markers existed wrote, name ("" for out/ itself) -> config
    hash: checkpoints/ with a config-hash stamp, and out/ (plus model/ with config.json) beside a
    results.json that records a config hash."""
    found = {}
    ckpts, model = out / "checkpoints", out / "model"
    if ckpts.is_dir() and not ckpts.is_symlink() and read_marker(ckpts) is None and _stamp(ckpts):
        found["checkpoints"] = _stamp(ckpts)
    old = _results_hash(out)
    if old is not None and read_marker(out) is None:
        found[""] = old
        if (model / "config.json").is_file() and not model.is_symlink() and read_marker(model) is None:
            found["model"] = old
    return found


def check_out_dir(out: Path) -> None:
    """Refuse (OutputDirError, one line) an `out` that holds anything not vegalm's under the names a run
    writes. Reads only: call it before any work; claim_out_dir writes the markers."""
    if os.path.lexists(out) and not out.is_dir():
        raise OutputDirError(f"{out}: exists and is not a folder")
    if not out.is_dir():
        return
    legacy = _legacy(out)
    if read_marker(out) is None and "" not in legacy:
        foreign = next((name for name in NAMES if os.path.lexists(out / name)), None)
        if foreign is not None:
            raise OutputDirError(f"{out / foreign}: vegalm did not create it (no {MARKER} in {out}) and a run would "
                                 "overwrite it; move it away or choose another output folder")
    for name in SUBDIRS:
        sub = out / name
        if name in legacy:
            continue
        if sub.is_symlink() or (os.path.lexists(sub) and not sub.is_dir()):
            raise OutputDirError(f"{sub}: a {'symlink' if sub.is_symlink() else 'file'} where vegalm writes its "
                                 f"{name} folder; move it away or choose another output folder")
        if sub.is_dir() and read_marker(sub) is None and any(sub.iterdir()):
            first = sorted(p.name for p in sub.iterdir())[0]
            raise OutputDirError(f"{sub} holds {first!r}, which vegalm did not create; move it away or "
                                 "choose another output folder")


def claim_out_dir(out: Path, key: str) -> Path:
    """check_out_dir again (under the folder's lock), mark the folders of an older run as vegalm's, then
    mark `out` as this run's folder (config hash `key`)."""
    check_out_dir(out)
    for name, old in _legacy(out).items():
        claim_dir(out / name, KIND if not name else name, old)
    return claim_dir(out, KIND, key)


def prepare_checkpoints(out: Path, key: str, every: int) -> bool:
    """True when out/checkpoints holds a checkpoint of this very config (cache key `key`) to resume from;
    otherwise delete leftovers of another config (only if vegalm marked them) and, if `every` > 0, claim
    the folder and stamp the key."""
    from vegalm.train.checkpoint import latest_checkpoint

    ckpts = out / "checkpoints"
    latest = latest_checkpoint(ckpts) if every > 0 and _stamp(ckpts) == key else None
    if latest is not None:
        log.info("%s: continuing the interrupted run from %s", out, latest)
        return True
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only the first process clears and stamps
        return False
    if ckpts.exists():
        log.info("%s: removing checkpoints of an earlier run", ckpts)
        safe_rmtree(ckpts)
    if every > 0:
        claim_dir(ckpts, "checkpoints", key)
        atomic_write_text(ckpts / STAMP, key + "\n")
    return False


def remove_checkpoints(out: Path) -> None:
    """After a finished run: its checkpoints (weights + Adam state) are not needed any more."""
    ckpts = out / "checkpoints"
    if read_marker(ckpts) is not None or (ckpts.is_dir() and not any(ckpts.iterdir())):
        safe_rmtree(ckpts)


def save_model(model: nn.Module, tokenizer: Any, path: Path, key: str) -> None:
    """Replace out/model with the evaluated weights and the tokenizer, marked as vegalm's."""
    safe_rmtree(path)
    claim_dir(path, "model", key)
    model.save_pretrained(str(path))
    save_tokenizer(tokenizer, path)


def write_results(out: Path, results: dict) -> None:
    """results.json, written last and atomically: an interrupted run is never taken for a finished one."""
    atomic_write_json(out / "results.json", results, default=str)


def pred_values(spec: TaskSpec, logits: np.ndarray) -> list[str]:
    if spec.is_regression:
        return [f"{v:.4f}" for v in logits[:, 0]]
    return [spec.labels[i] for i in logits.argmax(-1)]


def write_tsv(path: Path, rows: list[tuple[str, Any, np.ndarray]], spec: TaskSpec, with_label: bool,
              preds: dict[str, np.ndarray] | None = None) -> None:
    """split, index, [label], prediction, logit_0.. for each (split, GlueDataset, logits) in `rows`."""
    n = rows[0][2].shape[1] if rows else 1
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    label_col = ["label"] if with_label else []
    w.writerow(["split", "index", *label_col, "prediction", *(f"logit_{i}" for i in range(n))])
    for split, ds, logits in rows:
        values = pred_values(spec, logits) if preds is None else [spec.labels[i] for i in preds[split]]
        for feat, pred, row in zip(ds.features, values, logits):
            label = []
            if with_label:
                y = feat["labels"]
                label = [f"{y:g}" if spec.is_regression else spec.labels[y]]
            w.writerow([split, feat["index"], *label, pred, *(f"{v:.6g}" for v in row)])
    atomic_write_text(path, buf.getvalue())


def save_logits(path: Path, parts: list[np.ndarray]) -> None:
    arr = np.concatenate(parts, axis=0) if parts else np.zeros((0, 1), dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32))
    atomic_write_bytes(path, buf.getvalue())


def row_ranges(names: list[str], parts: list[np.ndarray]) -> dict[str, list[int]]:
    """split -> [start, end) of its rows in the concatenated logits."""
    out, start = {}, 0
    for name, p in zip(names, parts):
        out[name] = [start, start + len(p)]
        start += len(p)
    return out


def cached_results(out: str | Path, key: str) -> dict | None:
    """out/results.json if it was written by a run with cache key `key` and its prediction files exist."""
    path = Path(out) / "results.json"
    if not path.is_file():
        return None
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        log.warning("%s: unreadable, rerunning", path)
        return None
    if res.get("config_hash") != key:
        log.warning("%s: written with another config (hash %s, now %s): rerunning and overwriting",
                    path, res.get("config_hash"), key)
        return None
    needed = ["dev_predictions.tsv", "dev_logits.npy"]
    if res.get("test_rows"):
        needed += ["test_predictions.tsv", "test_logits.npy"]
    if any(not (Path(out) / f).is_file() for f in needed):
        return None
    return res


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import vegalm

    return {"vegalm": vegalm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _device_info(device: Any) -> dict[str, Any]:
    """Which machine produced a result: the device, its name (the GPU's, else the CPU's) and threads."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "cpu_threads": torch.get_num_threads()}


def results_record(spec: TaskSpec, cfg: Any, resolved: dict, key: str, ev: Any, summary: dict, train_ds: Any,
                   trainer: Any, *, fresh: Any, reinit: list, evaluated: str, timing: dict) -> dict[str, Any]:
    """The content of results.json (its wall time is set again just before it is written)."""
    bs = resolved["batch_size"]
    results = {
        "task": spec.name,
        "seed": cfg.train.seed,
        "config_hash": key,
        "dev": ev.dev_metrics,
        "dev_score": ev.dev_score,
        "dev_metric_keys": {s: metric_key(spec, s) for s in ev.dev_ds},
        "dev_rows": row_ranges(list(ev.dev_ds), list(ev.dev_logits.values())),
        "test_rows": row_ranges(list(ev.test_ds), list(ev.test_logits.values())),
        "num_labels": spec.num_labels,
        "num_train_examples": len(train_ds),
        "train": {"steps": summary["step"], "final_loss": summary["loss"], "skipped_steps": summary["skipped_steps"],
                  "epochs": summary["step"] * bs / len(train_ds), "resumed_from_step": summary["resumed_from"],
                  "earlier_processes_s": round(summary["elapsed_before"], 2)},  # in train_s and wall_s too
        "model": {"backend": resolved["backend"], "weights_from": resolved["init_from"] or resolved["model"],
                  "fresh_weights": fresh, "reinitialised": reinit,
                  "num_parameters": sum(p.numel() for p in trainer.model.parameters()), "evaluated": evaluated},
        "tricks": list(cfg.tricks),
        "timing": {**{k: round(v, 2) for k, v in timing.items()}, "wall_s": round(sum(timing.values()), 2)},
        "versions": _versions(),
        **_device_info(trainer.accelerator.device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": resolved,
    }
    if ev.wnli is not None:
        results["wnli"] = ev.wnli
    return results


def write_outputs(out: Path, spec: TaskSpec, ev: Any, results: dict, model: nn.Module | None, tokenizer: Any,
                  key: str, t0: float) -> None:
    """Prediction TSVs, logits, the model (when given) and last results.json, all into out/."""
    out.mkdir(parents=True, exist_ok=True)
    dev_preds = None if spec.is_regression else ev.dev_preds
    write_tsv(out / "dev_predictions.tsv", [(s, ev.dev_ds[s], ev.dev_logits[s]) for s in ev.dev_ds], spec, True,
              dev_preds)
    save_logits(out / "dev_logits.npy", list(ev.dev_logits.values()))
    if ev.test_ds:
        # an MNLI run's AX rows share MNLI's three labels, so one spec formats both
        write_tsv(out / "test_predictions.tsv", [(s, ev.test_ds[s], ev.test_logits[s]) for s in ev.test_ds], spec,
                  False, ev.test_preds)
        save_logits(out / "test_logits.npy", list(ev.test_logits.values()))
    if model is not None:
        save_model(model, tokenizer, out / "model", key)
    # this process's wall time, plus the training time of the earlier processes of a resumed run
    results["timing"]["wall_s"] = round(time.perf_counter() - t0 + results["train"]["earlier_processes_s"], 2)
    write_results(out, results)

