"""Training-step speed and memory: vegalm's encoder vs transformers' DebertaV2Model, same weights, same run.

    python bench/encoder.py            # fp32 + bf16, both shapes, peak RSS in subprocesses (~5 min on 2 cores)
    python bench/encoder.py --quick    # fp32 only, 1 warm-up step, activation memory only (< 60 s)

A step is forward + backward + AdamW on the tiny DeBERTa-v3-style config (hidden 256,
4 layers, 4 heads, FFN 1024, vocab 32k, 256 buckets, shared keys, dropout 0.1 as in the
paper). HF and ours alternate step by step so that machine noise hits both; each figure is
the median of >= 5 timed steps after 2 warm-up steps, with torch.set_num_threads(2).

Memory: `act_mb` is the bytes autograd keeps for backward after one forward (deduplicated by storage;
deterministic). `peak_rss_mb` (full mode) is the resident-set high-water mark of a fresh process running 2 steps
(VmHWM, reset before the steps), minus its RSS before the first step: the median of --repeats processes per side.
`mem_ratio_s512_live` repeats that with MALLOC_MMAP_THRESHOLD_=131072 for both sides, where freed blocks leave at
once and the peak is the live memory (see `rss_pair`). `--malloc keep` (the default) sets glibc's thresholds as
vegalm's Trainer does on a CPU (train/allocator.py) in every process, both sides.

MFU: model FLOPs (3x the forward matmul FLOPs, relative rows P = 2L-1) divided by the step
time and by the GEMM peak of the same dtype (`gemm_gflops_fp32` / `_bf16`: a 1024^3 matmul
measured in the same run). Elementwise work (softmax, LayerNorm, dropout, gathers) is not
counted, which is why MFU is well below 100% even for a good kernel.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

from vegalm.train.allocator import SWITCH, keep_freed_memory

TINY = dict(
    vocab_size=32000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
    relative_attention=True, position_buckets=256, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
    share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, max_position_embeddings=512,
)  # fmt: skip


def build_pair(seed: int = 0):
    """HF DebertaV2Model with random weights, and ours loaded from its save_pretrained folder."""
    from transformers import DebertaV2Config, DebertaV2Model

    from vegalm.model import VegaModel

    torch.manual_seed(seed)
    hf = DebertaV2Model(DebertaV2Config(**TINY)).train()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = VegaModel.from_pretrained(d).train()
    return hf, ours


def make_step(model, B: int, L: int, dtype: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, TINY["vocab_size"], (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def step():
        with amp:
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = h.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def model_flops(B: int, L: int) -> float:
    h, F, n = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"]
    P = 2 * L - 1
    per_layer = 2 * B * L * (4 * h * h + 2 * h * F)  # Q K V O + FFN
    per_layer += 2 * 2 * B * L * L * h  # QK^T and PV
    per_layer += 2 * 2 * B * L * P * h + 2 * 2 * P * h * h  # c2p, p2c tables + position projections
    return 3.0 * n * per_layer  # forward + backward (2x)


def gemm_gflops(n: int = 1024, reps: int = 7, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts) / 1e9


def activation_mb(model, B: int, L: int, dtype: str) -> float:
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(5, TINY["vocab_size"], (B, L))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        out = model(input_ids=ids, attention_mask=torch.ones(B, L, dtype=torch.long)).last_hidden_state
    del out
    return sum(seen.values()) / 2**20


def rss_child(which: str, B: int, L: int, dtype: str) -> float:
    """Run in a fresh process: RSS high-water mark of 2 training steps, minus RSS before them.
    Only the measured model is built (random weights: memory does not depend on their values)."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if which == "hf":
        from transformers import DebertaV2Config, DebertaV2Model

        model = DebertaV2Model(DebertaV2Config(**TINY)).train()
    else:
        from vegalm.model import EncoderConfig, VegaModel

        model = VegaModel(EncoderConfig.from_hf_dict({**TINY, "model_type": "deberta-v2"})).train()
    step = make_step(model, B, L, dtype)
    import gc

    gc.collect()
    # Reset the kernel's RSS high-water mark (VmHWM): a spawned child can start with its parent's.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
    for _ in range(2):
        step()
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return hwm_kb / 1024 - before


def rss_pair(B: int, L: int, dtype: str, repeats: int, **env: str) -> dict[str, float]:
    """Median peak RSS of `repeats` fresh processes per side, alternating. glibc's default malloc raises its mmap
    threshold as big blocks are freed, so freed activations stay resident and the peak varies by +-40 MB from one
    process to the next; with `env` MALLOC_MMAP_THRESHOLD_ fixed, big blocks go back at once and the peak is the
    live memory."""
    runs: dict[str, list[float]] = {"hf": [], "ours": []}
    for _ in range(repeats):
        for n in runs:
            out = subprocess.run([sys.executable, __file__, "--_rss", n, str(B), str(L), dtype],
                                 capture_output=True, text=True, check=True, env={**os.environ, **env})
            runs[n].append(json.loads(out.stdout.strip().splitlines()[-1])["rss_mb"])
    return {n: statistics.median(v) for n, v in runs.items()}


