"""Pretraining health (issue 18): AUC / excess metrics, the context-learning sanity test, RTD masking
rules per source, phase 2 continuing phase 1's data stream, held-out metrics in metrics.jsonl, STS probe."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _data import GLUE_DIR
from vegalm.model import EncoderConfig, VegaForRTD
from vegalm.pretrain.health import (HealthCallback, HealthConfig, binary_entropy, evaluate, roc_auc, rtd_stats,
                                   split_heldout)
from vegalm.pretrain.masking import MASKING, mask_tokens
from vegalm.pretrain.probe import spearman
from vegalm.pretrain.rtd import ObjectiveConfig, RTDModel, objective
from vegalm.train.sampler import ResumableBatchSampler

CFG = EncoderConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    position_buckets=16, max_relative_positions=64, max_position_embeddings=128,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
SPECIAL, MASK = (1, 2, 0), 4


def _segments(n: int, length: int = 24, seed: int = 1, vocab: int = 300) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.cat([torch.tensor([1]), torch.randint(5, vocab, (length - 2,), generator=g), torch.tensor([2])]),
             "attention_mask": torch.ones(length, dtype=torch.long)} for _ in range(n)]  # fmt: skip


def test_auc_matches_pairwise_definition_with_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (200,), generator=g).float()  # many ties
    y = torch.rand(200, generator=g) < 0.3
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean()
    assert roc_auc(s, y) == pytest.approx(float(pairwise), abs=1e-9)
    assert roc_auc(-s, y) == pytest.approx(1 - float(pairwise), abs=1e-9)
    assert math.isnan(roc_auc(s, torch.zeros(200, dtype=torch.bool)))


def test_prior_only_discriminator_scores_zero_excess_and_chance_auc():
    """The base-rate predictor: disc_acc would be 1 - p (looks good), excess 0 and AUC 0.5 show it learns nothing."""
    y = torch.rand(5000, generator=torch.Generator().manual_seed(0)) < 0.15
    p = y.float().mean().item()
    logits = torch.full((5000,), math.log(p / (1 - p)))
    st = rtd_stats(logits, y, torch.ones(5000, dtype=torch.bool))
    assert st["rtd_excess"] == pytest.approx(0.0, abs=1e-5)
    assert st["rtd_auc"] == pytest.approx(0.5)
    assert st["rtd_recall"] == 0.0
    assert binary_entropy(p) == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)))
    perfect = rtd_stats(torch.where(y, 5.0, -5.0), y, torch.ones(5000, dtype=torch.bool))
    assert perfect["rtd_auc"] == 1.0 and perfect["rtd_precision"] == 1.0 and perfect["rtd_recall"] == 1.0
    assert perfect["rtd_excess"] < -0.3


def test_token_cosine_tells_a_collapsed_discriminator_from_a_live_one():
    """A discriminator whose every position carries the same vector (what the 4x128 demo candidate became: mean
    cosine 0.99 after layer 2, logits constant to 0.004) scores ~1; a fresh one scores far lower. The metric rides
    along the held-out evaluation, whose AUC of the collapsed model is 0.5 whatever the labels."""
    from vegalm.pretrain.run import _collate

    batch = [_collate(_segments(8))]
    torch.manual_seed(0)
    live = RTDModel(CFG, ObjectiveConfig(), MASK, SPECIAL)
    fresh = evaluate(live, batch, seed=0)
    assert fresh["heldout_token_cos"] < 0.5
    for layer in live.discriminator.deberta.encoder.layer:  # every FFN writes one large constant vector
        with torch.no_grad():
            layer.output.dense.weight.zero_()
            layer.output.dense.bias.copy_(torch.linspace(-50, 50, CFG.hidden_size))
    dead = evaluate(live, batch, seed=0)
    assert dead["heldout_token_cos"] > 0.99
    assert dead["heldout_rtd_auc"] == pytest.approx(0.5, abs=0.02)


def test_context_auc_gives_token_identity_nothing():
    """Against the generator's samples a detector that only knows token identity ("rare = replaced") beats chance;
    against replacements drawn from the corpus's own unigram distribution (what heldout_context_auc uses) it
    cannot, so that AUC measures context alone. Zipfian segments, a fresh (near-uniform) generator."""
    from vegalm.pretrain.health import unigram_distribution, unigram_entropy

    g = torch.Generator().manual_seed(0)
    zipf = 1.0 / torch.arange(1, 296, dtype=torch.float64)
    ids = torch.multinomial(zipf / zipf.sum(), 64 * 48, replacement=True, generator=g).view(64, 48) + 5
    ids[:, 0], ids[:, -1] = 1, 2
    am = torch.ones_like(ids)
    u = unigram_distribution(ids.numpy(), SPECIAL, 300)
    assert u[:5].sum() == 0 and float(u.sum()) == pytest.approx(1.0)
    assert unigram_entropy(u) < math.log(295)
    torch.manual_seed(0)
    model = RTDModel(CFG, ObjectiveConfig(), MASK, SPECIAL).eval()
    rarity = -u.clamp_min(1e-12).log().float()  # the identity-only detector's score per token id
    with torch.no_grad():
        gen = model(input_ids=ids, attention_mask=am)
        ctx = model(input_ids=ids, attention_mask=am, replace_from=u)
    assert roc_auc(rarity[gen["corrupted"]], gen["replaced"]) > 0.7
    assert roc_auc(rarity[ctx["corrupted"]], ctx["replaced"]) == pytest.approx(0.5, abs=0.03)
    assert 0.10 < ctx["replaced"].float().mean() < 0.16  # 15% selected, fewer where the draw equals the original


def test_spearman():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_discriminator_fits_a_fixed_batch_from_context():
    """Sanity test (issue 18): generator frozen, one fixed corrupted batch, the discriminator must fit the
    replaced labels (AUC > 0.95). Replacements are the selected tokens permuted among themselves, so the
    token identity alone carries (almost) nothing: fitting needs context, and a context bug shows at once."""
    torch.manual_seed(0)
    data = _segments(16, 32, vocab=25)  # 20 token types, each ~25 times: identity cannot be memorised
    ids = torch.stack([d["input_ids"] for d in data])
    am = torch.stack([d["attention_mask"] for d in data])
    special = (ids == 1) | (ids == 2)
    chosen = (torch.rand(ids.shape) < 0.15) & ~special
    orig = ids[chosen]
    perm = orig[torch.randperm(orig.numel())]
    corrupted = ids.clone()
    corrupted[chosen] = perm
    replaced = corrupted != ids
    # the token-identity-only detector (replaced rate per token id in this batch) is far from the target
    rate = torch.zeros(300)
    rate.index_add_(0, corrupted[am > 0], replaced[am > 0].float())
    rate /= torch.bincount(corrupted[am > 0], minlength=300).clamp_min(1)
    assert roc_auc(rate[corrupted[am > 0]], replaced[am > 0]) < 0.75
    disc = VegaForRTD(CFG)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3)
    for _ in range(400):
        loss = disc(corrupted, am, labels=replaced).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        auc = roc_auc(disc(corrupted, am).logits[am > 0], replaced[am > 0])
    assert auc > 0.95


@pytest.mark.parametrize("rule", sorted(MASKING))
def test_masking_rules(rule):
    m, r = MASKING[rule]
    ids = torch.randint(10, 1000, (64, 256), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out, labels = mask_tokens(ids, torch.zeros_like(ids, dtype=torch.bool), MASK, 1000, 0.15, m, r, first_regular_id=5)
    sel = labels != -100
    masked, kept = (out[sel] == MASK).float().mean().item(), (out[sel] == ids[sel]).float().mean().item()
    assert masked == pytest.approx(m, abs=0.02)
    assert kept == pytest.approx(1 - m - r, abs=0.02)


def test_rtd_defaults_to_deberta_v3_masking_and_mlm_to_bert():
    assert ObjectiveConfig(kind="rtd").fractions() == MASKING["deberta-v3"]
    assert ObjectiveConfig(kind="mlm").fractions() == MASKING["bert"]
    assert ObjectiveConfig(kind="rtd", masking="electra").fractions() == MASKING["electra"]
    assert ObjectiveConfig(kind="rtd", mask_frac=0.5).fractions() == (0.5, 0.0)
    from vegalm.config import load_config
    from vegalm.errors import VegaError
    from vegalm.pretrain.run import RecipeConfig

    with pytest.raises(VegaError, match="masking"):
        ObjectiveConfig(masking="roberta")
    for recipe, want in [("tiny", "deberta-v3"), ("tiny-mlm", "bert"), ("smoke-mlm", "bert"), ("base", "deberta-v3")]:
        cfg = load_config(RecipeConfig, f"recipes/{recipe}.yaml", [])
        assert cfg.phase1.objective.fractions() == MASKING[want], recipe
    base = load_config(RecipeConfig, "recipes/base.yaml", [])
    assert base.phase1.objective.gen_hidden_size is None  # tiny's narrow generator is not inherited


def test_phase2_continues_phase1_data_stream():
    """Defect (a): phase 2 used to restart the sampler and replay phase 1's first batches."""
    from vegalm.pretrain.run import continue_stream

    n, steps1, steps2 = 200, 5, 4
    s1b = ResumableBatchSampler(n, 8, seed=42)
    seen1 = []
    for _ in range(steps1):
        seen1 += s1b.global_indices(s1b.epoch, s1b.position)
        s1b.advance()
    s2 = ResumableBatchSampler(n, 16, seed=7)  # phase 2: another batch size and seed
    continue_stream(s2, s1b.state_dict())
    seen2 = []
    for _ in range(steps2):
        seen2 += s2.global_indices(s2.epoch, s2.position)
        s2.advance()
    assert len(set(seen1 + seen2)) == len(seen1) + len(seen2) == 40 + 64  # no segment seen twice
    fresh = ResumableBatchSampler(n, 16, seed=42)  # what phase 2 did before: phase 1's order from the start
    assert set(fresh.global_indices(0, 0)) <= set(seen1)


