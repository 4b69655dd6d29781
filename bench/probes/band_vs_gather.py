"""A/B of the fused kernel's relative bias: BandBias (offset-ordered [B,H,L,2L-1] tables read through strided
views; the current code) against the gather/scatter-add RelBias it replaced (read from a checkout of an older
commit), on bench/encoder.py's tiny DeBERTa-v3 config, fwd + bwd + AdamW, the two alternating step by step.

    python bench/probes/band_vs_gather.py /path/to/old/checkout/src/vegalm/model/attention.py [repeats]
"""
import importlib.util
import sys
from types import MethodType

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from encoder import build_pair, time_pair  # noqa: E402

torch.set_num_threads(2)
spec = importlib.util.spec_from_file_location("old_attention", sys.argv[1])
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 7
_, band = build_pair(0)
_, gather = build_pair(0)
for m in gather.modules():
    if type(m).__name__ == "DisentangledSelfAttention":
        m._bias = MethodType(old.DisentangledSelfAttention._bias, m)
for B, L in ((32, 128), (8, 512)):
    for dtype in ("fp32", "bf16"):
        med = time_pair(band, gather, B, L, dtype, repeats, warmup=2)  # alternating; "hf" is the band model here
        print(f"B{B}xS{L} {dtype}: band {med['hf']:.3f} s, gather {med['ours']:.3f} s, "
              f"band speed-up {med['ours'] / med['hf']:.3f}x", flush=True)
