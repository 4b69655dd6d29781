"""Minor page faults and time of one bf16 B8xS512 step, ours and HF: `python bench/probes/page_faults.py keep|default`."""
import sys, time, resource, torch
from vegalm.train.allocator import keep_freed_memory
if sys.argv[1] == "keep": print("kept", keep_freed_memory())
torch.set_num_threads(1)
sys.path.insert(0, "/work/main/bench")
from encoder import build_pair, make_step
hf, ours = build_pair()
for name, m in (("ours", ours), ("hf", hf)):
    step = make_step(m, 8, 512, "bf16")
    for _ in range(3): step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t = time.perf_counter()
    step()
    print(sys.argv[1], name, "minflt/step", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0, "s", round(time.perf_counter() - t, 3))
