"""`vegalm pretrain`: tokenizer -> packed segments -> phase 1 (RTD) -> phase 2 (RTD + SimCSE) -> export.

    vegalm pretrain --recipe recipes/tiny.yaml --out runs/pt                  # CPU default, minutes
    vegalm pretrain --recipe recipes/tiny.yaml --out runs/pt phase1.train.max_steps=50
    torchrun --nproc_per_node 8 -m vegalm.cli pretrain --recipe recipes/base.yaml --out runs/base
    torchrun --nproc_per_node 8 -m vegalm.cli pretrain --recipe recipes/vega-1.3b.yaml --out /ckpt/vega   # FSDP

Every stage (tokenizer, packed data, each phase, the export) is keyed by the settings and inputs that
determine it (vegalm.cache): a finished stage with the same key is skipped, one with another key is trained
again with every later stage under --retrain, else the run stops naming the changed keys. A phase that was
interrupted resumes from its latest checkpoint (bit-exact on CPU), so re-running the same command continues.

Outputs under OUT: tokenizer/, data/ (memory-mapped segments), phase1/ and phase2/ (metrics.jsonl,
tb/, checkpoints/), and the export: discriminator/ (RTD; transformers DebertaV2Model + tokenizer)
or encoder/ (MLM baseline; DebertaV2ForMaskedLM + tokenizer), generator/ (RTD), summary.json.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vegalm.cache import StaleStageError, check_stage, config_hash, read_stage, stage_key, write_stage
from vegalm.config import ConfigError, from_dict, to_dict
from vegalm.errors import VegaError
from vegalm.model import EncoderConfig
from vegalm.pretrain.gdes import unshare
from vegalm.pretrain.health import HealthCallback, HealthConfig, build_health
from vegalm.pretrain.rtd import ObjectiveConfig, build_pretrain_model, objective
from vegalm.train.fsdp import full_state_dict, is_sharded
from vegalm.train.hardware import process_state
from vegalm.train.trainer import TrainConfig, Trainer

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    corpus: str = field(default="../shared/data/corpus/*/*.txt.gz", metadata={
        "path": True, "help": "glob, folder, file or comma-separated list; relative: to the recipe file if it is "
                              "there, else to the working directory"})  # fmt: skip
    tokenizer: str | None = field(default=None, metadata={
        "path": True, "help": "an existing tokenizer folder; None: train one into OUT/tokenizer"})
    vocab_size: int = 8000
    tokenizer_max_docs: int | None = 4000
    seq_len: int = 128
    max_docs: int | None = None  # pretrain on the first N documents only (streaming: per epoch, over all ranks)
    num_proc: int = 2
    streaming: bool = field(default=False, metadata={
        "help": "pack documents on the fly while training (datasets streaming for hf: corpora) instead of building "
                "data/ first; each process reads a disjoint shard and resumes at the exact document"})
    shuffle_buffer: int = field(default=0, metadata={
        "help": "streaming, hf: corpora: shuffle each epoch through a buffer of N records (0: file order)"})

    def check(self) -> None:
        for key in ("vocab_size", "seq_len", "num_proc", "tokenizer_max_docs", "max_docs"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        if self.shuffle_buffer < 0 or (self.shuffle_buffer and not self.streaming):
            raise ConfigError(f"shuffle_buffer: must be >= 0 and needs data.streaming=true, got {self.shuffle_buffer}")


@dataclass
class GlueConfig:
    """`vegalm run`'s fine-tuning section: tasks and seeds, and FinetuneConfig fields for every run (flat)."""

    tasks: list[str] = field(default_factory=lambda: ["cola", "sst2", "mrpc", "stsb", "rte", "wnli"],
                             metadata={"help": "GLUE tasks to fine-tune on"})  # fmt: skip
    seeds: int = field(default=1, metadata={"help": "fine-tuning seeds per task"})
    settings: dict[str, Any] = field(default_factory=dict, metadata={
        "rest": True, "help": "the section's other keys: FinetuneConfig fields (lr, epochs, max_train_samples, ...)"})

    def check(self) -> None:
        from vegalm.finetune.config import FinetuneConfig, flat_settings  # lazy: the recipe loads before torch is needed

        if self.seeds < 1:
            raise ConfigError(f"seeds: must be >= 1, got {self.seeds}")
        flat = flat_settings(self.settings)  # seed= and train.seed= are one key
        given = [k for k in ("task", "model", "out", "seed") if k in flat]
        if given:
            raise ConfigError(f"{given[0]}: set by `vegalm run` itself (use glue.tasks / glue.seeds)")
        from_dict(FinetuneConfig, {**self.settings, "task": (self.tasks or ["rte"])[0], "model": "-", "out": "-"})


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
    glue: GlueConfig = field(default_factory=GlueConfig, metadata={
        "merge": "replace", "help": "fine-tuning section, read by `vegalm run`; a recipe's own replaces its base's"})
    baseline: str | None = field(default=None, metadata={
        "path": True, "help": "recipe of the MLM baseline that `vegalm run` compares against"})
    health: HealthConfig = field(default_factory=HealthConfig)  # held-out metrics and the STS-B probe (health.py)

    def check(self) -> None:
        if self.model.position_biased_input and self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"data.seq_len: must be <= model.max_position_embeddings "
                              f"({self.model.max_position_embeddings}) with model.position_biased_input=true, "
                              f"got {self.data.seq_len}")  # fmt: skip


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


