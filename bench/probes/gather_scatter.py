"""c2p/p2c gather and scatter-add micro-benchmark (B8 H4 L512): `python bench/probes/gather_scatter.py`."""
import torch, time
from vegalm.model.relpos import rel_index
torch.set_num_threads(1)
B,H,L=8,4,512
idx = rel_index(L, 256, 256, 512); lo=int(idx.min()); idx=idx-lo; P=int(idx.max())+1
full = idx.expand(B,H,L,L)
for dt in (torch.bfloat16, torch.float32):
    g = torch.randn(B,H,L,L, dtype=dt)
    c = torch.randn(B,H,L,P, dtype=dt)
    def t(f, n=3):
        f(); ts=[]
        for _ in range(n):
            s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
        return min(ts)*1e3
    print(dt, "scatter_add", t(lambda: g.new_zeros(B,H,L,P).scatter_add_(-1, full, g)),
          "scatter_add T", t(lambda: g.new_zeros(B,H,L,P).scatter_add_(-1, full.transpose(-1,-2), g.transpose(-1,-2))),
          "gather", t(lambda: torch.gather(c, -1, full)),
          "gatherT", t(lambda: torch.gather(c, -1, full.transpose(-1,-2)).transpose(-1,-2)),
          "fp32 scatter of bf16", t(lambda: torch.zeros(B,H,L,P).scatter_add_(-1, full, g.float())))
