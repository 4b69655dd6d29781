"""glibc malloc kept (train/allocator.py) vs as it starts: step times of ours and transformers' DeBERTa, same run.

    python bench/probes/malloc_ab.py [--rounds 2]   # per round a fresh process per mode, side by side, 1 thread

Each process times both models (bench/encoder.py's pair, alternating step by step: 2 warm-up, 5 timed steps,
median) at bf16 S512, bf16 S128 and fp32 S512. The last line is a JSON object of the per-mode medians over
the rounds, and each model's keep/default speed ratio.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CASES = [("bf16", 8, 512), ("bf16", 32, 128), ("fp32", 8, 512)]


def child() -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from encoder import build_pair, time_pair

    from vegalm.train.allocator import keep_freed_memory

    kept = keep_freed_memory()
    torch.set_num_threads(1)
    hf, ours = build_pair()
    out = {"kept": kept}
    for dt, B, L in CASES:
        out[f"{dt}_s{L}"] = time_pair(hf, ours, B, L, dt, repeats=5, warmup=2)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--_child", action="store_true")
    a = ap.parse_args()
    if a._child:
        return child()
    runs = {"keep": [], "default": []}
    for _ in range(a.rounds):  # the two modes side by side, one thread each, so that load hits both alike
        procs = {}
        for mode in runs:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "VEGALM_KEEP_FREED_MEMORY": "1" if mode == "keep" else "0"}
            procs[mode] = subprocess.Popen([sys.executable, __file__, "--_child"], env=env, text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for mode, p in procs.items():
            out, _ = p.communicate()
            assert p.returncode == 0, mode
            got = json.loads(out.strip().splitlines()[-1])
            assert got["kept"] is (mode == "keep"), got
            runs[mode].append(got)
            print(mode, json.dumps(got), flush=True)
    summary = {}
    for dt, _, L in CASES:
        case = f"{dt}_s{L}"
        for who in ("ours", "hf"):
            med = {m: statistics.median(r[case][who] for r in runs[m]) for m in runs}
            summary[f"{case}_{who}_s"] = {m: round(v, 4) for m, v in med.items()}
            summary[f"{case}_{who}_keep_speedup"] = round(med["default"] / med["keep"], 3)
        summary[f"{case}_ours_vs_hf"] = {
            m: round(statistics.median(r[case]["hf"] / r[case]["ours"] for r in runs[m]), 3) for m in runs}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
