"""Pretraining objectives: masking, GDES / sharing modes, RTD step, SimCSE (incl. 2-process gather), resume."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from _data import needs_corpus
from vegalm.model import EncoderConfig
from vegalm.pretrain.contrastive import simcse_loss
from vegalm.pretrain.gdes import GDESEmbedding, unshare
from vegalm.pretrain.masking import IGNORE, mask_tokens, special_positions
from vegalm.pretrain.rtd import MLMModel, ObjectiveConfig, RTDModel, generator_config

CFG = EncoderConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    position_buckets=16, max_relative_positions=64, max_position_embeddings=128)  # fmt: skip
SPECIAL = (1, 2, 0)  # CLS, SEP, PAD
MASK = 4


def batch(B=4, L=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, CFG.vocab_size, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L - 5 :] = 0
    ids[:, 0] = 1
    ids[mask == 0] = 0
    ids[0, L - 1] = 2
    return ids, mask


def test_masking_rates_and_specials():
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (64, 256))
    ids[:, 0] = 1
    att = torch.ones_like(ids)
    att[:, 200:] = 0
    special = special_positions(ids, att, SPECIAL)
    out, labels = mask_tokens(ids, special, MASK, 1000, prob=0.15, mask_frac=0.8, random_frac=0.1)
    chosen = labels != IGNORE
    assert not chosen[special].any(), "special / padding positions must never be masked"
    rate = chosen.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.01
    assert torch.equal(labels[chosen], ids[chosen])
    is_mask = (out == MASK) & chosen
    changed = (out != ids) & chosen & ~is_mask
    same = (out == ids) & chosen
    n = chosen.sum().item()
    assert abs(is_mask.sum().item() / n - 0.8) < 0.02
    assert abs((changed | same).sum().item() / n - 0.2) < 0.02
    assert (out[~chosen] == ids[~chosen]).all()
    assert (out[changed] >= 5).all(), "random replacements are never special tokens"


def test_generator_config_defaults():
    g = generator_config(CFG, ObjectiveConfig())
    assert g.num_hidden_layers == 1 and g.hidden_size == CFG.hidden_size  # DeBERTa-v3: half depth, same width
    narrow = generator_config(CFG, ObjectiveConfig(gen_hidden_size=16, gen_num_attention_heads=1))
    assert narrow.hidden_size == 16 and narrow.emb_size == CFG.emb_size  # ELECTRA-style, tables still shareable


def _grads_after(loss_fn, model):
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    g = model.generator.deberta.embeddings.word_embeddings.weight.grad
    d = model.discriminator.deberta.embeddings.word_embeddings
    return g, d


def test_gdes_gradients_are_disentangled():
    torch.manual_seed(0)
    model = RTDModel(CFG, ObjectiveConfig(embedding_sharing="gdes"), MASK, SPECIAL)
    ids, mask = batch()
    d_emb = model.discriminator.deberta.embeddings.word_embeddings
    assert isinstance(d_emb, GDESEmbedding)
    names = [n for n, _ in model.named_parameters()]
    assert "discriminator.deberta.embeddings.word_embeddings.delta" in names
    assert not any(n.startswith("discriminator.deberta.embeddings.word_embeddings.weight") for n in names)
    # RTD loss only: no gradient into E_G, gradient into E_delta.
    g, d = _grads_after(lambda: model.discriminator(ids, mask, labels=torch.zeros_like(ids)).loss, model)
    assert g is None or g.abs().sum() == 0
    assert d.delta.grad is not None and d.delta.grad.abs().sum() > 0
    # MLM loss only: gradient into E_G, none into E_delta.
    labels = torch.full_like(ids, IGNORE)
    labels[:, 3:6] = ids[:, 3:6]
    g, d = _grads_after(lambda: model.generator(ids, mask, labels=labels).loss, model)
    assert g is not None and g.abs().sum() > 0
    assert d.delta.grad is None or d.delta.grad.abs().sum() == 0


def test_shared_and_none_modes():
    shared = RTDModel(CFG, ObjectiveConfig(embedding_sharing="shared"), MASK, SPECIAL)
    assert shared.discriminator.deberta.embeddings.word_embeddings is shared.generator.deberta.embeddings.word_embeddings
    none = RTDModel(CFG, ObjectiveConfig(embedding_sharing="none"), MASK, SPECIAL)
    a = none.discriminator.deberta.embeddings.word_embeddings
    assert a is not none.generator.deberta.embeddings.word_embeddings and isinstance(a, torch.nn.Embedding)


def test_gdes_fold_keeps_the_discriminator_function(tmp_path):
    torch.manual_seed(0)
    model = RTDModel(CFG, ObjectiveConfig(embedding_sharing="gdes"), MASK, SPECIAL).eval()
    with torch.no_grad():
        model.discriminator.deberta.embeddings.word_embeddings.delta.normal_(0, 0.05)
    ids, mask = batch()
    before = model.discriminator(ids, mask).logits
    unshare(model.discriminator)
    after = model.discriminator(ids, mask).logits
    assert torch.allclose(before, after, atol=1e-6)
    model.discriminator.save_pretrained(tmp_path)
    from transformers import AutoModel

    hf, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    h_ours = model.discriminator.deberta(ids, mask).last_hidden_state
    assert torch.allclose(hf.eval()(ids, attention_mask=mask).last_hidden_state, h_ours, atol=1e-5)


@pytest.mark.parametrize("sharing", ["gdes", "shared", "none"])
def test_rtd_step(sharing):
    torch.manual_seed(0)
    model = RTDModel(CFG, ObjectiveConfig(embedding_sharing=sharing, cl_weight=0.5), MASK, SPECIAL)
    ids, mask = batch()
    out = model(ids, mask)
    logs = out["logs"]
    assert torch.isfinite(out["loss"])
    expected = logs["mlm_loss"] + 50.0 * logs["rtd_loss"] + 0.5 * logs["cl_loss"]
    assert abs(out["loss"].item() - expected) < 1e-3
    assert 0.0 < logs["replaced_frac"] < 0.3 and 0.0 <= logs["disc_acc"] <= 1.0
    out["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "position_embeddings" not in n)


def test_generator_logits_only_at_masked_positions():
    model = RTDModel(CFG, ObjectiveConfig(), MASK, SPECIAL)
    ids, mask = batch()
    labels = torch.full_like(ids, IGNORE)
    labels[0, 3] = ids[0, 3]
    labels[2, 7] = ids[2, 7]
    out = model.generator(ids, mask, labels=labels)
    assert out.logits.shape == (2, CFG.vocab_size)


def test_replaced_labels_ignore_correct_samples(monkeypatch):
    """A sample equal to the original token is labelled 'original' (ELECTRA)."""
    torch.manual_seed(0)
    model = RTDModel(CFG, ObjectiveConfig(sample_temperature=1e-4), MASK, SPECIAL)
    ids, mask = batch()
    seen = {}
    orig = model.discriminator.forward

    def spy(corrupted, attention_mask, labels=None, **kw):
        seen["corrupted"], seen["labels"] = corrupted, labels
        return orig(corrupted, attention_mask, labels=labels, **kw)

    monkeypatch.setattr(model.discriminator, "forward", spy)
    model(ids, mask)
    assert torch.equal(seen["labels"], (seen["corrupted"] != ids) & (mask > 0))


def test_mlm_baseline_step():
    torch.manual_seed(0)
    model = MLMModel(CFG, ObjectiveConfig(kind="mlm"), MASK, SPECIAL)
    out = model(*batch())
    assert torch.isfinite(out["loss"]) and out["logs"]["gen_acc"] >= 0
    out["loss"].backward()


def test_simcse_loss_properties():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    same, acc = simcse_loss(z, z.clone())
    other, _ = simcse_loss(z, torch.randn(8, 16))
    assert same.item() < other.item() and acc == 1.0
    assert same.item() < torch.log(torch.tensor(8.0)).item()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, x1, x2, w, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    n = x1.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    loss, _ = simcse_loss(lin(x1[sl]), lin(x2[sl]))
    loss.backward()
    g = lin.weight.grad.clone()
    dist.all_reduce(g)
    g /= world  # what DDP does
    if rank == 0:
        torch.save({"loss": loss.item(), "grad": g}, out)
    dist.destroy_process_group()


def test_simcse_gather_across_two_processes_matches_one(tmp_path):
    torch.manual_seed(0)
    x1, x2, w = torch.randn(8, 6), torch.randn(8, 6), torch.randn(4, 6)
    lin = torch.nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    loss, _ = simcse_loss(lin(x1), lin(x2))
    loss.backward()
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_ddp_worker, args=(2, _free_port(), x1, x2, w, out), nprocs=2, join=True, start_method="spawn")
    res = torch.load(out, weights_only=True)
    ddp_loss, ddp_grad = res["loss"], res["grad"]
    assert abs(ddp_loss - loss.item()) < 1e-5
    assert torch.allclose(ddp_grad, lin.weight.grad, atol=1e-6)


def test_rtd_resume_is_bit_exact(tmp_path):
    """Pretraining objective through the Trainer: 4 steps straight == 2 steps, stop, resume, 2 more."""
    from vegalm.pretrain.rtd import objective
    from vegalm.pretrain.run import _collate
    from vegalm.train.trainer import TrainConfig, Trainer

    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.cat([torch.tensor([1]), torch.randint(5, 300, (22,), generator=g), torch.tensor([2])]),
             "attention_mask": torch.ones(24, dtype=torch.long)} for _ in range(32)]  # fmt: skip

    def run(out, steps, resume=False, stop_at=None):
        torch.manual_seed(0)
        model = RTDModel(CFG, ObjectiveConfig(cl_weight=0.1), MASK, SPECIAL)
        cfg = TrainConfig(lr=1e-3, max_steps=steps, batch_size=8, save_every=2, log_every=1, progress=False, seed=3)
        cbs = []
        if stop_at:
            class Stop:
                def on_step_end(self, trainer, step):
                    trainer.should_stop = step >= stop_at

            cbs = [Stop()]
        t = Trainer(model, objective, data, _collate, cfg, out, callbacks=cbs)
        t.train(resume=resume)
        return t.model.state_dict()

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 4, stop_at=2)
    resumed = run(tmp_path / "b", 4, resume=True)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


@pytest.mark.slow
@needs_corpus
def test_changed_rerun_refuses_or_retrains_and_recipe_json_tells_the_truth(tmp_path):
    """A finished `vegalm pretrain` rerun with another phase1.train.lr / max_steps: without --retrain one line
    naming the changed keys and nothing touched; with it phase 1, phase 2 and the export are trained again."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(repo / "src"))
    out = tmp_path / "pt"
    small = ["data.max_docs=200", "data.tokenizer_max_docs=200", "data.vocab_size=400", "phase1.train.max_steps=4",
             "phase2.train.max_steps=2", "phase1.train.save_every=0", "phase2.train.save_every=0",
             "health.heldout_segments=0", "health.sts_dev=null"]  # fmt: skip

    def pretrain(*extra):
        return subprocess.run([sys.executable, "-m", "vegalm.cli", "pretrain", "--recipe", "recipes/smoke.yaml",
                               "--out", str(out), *small, *extra], capture_output=True, text=True, env=env,
                              cwd=repo, timeout=900)  # fmt: skip

    first = pretrain()
    assert first.returncode == 0, first.stderr[-3000:]
    weights = out / "discriminator" / "model.safetensors"
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".pid"}
    changed = ["phase1.train.lr=5e-4", "phase1.train.max_steps=6"]
    refused = pretrain(*changed)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    line = [x for x in refused.stderr.splitlines() if x.strip()][-1]
    lr = json.loads((out / "recipe.json").read_text())["phase1"]["train"]["lr"]
    assert line.startswith("error: ") and f"phase1.train.lr: {lr} → 0.0005" in line and "--retrain" in line, line
    assert "phase1.train.max_steps: 4 → 6" in line, line
    assert {p: p.read_bytes() for p in files if p.exists()} == files  # nothing rewritten, nothing deleted
    again = pretrain(*changed, "--retrain")
    assert again.returncode == 0, again.stderr[-3000:]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["phase1"]["train"]["lr"] == 5e-4 and recipe["phase1"]["train"]["max_steps"] == 6
    assert json.loads((out / "phase1" / "done.json").read_text())["step"] == 6
    assert weights.read_bytes() != files[weights]  # phase 2 and the export followed the retrained phase 1
    stamp = weights.stat().st_mtime_ns
    same = pretrain(*changed)
    assert same.returncode == 0 and weights.stat().st_mtime_ns == stamp, same.stderr[-3000:]
