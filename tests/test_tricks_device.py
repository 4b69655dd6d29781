"""Every trick's state (EMA copies, SMART's teacher, selfcal's memory) ends up beside the model's parameters,
even when `setup` ran before the model moved (run.py calls it before the Trainer moves the model).

CPU: the model moves to the "meta" device after `setup`, a stand-in for the GPU (meta tensors carry a device
and shapes, no data). CUDA: the same on the real device, skipped without one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vegalm.finetune.tricks import TRICKS, LossState, model_inputs, task_loss
from vegalm.train.ema import EMA
from test_tricks import build, make_batch, make_model

STATEFUL = [  # (name, args): every trick that keeps tensors between steps
    ("smart", {}),
    ("adv", {"method": "smart"}),
    ("selfcal", {"mode": "pskd"}),
    ("selfcal", {"mode": "ema"}),
    ("ema", {}),
]


def state_tensors(obj, seen=None) -> list[torch.Tensor]:
    """All tensors a trick holds: its own tensor attributes, its EMA objects' shadows and copies, `inner`'s."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    found = []
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, EMA):
            found += list(value.shadow.values())
            if value.module is not None:
                found += list(value.module.parameters()) + list(value.module.buffers())
        elif isinstance(value, nn.Module):
            continue  # the model itself is not trick state
        elif hasattr(value, "__dict__") and type(value).__module__.startswith("vegalm.finetune.tricks"):
            found += state_tensors(value, seen)
    return found


def kept_state(trick) -> list[torch.Tensor]:
    """state_tensors without the inspection copies of the last step (last_delta, last_ascent)."""
    owners = [trick, getattr(trick, "inner", None)]
    scratch = {id(getattr(o, k, None)) for o in owners for k in ("last_delta", "last_ascent")}
    return [t for t in state_tensors(trick) if id(t) not in scratch]


def one_step(trick, model, batch) -> None:
    out = model(**model_inputs(batch))
    loss = task_loss(out.logits, batch["labels"], 2)
    total, _ = trick.loss(model, batch, out, loss, LossState())
    total.backward()
    trick.on_step_end(model, 1, 10)
    trick.eval_model(model)


def check_follows(device: str, name: str, args: dict) -> None:
    """setup + one step on the CPU (as run.py, and as a resumed checkpoint), then the model moves to `device`.

    On "meta" no forward can run (the tricks log floats, and meta tensors have no values), so the state is
    reached through the calls that follow the model: on_step_end, eval_model, and selfcal's memory lookup;
    on CUDA a whole step runs there."""
    model = make_model("bert", dropout=0.0)
    trick = build(name, **args)
    trick.setup(model)
    one_step(trick, model, make_batch())
    assert state_tensors(trick), f"{name}: no state found"
    model.to(device)
    if device == "meta":
        trick.on_step_end(model, 2, 10)
        trick.eval_model(model)
        if name == "selfcal" and args["mode"] == "pskd":
            trick._past(make_batch(), torch.empty(4, 2, device=device))  # the index may stay on the CPU
    else:
        one_step(trick, model, {k: v.to(device) for k, v in make_batch().items()})
    want = next(model.parameters()).device
    tensors = kept_state(trick)
    wrong = [tuple(t.shape) for t in tensors if t.device != want]
    assert not wrong, f"{name} {args}: {len(wrong)} of {len(tensors)} tensors not on {want}: {wrong[:3]}"
    assert trick.eval_model(model) is model or next(trick.eval_model(model).parameters()).device == want


def test_state_walk_finds_every_stateful_trick():
    """The list above covers every registered trick that holds tensors after a step at its defaults (a new one
    must join STATEFUL); adv holds state only through a stateful method (smart), which STATEFUL covers."""
    names = {n for n, _ in STATEFUL} - {"adv"}
    for name in TRICKS:
        trick = build(name)
        model = make_model("bert", dropout=0.0)
        trick.setup(model)
        one_step(trick, model, make_batch())
        kept = kept_state(trick)
        assert (name in names) == bool(kept), (name, len(kept))


@pytest.mark.parametrize("case", STATEFUL, ids=lambda c: f"{c[0]}-{c[1]}")
def test_state_follows_model_to_another_device_cpu(case):
    check_follows("meta", *case)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", STATEFUL, ids=lambda c: f"{c[0]}-{c[1]}")
def test_state_follows_model_to_cuda(case):
    check_follows("cuda", *case)
