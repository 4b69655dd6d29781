"""torch.compile per encoder layer vs eager, bf16: `python bench/probes/compile_layers.py B L` (median of 5, alternating)."""
import sys, time, torch, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from encoder import build_pair, make_step
torch.set_num_threads(1)
hf, ours = build_pair()
B, L = int(sys.argv[1]), int(sys.argv[2])
eager = make_step(ours, B, L, "bf16")
for l in ours.encoder.layer:
    l.compile()
t=time.perf_counter(); comp = make_step(ours, B, L, "bf16"); comp(); print("compile s", time.perf_counter()-t, flush=True)
for l in ours.encoder.layer:
    l._compiled_call_impl = None
es, cs = [], []
for f, ts in ((eager, es), (comp, cs)):
    f()
for i in range(5):
    for l in ours.encoder.layer: l._compiled_call_impl = None
    t=time.perf_counter(); eager(); es.append(time.perf_counter()-t)
    for l in ours.encoder.layer: l.compile()
    t=time.perf_counter(); comp(); cs.append(time.perf_counter()-t)
print("eager", statistics.median(es), "compiled", statistics.median(cs))