def prepare_data(cfg: RecipeConfig, out: Path, data_dir: Path | None = None, tokenizer_dir: Path | None = None,
                 retrain: bool = False):  # fmt: skip
    """Tokenizer and packed segments, each a stage keyed by its inputs (vegalm.cache): reused when they match,
    rebuilt when `retrain`, else StaleStageError. Returns (tokenizer, tokenizer dir, store); store is None under
    data.streaming (the segments are packed while training, `stream_segments`)."""
    from vegalm.data.packing import build_segments
    from vegalm.data.tokenizer import load_tokenizer, train_tokenizer

    tok_dir = Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(tokenizer_dir or out / "tokenizer")
    if cfg.data.tokenizer and not (tok_dir / "tokenizer.json").is_file():
        raise VegaError(f"data.tokenizer: {tok_dir} has no tokenizer.json")
    if not cfg.data.tokenizer:  # a stage: a leftover tokenizer of another corpus or vocab_size is never reused
        train_tokenizer(cfg.data.corpus, cfg.data.vocab_size, tok_dir, max_docs=cfg.data.tokenizer_max_docs,
                        retrain=retrain)  # fmt: skip
    tokenizer = load_tokenizer(tok_dir)
    if cfg.data.streaming:
        return tokenizer, tok_dir, None
    store = build_segments(tokenizer, cfg.data.corpus, Path(data_dir or out / "data"), cfg.data.seq_len, seed=cfg.phase1.train.seed,
                           num_proc=cfg.data.num_proc, max_docs=cfg.data.max_docs, retrain=retrain)  # fmt: skip
    return tokenizer, tok_dir, store


