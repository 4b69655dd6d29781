"""Profile one bf16 training step of our encoder (bench/encoder.py pair): `python bench/probes/profile_encoder.py [B L]`."""
import sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from encoder import build_pair, make_step
torch.set_num_threads(1)
hf, ours = build_pair()
B, L = (8, 512) if len(sys.argv) < 2 else map(int, sys.argv[1:3])
step = make_step(ours, B, L, "bf16")
for _ in range(2): step()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as p:
    t = time.perf_counter(); step(); print("step s", time.perf_counter() - t)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
