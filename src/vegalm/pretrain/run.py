"""`vegalm pretrain`: tokenizer -> packed segments -> phase 1 (RTD) -> phase 2 (RTD + SimCSE) -> export.

    vegalm pretrain --recipe recipes/tiny.yaml --out runs/pt                  # CPU default, minutes
    vegalm pretrain --recipe recipes/tiny.yaml --out runs/pt phase1.train.max_steps=50
    torchrun --nproc_per_node 8 -m vegalm.cli pretrain --recipe recipes/base.yaml --out runs/base
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m vegalm.cli pretrain \\
        --recipe recipes/vega-1.3b.yaml --out /ckpt/vega

Every stage is skipped when its output is complete, and a phase that was interrupted resumes
from its latest checkpoint (bit-exact on CPU), so re-running the same command continues.

Outputs under OUT: tokenizer/, data/ (memory-mapped segments), phase1/ and phase2/ (metrics.jsonl,
tb/, checkpoints/), and the export: discriminator/ (RTD; transformers DebertaV2Model + tokenizer)
or encoder/ (MLM baseline; DebertaV2ForMaskedLM + tokenizer), generator/ (RTD), summary.json.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vegalm.config import to_dict
from vegalm.errors import VegaError
from vegalm.model import EncoderConfig
from vegalm.pretrain.gdes import unshare
from vegalm.pretrain.rtd import ObjectiveConfig, build_pretrain_model, objective
from vegalm.train.trainer import TrainConfig, Trainer

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    corpus: str = "../shared/data/corpus/*/*.txt.gz"
    tokenizer: str | None = None  # an existing tokenizer folder; None: train one into OUT/tokenizer
    vocab_size: int = 8000
    tokenizer_max_docs: int | None = 4000
    seq_len: int = 128
    max_docs: int | None = None  # pretrain on the first N documents only
    num_proc: int = 2


@dataclass
class PhaseConfig:
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class RecipeConfig:
    """A whole recipe. `vegalm pretrain` reads model/data/phase1/phase2; `vegalm run` also glue/baseline."""

    name: str = "recipe"
    model: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    phase1: PhaseConfig = field(default_factory=PhaseConfig)
    phase2: PhaseConfig | None = None
    glue: dict[str, Any] = field(default_factory=dict)  # fine-tuning section, read by `vegalm run`
    baseline: str | None = None  # recipe of the MLM baseline that `vegalm run` compares against


def _collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack segments and cut the all-padding tail columns (short final segments of documents)."""
    ids = torch.stack([x["input_ids"] for x in items])
    mask = torch.stack([x["attention_mask"] for x in items])
    n = int(mask.sum(1).max())
    return {"input_ids": ids[:, :n].contiguous(), "attention_mask": mask[:, :n].contiguous()}


def _done(path: Path) -> dict | None:
    f = path / "done.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def prepare_data(cfg: RecipeConfig, out: Path, data_dir: Path | None = None, tokenizer_dir: Path | None = None):
    """Tokenizer (trained once) and packed segments (cached). Returns (tokenizer, tokenizer dir, store)."""
    from vegalm.data.corpus import build_segments
    from vegalm.data.tokenizer import load_tokenizer, train_tokenizer

    tok_dir = Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(tokenizer_dir or out / "tokenizer")
    if not (tok_dir / "tokenizer.json").is_file():
        if cfg.data.tokenizer:
            raise VegaError(f"data.tokenizer: {tok_dir} has no tokenizer.json")
        log.info("training a %d-piece tokenizer on %s", cfg.data.vocab_size, cfg.data.corpus)
        train_tokenizer(cfg.data.corpus, cfg.data.vocab_size, tok_dir, max_docs=cfg.data.tokenizer_max_docs)
    tokenizer = load_tokenizer(tok_dir)
    store = build_segments(tokenizer, cfg.data.corpus, Path(data_dir or out / "data"), cfg.data.seq_len, seed=cfg.phase1.train.seed,
                           num_proc=cfg.data.num_proc, max_docs=cfg.data.max_docs)  # fmt: skip
    return tokenizer, tok_dir, store