def stream_segments(cfg: RecipeConfig, tokenizer, rank: int, world_size: int):
    """This process's StreamingSegments of data.corpus (its disjoint shard), packed as build_segments packs."""
    from vegalm.data.streaming import StreamingSegments

    max_docs = None if cfg.data.max_docs is None else max(1, cfg.data.max_docs // world_size)  # per rank
    return StreamingSegments(cfg.data.corpus, tokenizer, cfg.data.seq_len, rank=rank, world_size=world_size,
                             seed=cfg.phase1.train.seed, max_docs=max_docs, shuffle_buffer=cfg.data.shuffle_buffer)


# TrainConfig fields that change what is logged or kept on disk, or memory and not the weights: not in a phase's key.
_UNKEYED = ("progress", "log_every", "save_every", "keep_last", "num_workers", "fsdp_reshard_after_forward",
            "activation_checkpointing")
_KEYED_WHEN_SET = {"fsdp": False}  # newer fields: keyed only away from their default, so older keys stay valid


def phase_keys(cfg: RecipeConfig, data_key: dict | None) -> list[tuple[str, PhaseConfig, dict]]:
    """(name, settings, stage key) of each phase: its section, the model, the held-out split, the packed data's
    key and the previous phase's key, so a change re-keys that phase and every later one (and the export)."""
    out, prev = [], None
    for name in ("phase1", "phase2"):
        phase = getattr(cfg, name)
        if phase is not None:
            settings = to_dict(phase)
            settings["train"] = {k: v for k, v in settings["train"].items()
                                 if k not in _UNKEYED and not (k in _KEYED_WHEN_SET and v == _KEYED_WHEN_SET[k])}
            prev = stage_key(**{name: settings}, model=to_dict(cfg.model), health=to_dict(cfg.health),
                             data=data_key, previous=prev)  # a changed key reads `phase1.train.lr: 0.001 -> ...`
            out.append((name, phase, prev))
    return out


def _phase_state(pdir: Path, key: dict, retrain: bool) -> str:
    """check_stage for a phase; a finished phase from before stage records is adopted when recipe.json agrees."""
    recorded = _done(pdir) is not None and read_stage(pdir) is None
    if recorded:
        try:
            old = json.loads((pdir.parent / "recipe.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        old_phase = old.get(pdir.name) or {}
        old_phase = {**old_phase, "train": {k: v for k, v in (old_phase.get("train") or {}).items() if k not in _UNKEYED}}
        if old_phase == key[pdir.name] and old.get("model") == key["model"]:
            write_stage(pdir, key)
    state = check_stage(pdir, key, retrain=retrain)
    if state == "missing" and recorded:  # finished with settings nobody recorded
        if not retrain:
            raise StaleStageError(f"{pdir} was made with settings that were not recorded; pass --retrain to "
                                  "build it again")  # fmt: skip
        return "retrain"
    return state


def run_pretrain(cfg: RecipeConfig, out: str | Path, resume: bool = True, data_dir: Path | None = None,
                 tokenizer_dir: Path | None = None, retrain: bool = False) -> dict:
    """Pretrain per the recipe into `out` (locked: a second run on it fails at once). `data_dir` / `tokenizer_dir`
    let several runs share them. A finished stage made with other settings is retrained (with every later one)
    when `retrain`, else StaleStageError names the changed keys."""
    from vegalm.outdir import lock_dir

    with lock_dir(out):
        return _run_pretrain(cfg, Path(out), resume, data_dir, tokenizer_dir, retrain)


def _run_pretrain(cfg: RecipeConfig, out: Path, resume: bool, data_dir: Path | None, tokenizer_dir: Path | None,
                  retrain: bool) -> dict:  # fmt: skip
    t0 = time.time()
    procs = process_state()  # under torchrun: the process group; the main process builds the data, the rest reuse it
    with procs.main_process_first():
        tokenizer, tok_dir, store = prepare_data(cfg, out, data_dir, tokenizer_dir, retrain and procs.is_main_process)
    stream_set = None
    if store is None:  # data.streaming
        stream_set = stream_segments(cfg, tokenizer, procs.process_index, procs.num_processes)
        data_key = {"streaming": stream_set.describe(), "max_docs": cfg.data.max_docs}  # rank-independent
    else:
        data_key = read_stage(Path(data_dir or out / "data"))
    keyed = phase_keys(cfg, data_key)
    states = {name: _phase_state(out / name, key, retrain) for name, _, key in keyed}  # refuse before any training
    model_cfg = replace(cfg.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if cfg.model.vocab_size != model_cfg.vocab_size:
        log.info("model.vocab_size set to the tokenizer's %d", model_cfg.vocab_size)
    special = tuple(t for t in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) if t is not None)
    mask_id = tokenizer.mask_token_id
    if procs.is_main_process and any(state != "done" for state in states.values()):  # what is (being) trained
        _write_json(out / "recipe.json", to_dict(cfg))
    if store is None:
        if cfg.health.heldout_segments and procs.is_main_process:
            log.warning("health: no held-out metrics under data.streaming (they need a packed store, data/)")
        train_set, health = stream_set, HealthCallback([], cfg.health, None)
    else:
        train_set, health = build_health(cfg.health, store, _collate, special, model_cfg.vocab_size)

    model, prev, accelerator, summaries, trained, stream = None, None, None, {}, False, None
    for name, phase, key in keyed:
        # Seeded init: torch's default generator is seeded randomly per process, and a phase that is
        # skipped (done.json) or resumed must build the same initial weights (phase 2's new SimCSE head).
        torch.manual_seed(phase.train.seed)
        model = build_pretrain_model(model_cfg, phase.objective, mask_id, special)
        if prev is not None:  # continue from the previous phase's weights (a new phase may add the SimCSE head)
            missing, unexpected = model.load_state_dict(prev, strict=False)
            if unexpected or any(not k.startswith("cl_head.") for k in missing):
                raise VegaError(f"{name}: its model does not continue {keyed[0][0]}'s "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]}); keep model/objective shapes equal")  # fmt: skip
        pdir = out / name
        if states[name] == "retrain" and procs.is_main_process:  # a finished phase of other settings (ours)
            shutil.rmtree(pdir)
        procs.wait_for_everyone()
        done = _done(pdir) if states[name] == "done" else None
        trainer = Trainer(model, objective, train_set, _collate, phase.train, pdir, callbacks=[health],
                          accelerator=accelerator)  # fmt: skip
        accelerator = trainer.accelerator
        if stream is not None and trainer.sampler is not None:  # a streamed set simply reads on
            continue_stream(trainer.sampler, stream)
        if done is not None:
            # Finished earlier: restore its final weights, skip the training.
            from vegalm.train.checkpoint import latest_checkpoint, load_checkpoint

            sharded = is_sharded(trainer.model)
            state = load_checkpoint(latest_checkpoint(trainer.ckpt_root), model=None if sharded else trainer.model,
                                    sharded=(trainer.model, None) if sharded else None, restore_rng_state=False,
                                    rank=procs.process_index)  # fmt: skip
            summaries[name] = done
            stream = state["sampler"]
            if trainer.stream is not None:  # where this phase's stream stopped: the next phase reads on from there
                trainer.stream.load_state_dict(state["rank_state"]["stream"])
            log.info("%s: complete (step %s), skipped", name, done.get("step"))
        else:
            summaries[name] = trainer.train(resume=resume)
            stream = trainer.sampler.state_dict() if trainer.sampler is not None else None
        model = _unsharded(trainer.model, model_cfg, phase.objective, mask_id, special)
        if done is None:
            summaries[name].update(_phase_probes(model, tokenizer, cfg.health, health))
            trained = True
            if trainer.is_main:
                _write_json(pdir / "done.json", summaries[name])
                write_stage(pdir, key)
        prev = model.state_dict()

    result = {"recipe": cfg.name, "phases": summaries, "wall_s": time.time() - t0, "tokenizer": str(tok_dir)}
    if accelerator is None or accelerator.is_main_process:
        # A re-run of a finished recipe keeps its export: rewriting unchanged weights only costs time
        # (fine-tuning caches key on the weights' content, finetune/config.py `resolve`).
        export_key = config_hash(keyed[-1][2])  # the export is what the last phase trained
        previous = None if trained else _previous_export(out, export_key)
        if previous is not None:
            log.info("export: %s is complete, skipped", previous["model_path"])
        else:
            (out / "summary.json").unlink(missing_ok=True)  # so an export cut short is never taken as complete
        result.update(previous or export(model, tokenizer, out))
        result["stage_key"] = export_key
        _write_json(out / "summary.json", result)
    return result


def _unsharded(model, model_cfg: EncoderConfig, obj: ObjectiveConfig, mask_id: int, special: tuple[int, ...]):
    """`model` itself, or under FSDP a plain copy holding the gathered weights on every process (for the next phase,
    the probes and the export; one full copy per process, on the CPU)."""
    if not is_sharded(model):
        return model
    plain = build_pretrain_model(model_cfg, obj, mask_id, special)
    plain.load_state_dict(full_state_dict(model, everywhere=True))
    return plain


def continue_stream(sampler, state: dict) -> None:
    """Start a phase's sampler where the previous phase's stopped: the same permutations (its seed), so a
    later phase sees new segments until the corpus is exhausted (docs/pretraining.md, "Phases")."""
    sampler.seed, sampler.epoch, sampler.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
    if sampler.position + sampler.global_batch > sampler.num_samples:
        sampler.epoch, sampler.position = sampler.epoch + 1, 0


def _phase_probes(model, tokenizer, hcfg: HealthConfig, health) -> dict:
    """A phase's end: the held-out health metrics and the zero-shot STS-B Spearman (x 100)."""
    from vegalm.pretrain.probe import encoder_of, sts_zero_shot

    res = {"heldout": dict(health.last_eval)}
    if hcfg.sts_dev and Path(hcfg.sts_dev).is_file():
        res["sts_zero_shot"] = sts_zero_shot(encoder_of(model), tokenizer, hcfg.sts_dev, hcfg.sts_pooling)
    elif hcfg.sts_dev:
        log.warning("health.sts_dev: %s not found, zero-shot STS-B skipped", hcfg.sts_dev)
    return res


def _previous_export(out: Path, key: str) -> dict | None:
    """The export paths recorded in out/summary.json, if it was made from stages of `key` and every exported
    folder is still complete."""
    try:
        prev = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if prev.get("stage_key") not in (key, None):  # None: an export from before stage keys, of the same phases
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