def time_pair(hf, ours, B, L, dtype, repeats: int, warmup: int):
    steps = {"hf": make_step(hf, B, L, dtype), "ours": make_step(ours, B, L, dtype)}
    times = {"hf": [], "ours": []}
    for i in range(warmup + repeats):
        for name in ("hf", "ours"):  # alternate, so load changes hit both
            t = time.perf_counter()
            steps[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fp32 only, activation memory only; < 60 s")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--malloc", choices=("keep", "default"), default="keep",
                    help="keep: glibc keeps freed large blocks, as vegalm's Trainer sets on a CPU "
                         "(train/allocator.py), for both sides; default: glibc as it starts")
    ap.add_argument("--_rss", nargs=4, metavar=("WHICH", "B", "L", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.malloc == "default":
        os.environ[SWITCH] = "0"  # this process and the RSS children
    kept = keep_freed_memory()  # the --_rss children inherit the switch (and MALLOC_*_ for the live peak)
    if args._rss:
        w, B, L, dt = args._rss
        print(json.dumps({"rss_mb": rss_child(w, int(B), int(L), dt)}))
        return

    peaks = {"fp32": gemm_gflops(), "bf16": gemm_gflops(dtype=torch.bfloat16)}
    gflops = peaks["fp32"]
    hf, ours = build_pair()
    dtypes = ["fp32"] if args.quick else ["fp32", "bf16"]
    cases = [(32, 128), (8, 512)]
    rows = []
    summary = {"gemm_gflops_fp32": round(gflops, 1), "gemm_gflops_bf16": round(peaks["bf16"], 1), "threads": 2,
               "repeats": args.repeats, "malloc": args.malloc, "malloc_kept": kept}
    print(f"{'case':<14}{'dtype':<6}{'HF tok/s':>10}{'ours tok/s':>12}{'speedup':>9}"
          f"{'HF act MB':>11}{'ours act MB':>12}{'HF RSS MB':>11}{'ours RSS MB':>12}{'MFU HF':>8}{'MFU ours':>9}")  # fmt: skip
    for dtype in dtypes:
        for B, L in cases:
            t = time_pair(hf, ours, B, L, dtype, args.repeats, warmup=1 if args.quick else 2)
            act = {n: activation_mb(m, B, L, dtype) for n, m in (("hf", hf), ("ours", ours))}
            rss = {} if args.quick else rss_pair(B, L, dtype, args.repeats)
            if not args.quick and (B, L, dtype) == (8, 512, "fp32"):
                live = rss_pair(B, L, dtype, args.repeats, MALLOC_MMAP_THRESHOLD_="131072")
                summary["mem_ratio_s512_live"] = round(live["ours"] / live["hf"], 3)
                summary["rss_live_mb_s512"] = {k: round(v) for k, v in live.items()}
            fl = model_flops(B, L)
            row = dict(
                case=f"B{B}xS{L}", dtype=dtype,
                hf_tok_s=B * L / t["hf"], ours_tok_s=B * L / t["ours"], speedup=t["hf"] / t["ours"],
                hf_act_mb=act["hf"], ours_act_mb=act["ours"], hf_rss_mb=rss.get("hf"), ours_rss_mb=rss.get("ours"),
                mfu_hf=fl / t["hf"] / 1e9 / peaks[dtype], mfu_ours=fl / t["ours"] / 1e9 / peaks[dtype],
            )  # fmt: skip
            rows.append(row)
            r = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
            print(f"{row['case']:<14}{dtype:<6}{row['hf_tok_s']:>10.0f}{row['ours_tok_s']:>12.0f}{row['speedup']:>8.2f}x"
                  f"{act['hf']:>11.0f}{act['ours']:>12.0f}{r(rss.get('hf'), '.0f'):>11}{r(rss.get('ours'), '.0f'):>12}"
                  f"{row['mfu_hf']:>8.1%}{row['mfu_ours']:>9.1%}", flush=True)  # fmt: skip
    by = {(r["case"], r["dtype"]): r for r in rows}
    s128, s512 = by[("B32xS128", "fp32")], by[("B8xS512", "fp32")]
    summary.update(
        speedup_s128=round(s128["speedup"], 3),
        speedup_s512=round(s512["speedup"], 3),
        mem_ratio_s512=round(
            (s512["ours_rss_mb"] / s512["hf_rss_mb"]) if s512["hf_rss_mb"] else s512["ours_act_mb"] / s512["hf_act_mb"], 3
        ),
        mem_ratio_kind="peak_rss" if s512["hf_rss_mb"] else "activations",
        act_ratio_s512=round(s512["ours_act_mb"] / s512["hf_act_mb"], 3),
        mfu_ours_s512=round(s512["mfu_ours"], 4),
        mfu_hf_s512=round(s512["mfu_hf"], 4),
    )
    if not args.quick:
        for c in ("B32xS128", "B8xS512"):
            summary[f"speedup_bf16_{c[-4:].lower()}"] = round(by[(c, "bf16")]["speedup"], 3)
            summary[f"mfu_ours_bf16_{c[-4:].lower()}"] = round(by[(c, "bf16")]["mfu_ours"], 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