def test_heldout_metrics_logged_every_eval_interval(tmp_path):
    """Health metrics reach metrics.jsonl (and TensorBoard) through the Trainer; the held-out evaluation runs
    at each eval interval with the same masks, and does not change the training run (the RNG is forked)."""
    from vegalm.pretrain.run import _collate
    from vegalm.train.trainer import TrainConfig, Trainer

    data = _segments(64)
    train_idx, held_idx = split_heldout(len(data), 16, seed=0)
    held = [_collate([data[i] for i in held_idx])]

    def run(out, callbacks):
        torch.manual_seed(0)
        model = RTDModel(CFG, ObjectiveConfig(), MASK, SPECIAL)
        cfg = TrainConfig(lr=1e-3, max_steps=6, batch_size=8, log_every=2, progress=False, seed=3)
        t = Trainer(model, objective, [data[i] for i in train_idx], _collate, cfg, out, callbacks=callbacks)
        t.train()
        return t.model.state_dict(), [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    uniform = torch.zeros(300, dtype=torch.float64)
    uniform[5:] = 1 / 295  # the segments' tokens
    cb = HealthCallback(held, HealthConfig(eval_every=4), unigram=uniform)
    with_eval, rows = run(tmp_path / "a", [cb])
    without, _ = run(tmp_path / "b", [])
    for k in with_eval:
        assert torch.equal(with_eval[k], without[k]), k
    assert [r["step"] for r in rows if "heldout_rtd_auc" in r] == [4, 6]
    assert all(0.0 <= r["heldout_context_auc"] <= 1.0 for r in rows if "heldout_rtd_auc" in r)
    assert all(0.0 <= r["rtd_auc"] <= 1.0 and "rtd_excess" in r and "rtd_precision" in r for r in rows)
    assert all(r["gen_excess_unigram"] == pytest.approx(r["mlm_loss"] - math.log(295)) for r in rows)
    assert (tmp_path / "a" / "tb").is_dir()


def test_sts_zero_shot_probe_on_real_dev(tmp_path):
    """The probe on the real STS-B dev file (all 1500 pairs): a bag-of-words encoder (mean of fixed random token
    vectors) correlates positively with the gold scores, and an encoder that ignores its input does not.

    The noise encoder draws from its own seeded generator, so its output does not depend on the tokenizer (whose
    Unigram training may differ between machines). Over 1500 pairs a null Spearman has a standard deviation of
    100 / sqrt(1499) = 2.6, so the bound of 12 is over 4.5 standard deviations away."""
    from types import SimpleNamespace

    from vegalm.data.tokenizer import load_tokenizer, train_tokenizer
    from vegalm.pretrain.probe import read_stsb, sts_zero_shot

    dev = GLUE_DIR / "STS-B" / "dev.tsv"
    if not dev.is_file():
        pytest.skip(f"real STS-B dev not found at {dev}")
    a, b, _ = read_stsb(dev)
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(t + "\n\n" for t in a + b), encoding="utf-8")
    train_tokenizer(str(corpus), 600, tmp_path / "tok", max_docs=None)
    tok = load_tokenizer(tmp_path / "tok")
    table = torch.randn(len(tok), 64, generator=torch.Generator().manual_seed(0))

    class BagOfWords(torch.nn.Module):
        def __init__(self, noise: bool):
            super().__init__()
            self.w, self.noise = torch.nn.Parameter(table.clone()), noise
            self.gen = torch.Generator().manual_seed(1)

        def forward(self, ids, am):
            h = self.w[ids]
            if self.noise:
                h = torch.randn(h.shape, generator=self.gen)
            return SimpleNamespace(last_hidden_state=h)

    bow = sts_zero_shot(BagOfWords(False), tok, dev, pooling="mean")
    noise = sts_zero_shot(BagOfWords(True), tok, dev, pooling="mean")
    assert bow > 30, bow
    assert abs(noise) < 12, noise


