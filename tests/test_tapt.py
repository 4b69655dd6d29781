"""Task-adaptive continued RTD (transductive fine-tuning (a)) on real WNLI text with a tiny exported pair."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vegalm.data.glue import task_texts
from vegalm.data.tokenizer import load_tokenizer, train_tokenizer
from vegalm.errors import VegaError
from vegalm.model import EncoderConfig
from vegalm.pretrain.gdes import GDESEmbedding
from vegalm.pretrain.rtd import ObjectiveConfig, RTDModel
from vegalm.pretrain.run import export
from vegalm.pretrain.tapt import load_rtd_pair, load_tapt_config, resolve_pair, run_tapt
from _data import GLUE_DIR, needs_glue

pytestmark = [needs_glue,
              pytest.mark.usefixtures("fresh_accelerate")]




@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A `vegalm pretrain`-style output: tokenizer trained on WNLI text, RTD pair with a non-zero E_delta."""
    root = tmp_path_factory.mktemp("pt")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(t + "\n\n" for t in task_texts("wnli", GLUE_DIR)), encoding="utf-8")
    train_tokenizer(str(corpus), 600, root / "tokenizer", max_docs=None)
    tok = load_tokenizer(root / "tokenizer")
    cfg = EncoderConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, position_buckets=16, max_relative_positions=64)
    torch.manual_seed(0)
    model = RTDModel(cfg, ObjectiveConfig(), tok.mask_token_id, (tok.cls_token_id, tok.sep_token_id, 0))
    with torch.no_grad():  # as after pretraining: the discriminator's table is not the generator's
        model.discriminator.deberta.embeddings.word_embeddings.delta.normal_(0, 0.05)
        model.discriminator.mask_predictions.classifier.bias.fill_(0.3)  # the RTD head must reload too
    paths = export(model, tok, root)
    (root / "summary.json").write_text(json.dumps(paths), encoding="utf-8")
    return root


