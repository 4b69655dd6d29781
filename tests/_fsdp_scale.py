"""The big size recipes under FSDP, for real: 2 of their layers at full width, 2 AdamW steps (tests/test_fsdp_scale.py).

    torchrun --standalone --nproc_per_node 2 tests/_fsdp_scale.py --sizes vega-1.3b,large

For each size the model is built with only LAYERS of its layers (every layer is the same FSDP unit, so the per-rank
share of a deeper stack is the same sum) and a VOCAB-row vocabulary instead of 128100 (two full-width vega-1.3b
layers are 57M parameters, a 128k embedding would add 197M per process). `shard_model` shards it over gloo, then
it runs 2 steps on random ids (B=1, L=32, the same ids on every rank, no dropout: every rank must compute the same
loss). The main process prints one line `FSDP_SCALE {json}` holding every rank's counts, gathered with
all_gather_object, and `estimate_memory`'s lines for the same config.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings

import torch
import torch.distributed as dist

from vegalm.model import VegaForMaskedLM, VegaForRTD, config_for_size
from vegalm.model.memory import estimate_memory, local_elements
from vegalm.train.fsdp import local_numel, shard_model

import _torchrun  # tests/, the script's own folder

LAYERS = 2  # full width, 2 of the 48 (vega-1.3b) / 24 (large) layers
VOCAB = 1001  # small for RAM, and odd on purpose: the embedding's 1001 rows split 501 + 500 over 2 ranks
BATCH, SEQ = 1, 32
HEADS = {"vega-1.3b": "mlm", "large": "rtd"}  # one of each head: the RTD classifier [1, h] has 1 row to split


def _bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def run(size: str) -> dict:
    head = HEADS[size]
    cfg = config_for_size(size, vocab_size=VOCAB, num_hidden_layers=LAYERS, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)  # the same initial weights on every rank (shard_model keeps each rank's slice)
    model = (VegaForMaskedLM if head == "mlm" else VegaForRTD)(cfg).train()
    shard_model(model)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)  # the same batches on every rank
    losses, grad_elems, grad_bytes = [], 0, 0
    for _ in range(2):
        ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=g)
        if head == "mlm":
            labels = torch.full_like(ids, -100)
            pos = torch.randperm(BATCH * SEQ, generator=g)[: round(0.15 * BATCH * SEQ)]  # 5 masked of 32
            labels.view(-1)[pos] = ids.view(-1)[pos]
            loss = model(ids, labels=labels).loss
        else:
            mask = torch.ones_like(ids)
            loss = model(ids, attention_mask=mask, labels=torch.randint(0, 2, ids.shape, generator=g)).loss
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        grad_elems, grad_bytes = local_numel(grads), _bytes(grads)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    moments = [st[k] for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    rank, world = dist.get_rank(), dist.get_world_size()
    return {
        "size": size, "head": head, "rank": rank, "world": world, "losses": losses,
        "sharded": all(hasattr(p, "to_local") for p in params),
        "param_elements": local_numel(params), "param_bytes": _bytes(params),
        "grad_elements": grad_elems, "grad_bytes": grad_bytes,
        "optimizer_elements": local_numel(moments), "optimizer_bytes": _bytes(moments),
        "expected_elements": local_elements(cfg, world, rank, head),  # the estimator's rule for this rank
        "total_elements": sum(p.numel() for p in params),  # DTensor.numel() is the full (global) size
        "one_row_each": sum(math.prod(p.shape[1:]) for p in params),  # the most dim-0 rounding can move a share
        "estimate": estimate_memory(cfg, world, BATCH, SEQ, "fp32", head=head),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="vega-1.3b,large")
    args = ap.parse_args()
    torch.set_num_threads(1)
    # VegaForRTD's logits are the classifier output .squeeze(-1), a view, which FSDP2 warns about when that model is
    # the root unit; nothing here changes them in place (in pretraining the root is RTDModel, returning a dict)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    dist.init_process_group("gloo")
    mine = [run(size) for size in args.sizes.split(",")]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        print("FSDP_SCALE " + json.dumps([r for ranks in zip(*every) for r in ranks]), flush=True)


if __name__ == "__main__":
    main()
    _torchrun.finish()  # after run()'s sharded models are gone with their frames
