"""Fully sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`) for the Trainer.

    model = shard_model(model, mixed_precision="bf16", activation_checkpointing=True)   # after init_process_group

One FSDP unit per encoder layer (every module held in a `ModuleList`), plus the root for the rest (embeddings, heads,
the GDES delta): parameters become DTensors sharded along dim 0 over all processes. Why not Accelerate's FSDP plugin:
it only switches on under `accelerate launch` with a GPU config, while `fully_shard` runs the same way on CPU (gloo)
and GPU (NCCL), so the CPU tests exercise the code a GPU run uses. Checkpoints: train/checkpoint.py (DCP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from vegalm.errors import VegaError


def is_sharded(model: nn.Module) -> bool:
    """True once `fully_shard` has been applied to `model` (its class becomes an FSDPModule subclass)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def layer_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that become one FSDP unit each: the members of every ModuleList (encoder layers of our models and of
    transformers' encoders), innermost lists first so nested lists (none in ours) never wrap twice."""
    found: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            found.extend(m)
    return found


def enable_checkpointing(model: nn.Module) -> int:
    """Recompute each layer's activations in backward: our Encoder's flag, or transformers' switch. Returns how many
    encoders were switched."""
    n = 0
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing") and isinstance(m.gradient_checkpointing, bool):
            m.gradient_checkpointing = True
            n += 1
    if n == 0 and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        n = 1
    return n


def shard_model(model: nn.Module, *, mixed_precision: str = "no", reshard_after_forward: bool = True,
                activation_checkpointing: bool = False, device: torch.device | str = "cpu") -> nn.Module:
    """Shard `model` in place over the default process group and return it.

    mixed_precision "bf16": parameters are all-gathered and used in bf16, gradients reduce-scattered in fp32 (the
    sharded master weights and the optimizer stay fp32). reshard_after_forward: free each layer's gathered weights
    after its forward (ZeRO-3); False keeps them until backward (ZeRO-2-like, more memory, one all-gather less)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise VegaError("train.fsdp=true needs a process group: launch with torchrun (or accelerate launch)")
    if is_sharded(model):
        return model
    if mixed_precision not in ("no", "bf16"):
        raise VegaError(f"train.mixed_precision={mixed_precision!r}: FSDP supports no or bf16")
    device = torch.device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
    if activation_checkpointing and enable_checkpointing(model) == 0:
        raise VegaError("train.activation_checkpointing: this model has no checkpointing switch")
    for layer in layer_modules(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def local_numel(tensors) -> int:
    """Elements this process holds of `tensors` (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel()
    return total


def full_state_dict(model: nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded weights on the CPU: on the main process only ({} elsewhere), or on every process with
    `everywhere`. Collective under FSDP; a plain state_dict otherwise."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)  # cpu_offload: rank 0 keeps it
        state = get_model_state_dict(model, options=opts)
    else:
        state = model.state_dict()
    return {k: v.detach().cpu() for k, v in state.items()}


__all__ = ["shard_model", "enable_checkpointing", "is_sharded", "layer_modules", "local_numel", "full_state_dict"]