def _batch(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_reloaded_pair_computes_what_was_exported(pretrained):
    disc_dir, gen_dir = resolve_pair(pretrained)
    assert disc_dir == pretrained / "discriminator" and gen_dir == pretrained / "generator"
    assert resolve_pair(disc_dir) == (disc_dir, gen_dir)
    tok = load_tokenizer(disc_dir)
    from vegalm.model import VegaForMaskedLM, VegaForRTD

    ref_d = VegaForRTD.from_pretrained(disc_dir).eval()
    ref_g = VegaForMaskedLM.from_pretrained(gen_dir).eval()
    model = load_rtd_pair(disc_dir, gen_dir, ObjectiveConfig(), tok).eval()
    emb = model.discriminator.deberta.embeddings.word_embeddings
    assert isinstance(emb, GDESEmbedding) and emb.delta.abs().max() > 0.01  # E_delta recovered, not zero
    ids, mask = _batch(tok, task_texts("wnli", GLUE_DIR)[:4])
    with torch.no_grad():
        assert torch.allclose(model.discriminator(ids, mask).logits, ref_d(ids, mask).logits, atol=1e-5)
        assert torch.allclose(model.generator(ids, mask, full_logits=True).logits,
                              ref_g(ids, mask, full_logits=True).logits, atol=1e-5)
    # GDES still holds after re-sharing: the RTD loss never reaches the generator's table
    model.train()
    out = model.discriminator(ids, mask, labels=torch.zeros_like(ids))
    out.loss.backward()
    assert emb.delta.grad is not None and emb.delta.grad.abs().sum() > 0
    assert model.generator.deberta.embeddings.word_embeddings.weight.grad is None


def test_tapt_trains_exports_and_caches(pretrained, tmp_path):
    out = tmp_path / "tapt"
    settings = [f"glue_dir={GLUE_DIR}", "seq_len=32", "train.epochs=null", "train.max_steps=3", "train.batch_size=8",
                "train.progress=false", "train.save_every=0"]
    cfg = load_tapt_config(None, ["task=wnli", f"model={pretrained}", f"out={out}", *settings])
    assert cfg.train.warmup_ratio == 0.06 and cfg.train.lr == 1e-4  # TaptConfig defaults survive an override
    res = run_tapt(cfg)
    assert not res["cached"] and res["texts"] == len(task_texts("wnli", GLUE_DIR)) and res["segments"] > 10
    assert res["train"]["step"] == 3
    from safetensors.torch import load_file
    from transformers import AutoModel

    before = load_file(pretrained / "discriminator" / "model.safetensors")
    after = load_file(out / "discriminator" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    _, info = AutoModel.from_pretrained(out / "discriminator", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (out / "generator" / "config.json").is_file()
    mtime = (out / "discriminator" / "model.safetensors").stat().st_mtime_ns
    again = run_tapt(cfg)
    assert again["cached"] and (out / "discriminator" / "model.safetensors").stat().st_mtime_ns == mtime

    # the cache follows content, not paths: the same pair, data and OUT copied elsewhere (new mtimes) match
    moved = tmp_path / "moved"
    for name in ("discriminator", "generator"):
        shutil.copytree(pretrained / name, moved / "pt" / name)
    shutil.copytree(GLUE_DIR / "WNLI", moved / "glue" / "WNLI")
    shutil.copytree(out, moved / "tapt")
    elsewhere = [f"glue_dir={moved / 'glue'}", *settings[1:]]
    cfg2 = load_tapt_config(None, ["task=wnli", f"model={moved / 'pt' / 'discriminator'}", f"out={moved / 'tapt'}",
                                   *elsewhere])
    assert run_tapt(cfg2)["cached"]
    with open(moved / "glue" / "WNLI" / "test.tsv", "a", encoding="utf-8") as f:  # one more test sentence
        f.write("9999\tA new premise .\tA new hypothesis .\n")
    assert not run_tapt(cfg2)["cached"]


def test_tapt_refuses_models_without_generator(pretrained, tmp_path):
    from vegalm.finetune.models import minilm_path

    with pytest.raises(VegaError, match="generator"):
        resolve_pair(minilm_path())
    mlm = tmp_path / "mlm"
    mlm.mkdir()
    (mlm / "summary.json").write_text(json.dumps({"model_path": str(pretrained / "discriminator")}))
    with pytest.raises(VegaError, match="MLM-only"):
        resolve_pair(mlm)
    with pytest.raises(VegaError, match="continues RTD"):
        load_tapt_config(None, ["task=rte", "model=x", "out=y", "objective.kind=mlm"]).check()


def test_ablation_tapt_combo_fine_tunes_from_the_adapted_encoder(pretrained, tmp_path):
    from vegalm.experiments.ablate import run_ablation

    s = run_ablation(str(pretrained), "wnli", seeds=1, combos="vanilla,tapt", out=tmp_path / "out",
                     results_dir=tmp_path / "results", tag="pt", max_train_samples=32, batch_size=16, max_steps=2,
                     progress=False, glue_dir=str(GLUE_DIR), eval_test=False,
                     tapt={"seq_len": 32, "train": {"epochs": None, "max_steps": 2, "batch_size": 8}})
    rec = json.loads((tmp_path / "results" / "pt" / "tapt__wnli__seed0.json").read_text())
    assert rec["tapt"] and set(rec["wall_parts_s"]) == {"tapt", "run"}
    adapted = tmp_path / "out" / "tapt" / "wnli" / "seed0" / "discriminator"
    assert json.loads((tmp_path / "out" / "tapt" / "wnli" / "seed0" / "summary.json").read_text())["model_path"] == str(adapted)
    run = json.loads((Path(rec["run_dir"]) / "results.json").read_text())
    assert run["model"]["weights_from"] == str(adapted)
    assert set(s["avg"]) == {"vanilla", "tapt"}
    assert json.loads((adapted.parent / "train" / "done.json").read_text())["step"] == 2  # tapt.* settings reached it
