"""Profile one MiniLM-L6 MRPC step: `python bench/probes/profile_finetune.py {pad|unpad} {fp32|bf16}`."""
import sys, torch, copy
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from vegalm.data.glue import load_split
from vegalm.finetune.models import minilm_path
from vegalm.model.unpad import enable_unpadding
torch.set_num_threads(1)
tok = AutoTokenizer.from_pretrained(str(minilm_path()))
rows = load_split("mrpc", "train", None)[:32]
m = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=2).train()
if sys.argv[1] == "unpad": enable_unpadding(m)
opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
enc = dict(tok([e.text_a for e in rows], [e.text_b for e in rows], truncation=True, max_length=128, padding=True, return_tensors="pt"))
y = torch.tensor([int(e.label) for e in rows])
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=sys.argv[2] == "bf16"):
        loss = m(**enc, labels=y).loss
    loss.backward(); opt.step(); opt.zero_grad()
step()
from torch.profiler import profile
with profile() as p: step()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
