"""A/B of the 2026-12-07 evening changes on our encoder's training step (bench/encoder.py's tiny config).

    python bench/probes/step_paths_ab.py [REPEATS]

Arms, alternating step by step in one process: `new` (all of them), `no-recompute` (model/ffn.py off: eager
GELU + linear), `broadcast` (c2p/p2c by broadcast matmul, as before), `fp32-softmax` (FusedAttention's softmax
taken in fp32 and cast back, as before). Prints the median s/step per arm and case, relative to `new`.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encoder import build_pair, make_step  # noqa: E402

import vegalm.model.attention as attention  # noqa: E402
import vegalm.model.encoder as encoder  # noqa: E402

NEW = (encoder.APPROXIMATE, attention._per_head, attention._softmax)


def arm(name: str) -> None:
    encoder.APPROXIMATE, attention._per_head, attention._softmax = NEW
    if name == "no-recompute":
        encoder.APPROXIMATE = {}
    if name == "broadcast":
        attention._per_head = lambda x, table: x @ table.transpose(-1, -2)
    if name == "fp32-softmax":
        attention._softmax = lambda s: torch.softmax(s, -1, dtype=torch.float32).to(s.dtype)


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    torch.set_num_threads(2)
    _, ours = build_pair()
    arms = ("new", "no-recompute", "broadcast", "fp32-softmax")
    for dtype in ("fp32", "bf16"):
        for B, L in ((32, 128), (8, 512)):
            step = make_step(ours, B, L, dtype)
            times = {a: [] for a in arms}
            for i in range(repeats + 1):
                for a in arms:
                    arm(a)
                    t = time.perf_counter()
                    step()
                    if i:
                        times[a].append(time.perf_counter() - t)
            med = {a: statistics.median(v) for a, v in times.items()}
            print(f"B{B}xS{L} {dtype}: " + "  ".join(f"{a} {med[a]:.3f}s ({med[a] / med['new']:.3f})" for a in arms),
                  flush=True)
    arm("new")


if __name__ == "__main__":
    main()