def run_pretrain(cfg: RecipeConfig, out: str | Path, resume: bool = True, data_dir: Path | None = None,
                 tokenizer_dir: Path | None = None) -> dict:
    """Pretrain per the recipe into `out`. `data_dir` / `tokenizer_dir` let several runs share them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tokenizer, tok_dir, store = prepare_data(cfg, out, data_dir, tokenizer_dir)
    model_cfg = replace(cfg.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if cfg.model.vocab_size != model_cfg.vocab_size:
        log.info("model.vocab_size set to the tokenizer's %d", model_cfg.vocab_size)
    special = tuple(t for t in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) if t is not None)
    mask_id = tokenizer.mask_token_id
    _write_json(out / "recipe.json", to_dict(cfg))

    phases = [("phase1", cfg.phase1)] + ([("phase2", cfg.phase2)] if cfg.phase2 is not None else [])
    model, accelerator, summaries, trained = None, None, {}, False
    for name, phase in phases:
        prev = model
        # Seeded init: torch's default generator is seeded randomly per process, and a phase that is
        # skipped (done.json) or resumed must build the same initial weights (phase 2's new SimCSE head).
        torch.manual_seed(phase.train.seed)
        model = build_pretrain_model(model_cfg, phase.objective, mask_id, special)
        if prev is not None:  # continue from the previous phase's weights (a new phase may add the SimCSE head)
            missing, unexpected = model.load_state_dict(prev.state_dict(), strict=False)
            if unexpected or any(not k.startswith("cl_head.") for k in missing):
                raise VegaError(f"{name}: its model does not continue {phases[0][0]}'s "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]}); keep model/objective shapes equal")  # fmt: skip
        pdir = out / name
        done = _done(pdir)
        trainer = Trainer(model, objective, store, _collate, phase.train, pdir, accelerator=accelerator)
        accelerator = trainer.accelerator
        if done is not None:
            # Finished earlier: restore its final weights, skip the training.
            from vegalm.train.checkpoint import latest_checkpoint, load_checkpoint

            load_checkpoint(latest_checkpoint(trainer.ckpt_root), model=trainer.model, restore_rng_state=False)
            summaries[name] = done
            log.info("%s: complete (step %s), skipped", name, done.get("step"))
        else:
            summaries[name] = trainer.train(resume=resume)
            trained = True
            if trainer.is_main:
                _write_json(pdir / "done.json", summaries[name])
        model = trainer.model

    result = {"recipe": cfg.name, "phases": summaries, "wall_s": time.time() - t0, "tokenizer": str(tok_dir)}
    if accelerator is None or accelerator.is_main_process:
        # A re-run of a finished recipe keeps its export: rewriting unchanged weights only costs time
        # (fine-tuning caches key on the weights' content, finetune/runner.py `_fingerprint`).
        previous = None if trained else _previous_export(out)
        if previous is not None:
            log.info("export: %s is complete, skipped", previous["model_path"])
        else:
            (out / "summary.json").unlink(missing_ok=True)  # so an export cut short is never taken as complete
        result.update(previous or export(model, tokenizer, out))
        _write_json(out / "summary.json", result)
    return result


def _previous_export(out: Path) -> dict | None:
    """The export paths recorded in out/summary.json, if every exported folder is still complete."""
    try:
        prev = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    paths = {k: prev[k] for k in ("model_path", "generator_path") if isinstance(prev.get(k), str)}
    complete = all((Path(p) / f).is_file() for p in paths.values() for f in ("config.json", "model.safetensors"))
    return paths if "model_path" in paths and complete else None


def export(model, tokenizer, out: Path) -> dict:
    """Write the transformers-format models; GDES is folded into a plain embedding table."""
    import copy

    from vegalm.pretrain.rtd import RTDModel

    model = copy.deepcopy(model).cpu()
    if isinstance(model, RTDModel):
        disc = model.discriminator
        unshare(disc)
        disc.save_pretrained(out / "discriminator", tokenizer=tokenizer)
        model.generator.save_pretrained(out / "generator", tokenizer=tokenizer)
        return {"model_path": str(out / "discriminator"), "generator_path": str(out / "generator")}
    model.mlm.save_pretrained(out / "encoder", tokenizer=tokenizer)
    return {"model_path": str(out / "encoder")}


def model_path(out: str | Path) -> Path:
    """Where a finished pretraining run keeps the encoder to fine-tune."""
    s = json.loads((Path(out) / "summary.json").read_text())
    return Path(s["model_path"])
