"""Run under `torchrun --nproc_per_node 2`: GDES, activation checkpointing and the bf16 policy under FSDP.

Prints one JSON line (rank 0) that tests/test_fsdp.py checks: the gradient norm each loss term leaves on the
generator's table E_G and on the discriminator's E_delta, the gradient difference with activation checkpointing on
vs off, and the parameter dtypes under the bf16 policy.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from vegalm.model import EncoderConfig
from vegalm.pretrain.rtd import ObjectiveConfig, RTDModel
from vegalm.train.fsdp import shard_model

import _torchrun  # tests/, the script's own folder

CFG = EncoderConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build(**kw) -> RTDModel:
    torch.manual_seed(0)  # the same initial weights on every rank and in every build
    model = RTDModel(CFG, ObjectiveConfig(gen_num_layers=1), mask_id=4, special_ids=(1, 2, 0))
    with torch.no_grad():  # a non-zero delta, so that the RTD loss reaches it through a non-trivial table
        model.discriminator.deberta.embeddings.word_embeddings.delta.normal_(0, 0.02)
    return shard_model(model, **kw)


def tables(model: RTDModel):
    return (model.generator.deberta.embeddings.word_embeddings.weight,
            model.discriminator.deberta.embeddings.word_embeddings.delta)


SAVED = [0]  # bytes autograd saved for backward in the latest forward


def _pack(t: torch.Tensor) -> torch.Tensor:
    SAVED[0] += t.numel() * t.element_size()
    return t


def backward(model: RTDModel, term: str) -> dict[str, torch.Tensor]:
    """One forward on a fixed batch (fixed masking draws), backward of one loss term; the full gradients."""
    ids = torch.randint(5, CFG.vocab_size, (4, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    torch.manual_seed(1 + dist.get_rank())  # the masking and Gumbel draws
    model.zero_grad(set_to_none=True)
    SAVED[0] = 0
    with torch.autograd.graph.saved_tensors_hooks(_pack, lambda t: t):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    (out["loss"] if term == "total" else out["terms"][term]).backward()
    return {n: p.grad.full_tensor().float() if p.grad is not None else None for n, p in model.named_parameters()}


def norm(g) -> float:
    return 0.0 if g is None else float(g.norm())


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    res: dict = {}
    model = build()
    g_name = "generator.deberta.embeddings.word_embeddings.weight"
    d_name = "discriminator.deberta.embeddings.word_embeddings.delta"
    for term in ("mlm", "rtd"):
        g = backward(model, term)
        res[term] = {"E_G": norm(g[g_name]), "E_delta": norm(g[d_name])}
    plain = backward(model, "total")
    res["saved_bytes"] = SAVED[0]
    ckpt = backward(build(activation_checkpointing=True), "total")
    res["saved_bytes_checkpointing"] = SAVED[0]
    res["checkpointing_max_grad_diff"] = max(float((plain[k] - ckpt[k]).abs().max()) for k in plain
                                             if plain[k] is not None)
    bf16 = build(mixed_precision="bf16")
    g = backward(bf16, "total")
    res["bf16"] = {"sharded_param_dtype": str(tables(bf16)[0].dtype), "grad_dtype": str(g[g_name].dtype),
                   "grad_rel_diff": float((g[g_name] - plain[g_name]).norm() / plain[g_name].norm())}
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
    _torchrun.finish()  # after main's frame, and the sharded models with it, are gone
