"""The perturbation is real (issue 17): for SMART, FreeLB, R3F and SiFT at their defaults, on a tiny model with
dropout off and its head scaled x30 so that its logits are not near-uniform (the issue's probe scaled
MiniLM-L6's the same way):

* the perturbed output differs from the clean one;
* the regulariser is at least 10% of the symmetric KL between two dropout passes (dropout 0.1) of the batch;
* the ascent direction raises the divergence more than random directions of the same norm (not R3F: random).

The old defaults (R3F's eps 1e-5, SiFT's step 1e-4) fail the second check: the test can fail. Also here: the
same checks under CPU bf16 autocast, FreeLB's one dropout mask, and R-Drop.
"""

from __future__ import annotations

import pytest
import torch

from vegalm.finetune.tricks import LossState, model_inputs, symmetric_kl, task_loss
from vegalm.finetune.tricks.perturb import direction
from test_tricks import KINDS, build, make_batch, make_model

ADVERSARIAL = ("smart", "freelb", "r3f", "sift")
HEAD_SCALE = 30.0  # as the issue's probe: a trained model's logits are far from uniform


def sharp_model(kind: str, dropout: float = 0.1):
    model = make_model(kind, dropout=dropout)
    with torch.no_grad():
        model.classifier.weight.mul_(HEAD_SCALE)
    return model


def dropout_kl(model, batch) -> float:
    """Symmetric KL of two dropout passes of the batch: R-Drop's term, the reference size."""
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        a, b = (model(**model_inputs(batch)).logits for _ in range(2))
    return float(symmetric_kl(a, b))


def run(trick, model, batch):
    """One trick.loss call with dropout off; returns the clean logits."""
    model.eval()
    torch.manual_seed(2)
    out = model(**model_inputs(batch))
    trick.setup(model)
    trick.loss(model, batch, out, task_loss(out.logits, batch["labels"], 2), LossState())
    return out.logits.detach()


def divergence(name, trick, model, batch, clean, delta) -> float:
    """What the trick's ascent climbs: the task loss for FreeLB, the symmetric KL to the clean logits else."""
    with torch.no_grad():
        logits = trick.perturbed(model, batch, delta)
    if name == "freelb":
        return float(task_loss(logits, batch["labels"], 2))
    return float(symmetric_kl(logits, clean))


def regulariser_ratio(kind: str, name: str, **args) -> float:
    model, batch = sharp_model(kind), make_batch(b=8, length=12)
    ref = dropout_kl(model, batch)
    trick = build(name, **args)
    clean = run(trick, model, batch)
    with torch.no_grad():
        perturbed = trick.perturbed(model, batch, trick.last_delta)
    assert not torch.equal(perturbed, clean), name
    return float(symmetric_kl(perturbed, clean)) / ref


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_perturbation_is_real(kind, name):
    ratio = regulariser_ratio(kind, name)
    assert ratio >= 0.1, f"{name}: the dropout-off KL is {ratio:.2g} of the two-dropout-pass KL"


@pytest.mark.parametrize("name, args", [("r3f", {"eps": 1e-5}), ("sift", {"vat_learning_rate": 1e-4})])
def test_old_defaults_fail_the_check(name, args):
    """fairseq's eps and DeBERTa's step: with dropout off the term is ~0, and the check above says so."""
    assert regulariser_ratio("bert", name, **args) < 1e-2


def _norm(name: str) -> tuple[str, bool]:
    """(norm, per_token) of each trick's ascent direction."""
    return ("l2", False) if name == "freelb" else ("linf", True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["smart", "freelb", "sift"])
def test_ascent_beats_a_random_direction(kind, name):
    model, batch = sharp_model(kind, dropout=0.0), make_batch(b=8, length=12)
    trick = build(name)
    clean = run(trick, model, batch)
    ascent = trick.last_ascent
    assert ascent is not None and ascent.abs().sum() > 0
    norm, per_token = _norm(name)
    size = {"smart": lambda a: a.eps, "freelb": lambda a: a.adv_lr, "sift": lambda a: a.vat_learning_rate}[name](
        trick.args)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    gen = torch.Generator().manual_seed(0)
    randoms = []
    for _ in range(5):
        r = direction(torch.randn(ascent.shape, generator=gen) * mask, norm, per_token) * mask
        randoms.append(divergence(name, trick, model, batch, clean, size * r))
    climbed = divergence(name, trick, model, batch, clean, size * direction(ascent, norm, per_token) * mask)
    if name == "freelb":  # the clean loss is the floor: compare the increase over it
        base = float(task_loss(clean, batch["labels"], 2))
        climbed, randoms = climbed - base, [r - base for r in randoms]
    assert climbed > max(randoms), (name, climbed, randoms)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", [*ADVERSARIAL, "adv"])
def test_perturbation_survives_bf16_autocast(kind, name):
    model, batch = sharp_model(kind, dropout=0.0), make_batch(b=8, length=12)
    model.eval()
    trick = build(name)
    trick.setup(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**model_inputs(batch))
        total, _ = trick.loss(model, batch, out, task_loss(out.logits, batch["labels"], 2), LossState())
        inner = getattr(trick, "inner", trick)
        with torch.no_grad():
            perturbed = inner.perturbed(model, batch, inner.last_delta)
    assert inner.last_delta.dtype == torch.float32 and total.dtype == torch.float32
    assert float(symmetric_kl(perturbed, out.logits.detach())) > 0, name


def test_freelb_ascent_steps_share_one_dropout_mask():
    model = make_model("vega", dropout=0.3)
    model.train()
    seen = []
    model.classifier.register_forward_hook(lambda _m, _a, o: seen.append(o.detach().clone()))
    batch = make_batch()
    trick = build("freelb", adv_steps=3, adv_lr=0.0, adv_init_mag=0.0)  # delta stays 0: only dropout varies
    out = model(**model_inputs(batch))
    trick.loss(model, batch, out, task_loss(out.logits, batch["labels"], 2), LossState())
    clean, steps = seen[0], seen[1:]
    assert len(steps) == 3 and all(torch.equal(s, steps[0]) for s in steps)
    assert not torch.equal(clean, steps[0])  # the clean pass drew its own mask: dropout is on


def test_rdrop_is_the_papers_loss_and_zero_without_dropout():
    batch = make_batch()
    trick = build("rdrop", alpha=0.7)
    model = make_model("bert", dropout=0.0)
    out = model(**model_inputs(batch))
    loss = task_loss(out.logits, batch["labels"], 2)
    total, logs = trick.loss(model, batch, out, loss, LossState())
    assert logs["rdrop/kl"] == 0 and torch.allclose(total, loss, atol=1e-7)

    model = make_model("bert", dropout=0.1)
    model.train()
    out = model(**model_inputs(batch))
    ce1 = task_loss(out.logits, batch["labels"], 2)
    rng = torch.get_rng_state()
    total, logs = trick.loss(model, batch, out, ce1, LossState())
    torch.set_rng_state(rng)
    second = model(**model_inputs(batch)).logits
    ce2 = task_loss(second, batch["labels"], 2)
    want = 0.5 * (ce1 + ce2) + 0.7 * 0.5 * symmetric_kl(out.logits, second)
    assert logs["rdrop/kl"] > 0 and torch.allclose(total, want, rtol=1e-6)
