"""A pre-registered sweep: `vegalm ablate --plan FILE` runs exactly what a committed YAML file fixes.

The file is frozen before the confirmatory runs (docs/ablation.md, "Pre-registration"). Each record names the
file and its sha256, and `--summary` says whether every record came from one plan, so a changed plan, or a
record made without it, shows in the report instead of passing silently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vegalm.config import ConfigError, from_dict, option, parse_yaml
from vegalm.experiments.ablate.combos import DEFAULT_COMBOS
from vegalm.finetune.models import MODEL_ALIASES
from vegalm.finetune.stages.self_training import PSEUDO_FRACTION

DEVICES = ("cpu", "cuda")


@dataclass
class AblationPlan:
    """The keys of a plan file; `settings` takes what `key=value` arguments would give (FinetuneConfig keys)."""

    model: str = option("model folder (relative to the plan file), or minilm-l6", "")
    tasks: list[str] = option("GLUE tasks", default_factory=lambda: ["rte", "mrpc", "stsb", "cola"])
    seeds: list[int] = option("the seeds, listed (confirmatory: fresh ones, e.g. [3, 4, 5])", default_factory=list)
    tricks: list[str] = option("the combos (arms)", default_factory=lambda: DEFAULT_COMBOS.split(","))
    results_dir: str = option("records folder, relative to the plan file", ".")
    model_tag: str = option("records subfolder under results_dir", "")
    device: str = option("cpu | cuda: where the runs must run; a sweep started elsewhere stops", "cpu")
    pseudo_fraction: float = option("transductive: share of each test split kept as pseudo-labels", PSEUDO_FRACTION)
    pseudo_min_dev_accuracy: float = option("transductive: the teacher's dev-accuracy gate, 0 = off", 0.0)
    settings: dict[str, Any] = option("FinetuneConfig keys for every run (lr, epochs, mixed_precision, "
                                      "trick_args, ...)", default_factory=dict)
    about: dict[str, Any] = option("free text for the reader (the question, the decision rule); not read",
                                   default_factory=dict)


@dataclass
class LoadedPlan:
    plan: AblationPlan
    path: Path
    sha256: str
    kwargs: dict[str, Any] = field(default_factory=dict)  # run_ablation's arguments

    @property
    def stamp(self) -> dict[str, str]:
        """What each record carries."""
        return {"file": self.path.name, "sha256": self.sha256}


def load_plan(path: str | Path) -> LoadedPlan:
    """Read and check a plan file; paths in it are relative to it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"--plan {path}: {e.strerror}") from None
    data = parse_yaml(raw.decode("utf-8"), str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of plan keys")
    plan = from_dict(AblationPlan, data)
    for key in ("model", "model_tag"):
        if not getattr(plan, key):
            raise ConfigError(f"{path}: {key}: required")
    if not plan.seeds:
        raise ConfigError(f"{path}: seeds: required, as a list (e.g. [3, 4, 5])")
    if plan.device not in DEVICES:
        raise ConfigError(f"{path}: device: expected one of {', '.join(DEVICES)}, got {plan.device!r}")
    root = path.resolve().parent
    model = plan.model  # an alias, an absolute folder, or a Hub id as written; a relative folder from the file
    if plan.model not in MODEL_ALIASES and not Path(plan.model).is_absolute() and (root / plan.model).exists():
        model = str(root / plan.model)
    kwargs = {"model": model, "tasks": list(plan.tasks), "seeds": list(plan.seeds), "combos": list(plan.tricks),
              "results_dir": root / plan.results_dir, "tag": plan.model_tag, "pseudo_fraction": plan.pseudo_fraction,
              "pseudo_min_dev_accuracy": plan.pseudo_min_dev_accuracy, **plan.settings}
    return LoadedPlan(plan, path, hashlib.sha256(raw).hexdigest(), kwargs)


def check_device(plan: AblationPlan, where: str) -> None:
    """Stop when this machine is not the plan's device (a CUDA GPU is used whenever one is visible)."""
    import torch

    here = "cuda" if torch.cuda.is_available() else "cpu"
    if here != plan.device:
        raise ConfigError(f"{where}: device: the plan runs on {plan.device}, this machine on {here}")
