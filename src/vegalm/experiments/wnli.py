"""WNLI study: dev accuracy of every `wnli_treatment` and a test-like estimate of `groups` (finetune/stages/wnli.py).

    python -m vegalm.experiments.wnli --model minilm-l6 --seeds 3 --out runs/wnli --results results/wnli

The estimate splits the TRAIN premises into 2 disjoint folds, fine-tunes on one fold, ranks the other fold's
hypotheses (583 of the 635 train rows are in groups of 2+; no premise seen in training: test-like) and scores
`groups` against their gold labels and that fold's majority floor; then swaps. Reported per seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from vegalm.config import apply_overrides
from vegalm.data.glue import load_split, resolve_glue_dir
from vegalm.experiments.glue import parse_seeds
from vegalm.finetune.naming import model_tag
from vegalm.finetune.run import run_finetune
from vegalm.finetune.stages.wnli import premise_key
from vegalm.io import atomic_write_text

def premise_folds(glue_dir: str | Path, out: str | Path, folds: int = 2, seed: int = 0) -> list[Path]:
    """GLUE folders holding WNLI only: fold i's train.tsv has the train premises outside fold i, its dev.tsv
    those inside (whole premises, so no premise is on both sides). Written in the official layout."""
    train = load_split("wnli", "train", glue_dir)
    keys = sorted({premise_key(ex.text_a) for ex in train})
    order = np.random.default_rng(seed).permutation(len(keys))
    fold_of = {keys[j]: r % folds for r, j in enumerate(order)}
    dirs = []
    for i in range(folds):
        d = Path(out) / f"fold{i}" / "WNLI"
        d.mkdir(parents=True, exist_ok=True)
        for name, keep in (("train.tsv", lambda k: fold_of[k] != i), ("dev.tsv", lambda k: fold_of[k] == i)):
            rows = [ex for ex in train if keep(premise_key(ex.text_a))]
            text = "index\tsentence1\tsentence2\tlabel\n" + "".join(
                f"{j}\t{ex.text_a}\t{ex.text_b}\t{ex.label}\n" for j, ex in enumerate(rows))
            if not (d / name).is_file() or (d / name).read_text(encoding="utf-8") != text:
                (d / name).write_text(text, encoding="utf-8")
        dirs.append(d.parent)
    return dirs


def evaluate(model: str, seeds: int | str = 3, out: str | Path = "runs/wnli", glue_dir: str | None = None,
             **overrides: Any) -> dict:
    """Per seed: the dev accuracy of every treatment (one fine-tune, same logits) and the 2-fold
    premise-disjoint estimate of `groups` on train (two more fine-tunes). Runs are cached (run_finetune)."""
    glue = str(resolve_glue_dir(glue_dir))
    out = Path(out)
    base = {"task": "wnli", "model": model, "save_model": False, **overrides}
    per_seed = {}
    for seed in parse_seeds(seeds):
        dev = run_finetune({**base, "seed": seed, "glue_dir": glue, "out": str(out / f"dev-seed{seed}"),
                            "wnli_treatment": "groups+train"})
        fold_acc, fold_floor = [], []
        for i, d in enumerate(premise_folds(glue, out / "folds", 2, seed=0)):
            r = run_finetune({**base, "seed": seed, "glue_dir": str(d), "out": str(out / f"fold{i}-seed{seed}"),
                              "wnli_treatment": "groups", "eval_test": False})
            fold_acc.append(r["wnli"]["dev"]["accuracy_by_treatment"]["groups"])
            fold_floor.append(r["wnli"]["dev"]["majority_floor"])
        w = dev["wnli"]["dev"]
        per_seed[seed] = {"dev": w["accuracy_by_treatment"], "dev_majority_floor": w["majority_floor"],
                          "dev_decided": w["decided"], "test_entailed_share": dev["wnli"]["test"]["entailed_share"],
                          "train_2fold_groups": round(float(np.mean(fold_acc)), 2),
                          "train_2fold_floor": round(float(np.mean(fold_floor)), 2)}
    keys = ["none", "groups", "groups+train"]
    mean = {k: round(float(np.mean([v["dev"][k] for v in per_seed.values()])), 2) for k in keys}
    return {"model": model, "seeds": list(per_seed), "per_seed": per_seed, "dev_mean": mean,
            "dev_majority_floor": next(iter(per_seed.values()))["dev_majority_floor"],
            "train_2fold_groups_mean": round(float(np.mean([v["train_2fold_groups"] for v in per_seed.values()])), 2),
            "train_2fold_floor": next(iter(per_seed.values()))["train_2fold_floor"],
            "settings": {k: v for k, v in overrides.items() if k != "progress"}}


__all__ = ["evaluate", "premise_folds"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="WNLI: dev accuracy of each treatment and a premise-disjoint "
                                "2-fold estimate of `groups` on train (vegalm/experiments/wnli.py).")
    p.add_argument("--model", required=True)
    p.add_argument("--seeds", default="3")
    p.add_argument("--out", default="runs/wnli")
    p.add_argument("--results", default=None, help="also write RESULTS/<model-tag>.json (small; commit it)")
    p.add_argument("--glue-dir", default=None)
    p.add_argument("settings", nargs="*", metavar="key=value", help="FinetuneConfig overrides for every run")
    args = p.parse_args(argv)
    res = evaluate(args.model, args.seeds, args.out, args.glue_dir, **apply_overrides({}, args.settings))
    if args.results:
        dest = Path(args.results) / f"{model_tag(args.model)}.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dest, json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