def test_summary_glue_comparison_over_seeds(tmp_path):
    from vegalm.pretrain.summary import build_summary, report_lines

    (tmp_path / "rtd" / "phase1").mkdir(parents=True)
    (tmp_path / "rtd" / "phase1" / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "rtd_auc": 0.6, "heldout_rtd_auc": 0.72, "heldout_rtd_excess": -0.05}) + "\n")
    glue = {"rtd": {"per_task": {"rte": {"scores": {"0": 50.0, "1": 54.0}}, "mrpc": {"scores": {"0": 70.0, "1": 72.0}}}},
            "mlm": {"per_task": {"rte": {"scores": {"0": 52.0, "1": 51.0}}, "mrpc": {"scores": {"0": 69.0, "1": 70.0}}}}}
    pre = {"rtd": {"phases": {"phase1": {"sts_zero_shot": 20.0}, "phase2": {"sts_zero_shot": 31.0}}}}
    s = build_summary(tmp_path, pre, glue, wall_s=12.0)
    assert s["rtd_replaced_auc"] == 0.72 and s["rtd_excess_nats"] == -0.05
    assert s["glue_avg"] == {"rtd": pytest.approx(61.5), "mlm": pytest.approx(60.5)}
    assert s["glue_seeds"] == ["0", "1"]
    assert s["glue_paired_diff"]["per_seed"] == {"0": pytest.approx(-0.5), "1": pytest.approx(2.5)}
    assert s["glue_paired_diff"]["std"] == pytest.approx(2.1213, abs=1e-3)
    text = "\n".join(report_lines(s, None))
    assert "+11.0 points" in text and "+1.00 +- 2.12 over 2 seeds" in text
