"""The one EMA (vegalm.train.ema): it reproduces, bit for bit, the two averages it replaced."""

from __future__ import annotations

import pytest
import torch

from vegalm.train.ema import EMA, ema_update_


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    m[2].bias.requires_grad_(False)  # a frozen parameter
    return m


def _train_step(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.train()
    model(torch.randn(8, 6, generator=g))  # moves BatchNorm's running statistics


@pytest.mark.parametrize("warmup", [True, False])
def test_matches_the_tricks_copy_average(warmup):
    """The former craft.EMAWeights: full fp32 copy, lerp_, its own update counter, buffers copied."""
    model = _model()
    ema = EMA(model, 0.9, warmup=warmup, copy=True)
    ref = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    for t in range(4):
        _train_step(model, t)
        ema.update(model)
        d = min(0.9, (1.0 + t) / (10.0 + t)) if warmup else 0.9
        for n, p in model.named_parameters():
            ref[n].lerp_(p.detach().float(), 1.0 - d)
    avg = ema.averaged(model)
    assert not any(p.requires_grad for p in avg.parameters()) and not avg.training
    for n, p in avg.named_parameters():
        assert torch.equal(p, ref[n]), n
    assert torch.equal(avg[1].running_mean, model[1].running_mean)
    assert ema.num_updates == 4


def test_matches_the_runners_shadow_average():
    """The former runner._EMA: shadow of the trainable parameters, d = min(decay, (1 + step) / (10 + step))
    with the trainer's step, mul_ then add_; copy_to casts back to the parameters' dtype."""
    model = _model()
    ema = EMA(model, 0.95, lerp=False)
    assert set(ema.shadow) == {n for n, p in model.named_parameters() if p.requires_grad}
    ref = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(1, 5):
        _train_step(model, step)
        ema.update(model, step=step)
        d = min(0.95, (1 + step) / (10 + step))
        for n, p in model.named_parameters():
            if n in ref:
                ref[n].mul_(d).add_(p.detach().float(), alpha=1 - d)
    for n in ref:
        assert torch.equal(ema.shadow[n], ref[n]), n
    half = _model().bfloat16()
    ema.copy_to(half)
    for n, p in half.named_parameters():
        if n in ref:
            assert p.dtype == torch.bfloat16 and torch.equal(p, ref[n].to(torch.bfloat16))


def test_the_two_float_orders_differ():
    """Why `lerp` is a switch: the orders round differently, so each path keeps its own."""
    torch.manual_seed(0)
    s, p = torch.randn(1000), torch.randn(1000)
    a, b = {"w": s.clone()}, {"w": s.clone()}
    ema_update_(a, [("w", p)], 0.9, lerp=True)
    ema_update_(b, [("w", p)], 0.9, lerp=False)
    assert torch.allclose(a["w"], b["w"], atol=1e-6) and not torch.equal(a["w"], b["w"])


def test_exact_average_decay_override_and_state_dict():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.5, warmup=False, copy=True)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert torch.equal(ema.averaged(model).weight, torch.full((1, 2), 2.0))
    ema.update(model, decay=0.0)  # SMART's teacher passes its own momentum
    assert torch.equal(ema.averaged(model).weight, torch.full((1, 2), 3.0))
    for copy in (True, False):
        a, b = EMA(_model(0), 0.9, copy=copy), EMA(_model(1), 0.9, copy=copy)
        a.update(_model(2))
        b.load_state_dict(a.state_dict())
        assert b.num_updates == 1 and all(torch.equal(a.shadow[n], b.shadow[n]) for n in a.shadow)


def test_follows_the_model_to_its_device():
    """A copy taken before the model moved (tricks' setup runs before the Trainer's .to(device)) moves too."""
    model = _model()
    shadow, teacher = EMA(model, 0.9), EMA(model, 0.9, copy=True)
    model.to("meta")
    assert next(teacher.averaged(model).parameters()).device.type == "meta"
    shadow.update(model, step=1)
    teacher.update(model)
    assert all(t.device.type == "meta" for t in shadow.shadow.values())
    assert all(t.device.type == "meta" for t in teacher.shadow.values())
