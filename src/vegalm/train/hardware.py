"""What this machine offers the Trainer: an accelerator, native bf16, the process group of a launch."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import PartialState


def has_accelerator_device() -> bool:
    """A CUDA or XPU device that torch can use."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


def native_bf16() -> bool:
    """True where bf16 matmuls run in hardware: a CUDA GPU with bf16, or a CPU with AMX or AVX512-BF16. Elsewhere
    a CPU emulates bf16 and autocast is slower than fp32 (fine-tuning's mixed_precision=auto reads this)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private torch.cpu probes (torch >= 2.3)
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def launched_processes() -> int:
    """The processes of this launch: WORLD_SIZE, set by torchrun / accelerate launch (1 without)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def gloo_on_cpu() -> bool:
    """A multi-process launch on a machine without an accelerator: Accelerate sets up multi-process CPU training
    (gloo) only when told cpu=True; without it torchrun gives N independent single-process runs."""
    return launched_processes() > 1 and not has_accelerator_device()


def process_state() -> PartialState:
    """Accelerate's PartialState of this launch, creating the process group under torchrun (gloo on a CPU-only
    machine, as the Trainer's Accelerator does): for work before the Trainer exists (`main_process_first`)."""
    from accelerate import PartialState

    return PartialState(cpu=gloo_on_cpu())
