"""Task-adaptive continued RTD pretraining: transductive fine-tuning, variant (a).

    vegalm tapt --task rte --model runs/pt --out runs/tapt/rte                 # then fine-tune from it:
    vegalm finetune --task rte --model runs/tapt/rte/discriminator --out runs/ft/rte-tapt
    vegalm tapt --task cola --model runs/pt/discriminator --out runs/tapt/cola train.epochs=20 train.lr=5e-5

Before fine-tuning on a GLUE task, continue the pretraining objective (RTD, generator + discriminator,
GDES) on that task's own text: every sentence of its train, dev AND test files (`data.glue.task_texts`;
test inputs are public on GLUE, their labels do not exist and are never read). This is "task-adaptive
pretraining" (TAPT, Gururangan et al. 2020, arXiv 2004.10964), with ELECTRA/DeBERTa-v3's RTD in place of
their MLM. It needs the RTD generator, so it applies to our own pretrained encoders (a `vegalm pretrain`
output or its discriminator/ folder with generator/ beside it), not to a transformers backbone that
ships without one (MiniLM-L6 has neither generator nor MLM head).

Continuing, not restarting: the exported discriminator's word embeddings are E_G + E_delta folded into
one table (gdes.py); `reshare` splits them again (E_delta := E_D - E_G), so the discriminator computes
exactly what it did at export and GDES keeps training E_G with MLM only and E_delta with RTD only.

Text -> segments: each distinct sentence is one document; documents are packed into `seq_len` segments
with the same packer as pretraining (data/corpus.py), written to OUT/texts.txt and OUT/data/.

Defaults (TaptConfig) and why:
  * train.epochs 10: TAPT trains 100 epochs on tasks of 0.5k-20k examples, with a base-size model on
    GPUs; 10 keeps a CPU run of the small sizes in minutes (RTE: 11.2k distinct sentences ~ 0.37M
    WordPiece-like tokens ~ 2.9k segments of 128, ~90 steps per epoch at batch 32) and still passes over
    every test sentence 10 times. Raise it on a GPU.
  * train.lr 1e-4, warm-up 6%, linear decay: TAPT's lr and RoBERTa's warm-up share; the last
    pretraining lr of our small recipes is lower, but the short schedule has to move the model.
  * objective: RTD with lambda 50 and 15% masking, as in phase 1; cl_weight 0 (the SimCSE term of
    phase 2 can be switched on with objective.cl_weight=...).
Outputs: OUT/discriminator (fine-tune this), OUT/generator, OUT/train/ (metrics.jsonl, tb/), OUT/summary.json.
A finished OUT is skipped on a rerun when its settings match; an interrupted one resumes from its latest
checkpoint. The settings compared are TaptConfig with its paths replaced by content: the sha256 of the
discriminator's and generator's weights and configs and of the task text, so a copied or moved model,
data folder or OUT is still a match, and a changed byte in any of them is not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vegalm.cache import fingerprint
from vegalm.config import ConfigError, to_dict
from vegalm.errors import VegaError
from vegalm.pretrain.rtd import ObjectiveConfig, RTDModel, objective
from vegalm.pretrain.run import _collate, _done, _previous_export, _write_json, export
from vegalm.train.trainer import TrainConfig, Trainer

log = logging.getLogger(__name__)


def _default_train() -> TrainConfig:
    return TrainConfig(epochs=10, lr=1e-4, warmup_ratio=0.06, batch_size=32, save_every=200, log_every=10)


@dataclass
class TaptConfig:
    task: str = ""
    model: str = ""  # a `vegalm pretrain` output folder, or its discriminator/ folder
    out: str = ""
    generator: str | None = None  # None: generator/ beside the discriminator
    glue_dir: str | None = None  # None: $VEGALM_GLUE_DIR or ../shared/data/glue
    seq_len: int = 128
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=_default_train)

    def check(self) -> None:
        for key in ("task", "model", "out"):
            if not getattr(self, key):
                raise ConfigError(f"{key}: required (e.g. task=rte model=runs/pt out=runs/tapt/rte)")
        if self.objective.kind != "rtd":
            raise ConfigError(f"objective.kind: task-adaptive pretraining continues RTD, got {self.objective.kind!r}")
        if self.seq_len < 8:
            raise ConfigError(f"seq_len: expected >= 8, got {self.seq_len}")
        self.train.check()


def load_tapt_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> TaptConfig:
    """TaptConfig from an optional YAML file and key=value overrides, over TaptConfig()'s own defaults
    (so `train.lr=5e-5` keeps the 10 epochs instead of falling back to TrainConfig's max_steps)."""
    from vegalm.config import deep_merge, apply_overrides, from_dict, load_yaml

    data = deep_merge(to_dict(TaptConfig()), load_yaml(recipe) if recipe else {})
    try:
        return from_dict(TaptConfig, apply_overrides(data, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{recipe}: {e}" if recipe else str(e)) from None


def resolve_pair(model: str | Path, generator: str | Path | None = None) -> tuple[Path, Path]:
    """(discriminator dir, generator dir) from a pretraining output or a discriminator folder."""
    path = Path(model)
    if (path / "summary.json").is_file() and not (path / "config.json").is_file():
        s = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        if "generator_path" not in s:
            raise VegaError(f"{path}: an MLM-only pretraining run has no RTD generator; task-adaptive RTD "
                            "needs a `vegalm pretrain` RTD output")
        disc, gen = Path(s["model_path"]), Path(generator or s["generator_path"])
    else:
        disc = path
        gen = Path(generator) if generator else path.parent / "generator"
    for name, d in (("model", disc), ("generator", gen)):
        if not (d / "config.json").is_file():
            hint = (" (task-adaptive RTD needs the RTD generator: only our own pretrained encoders have one; "
                    "pass generator=PATH if it lives elsewhere)") if name == "generator" else ""
            raise VegaError(f"{name}: {d} has no config.json{hint}")
    return disc, gen


def load_rtd_pair(disc_dir: Path, gen_dir: Path, obj: ObjectiveConfig, tokenizer) -> RTDModel:
    """An RTDModel continuing an exported (generator, discriminator) pair, embeddings re-shared."""
    from vegalm.model import VegaForMaskedLM, VegaForRTD

    disc = VegaForRTD.from_pretrained(disc_dir)
    gen = VegaForMaskedLM.from_pretrained(gen_dir)
    if disc.config.vocab_size != gen.config.vocab_size:
        raise VegaError(f"{gen_dir}: vocabulary {gen.config.vocab_size} differs from the discriminator's "
                        f"{disc.config.vocab_size}; give the generator of the same pretraining run")
    special = tuple(t for t in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) if t is not None)
    if tokenizer.mask_token_id is None:
        raise VegaError(f"{disc_dir}: the tokenizer has no [MASK] token")
    return RTDModel.from_parts(gen, disc, obj, tokenizer.mask_token_id, special)


def cache_settings(cfg: TaptConfig, disc_dir: Path, gen_dir: Path, doc: str) -> dict:
    """What a finished run must match to be reused: the config without its paths, plus the content of
    the models and of the task text they point to."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("model", "generator", "glue_dir", "out")}
    settings.update(discriminator=fingerprint(disc_dir), generator=fingerprint(gen_dir),
                    texts_sha256=hashlib.sha256(doc.encode("utf-8")).hexdigest()[:16])
    return settings


def run_tapt(cfg: TaptConfig | dict, resume: bool = True) -> dict:
    """Continue RTD on the task's text; export OUT/discriminator and OUT/generator. Returns the summary."""
    from transformers import AutoTokenizer

    from vegalm.config import deep_merge, from_dict
    from vegalm.data.packing import build_segments
    from vegalm.data.glue import get_task, resolve_glue_dir, task_texts
    cfg = from_dict(TaptConfig, deep_merge(to_dict(TaptConfig()), cfg)) if isinstance(cfg, dict) else cfg
    cfg.check()
    spec = get_task(cfg.task)
    out = Path(cfg.out)
    disc_dir, gen_dir = resolve_pair(cfg.model, cfg.generator)
    texts = task_texts(spec.name, str(resolve_glue_dir(cfg.glue_dir)))
    if not texts:
        raise VegaError(f"tapt: {spec.name} has no text under {resolve_glue_dir(cfg.glue_dir)}")
    doc = "".join(" ".join(t.split()) + "\n\n" for t in texts)  # one sentence per document
    settings = cache_settings(cfg, disc_dir, gen_dir, doc)
    prev = _previous_export(out, None)  # TAPT reuse is decided by done.json's settings
    done = _done(out / "train")
    if prev is not None and done is not None and done.get("config") == settings:
        log.info("tapt: %s is complete, skipped", out)
        return {**json.loads((out / "summary.json").read_text(encoding="utf-8")), "cached": True}
    if done is not None and done.get("config") != settings:  # finished with other settings: start over
        log.info("tapt: %s was trained with other settings; retraining", out)
        shutil.rmtree(out / "train")
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    txt = out / "texts.txt"
    if not txt.is_file() or txt.read_text(encoding="utf-8") != doc:
        txt.write_text(doc, encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(disc_dir))
    store = build_segments(tokenizer, str(txt), out / "data", cfg.seq_len, seed=cfg.train.seed, num_proc=1,
                           progress=cfg.train.progress, retrain=True)  # texts.txt is the task's: follow it
    torch.manual_seed(cfg.train.seed)
    model = load_rtd_pair(disc_dir, gen_dir, cfg.objective, tokenizer)
    trainer = Trainer(model, objective, store, _collate, cfg.train, out / "train")
    summary = trainer.train(resume=resume)
    result = {"task": spec.name, "texts": len(texts), "segments": len(store), "from": str(disc_dir),
              "generator_from": str(gen_dir), "train": summary,
              "wall_s": round(time.time() - t0 + summary["elapsed_before"], 2)}  # a resumed run's earlier steps count
    if trainer.is_main:
        _write_json(out / "train" / "done.json", {**summary, "config": settings})
        (out / "summary.json").unlink(missing_ok=True)
        result.update(export(trainer.model, tokenizer, out))
        _write_json(out / "summary.json", result)
    return {**result, "cached": False}


__all__ = ["TaptConfig", "load_tapt_config", "run_tapt", "resolve_pair", "load_rtd_pair"]
