"""Median s/step of MiniLM-L6 RTE training steps on the packed path (unpad + FastDropout + bf16, fused AdamW),
2 threads, batches of 32 real rows (shuffled with seed 0) at max_length 256, steps 2-7 timed.

    G=4 python bench/probes/rte_step.py plain   # attention in 4 length groups (model/unpad.py ATTN_GROUPS)
    G=1 python bench/probes/rte_step.py plain   # one group: the whole batch padded to its longest
    python bench/probes/rte_step.py acc         # the forward under Accelerate's bf16 autocast wrapper instead
"""
import os
import random
import statistics
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import vegalm.model.unpad as U
from vegalm.data.glue import load_split
from vegalm.finetune.models import minilm_path
from vegalm.model.unpad import enable_unpadding, use_fast_dropout

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
U.ATTN_GROUPS = int(os.environ.get("G", "4"))
tok = AutoTokenizer.from_pretrained(str(minilm_path()))
rows = load_split("rte", "train", None)
random.seed(0)
random.shuffle(rows)
m = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=2).train()
enable_unpadding(m)
use_fast_dropout(m)
opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True)
mode = sys.argv[1] if len(sys.argv) > 1 else "plain"
if mode == "acc":
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="bf16", cpu=True)
    m, opt = acc.prepare(m, opt)


def batch(i):
    ch = rows[32 * i : 32 * i + 32]
    enc = dict(tok([e.text_a for e in ch], [e.text_b for e in ch], truncation=True, max_length=256, padding=True,
                   return_tensors="pt"))
    return enc, torch.tensor([int(e.label) for e in ch])


def step(i):
    enc, y = batch(i)
    if mode == "acc":
        loss = m(**enc, labels=y).loss
        acc.backward(loss)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(**enc, labels=y).loss
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


step(0)
step(1)
ts = []
for i in range(2, 8):
    t = time.perf_counter()
    step(i)
    ts.append(time.perf_counter() - t)
print(mode, f"groups={U.ATTN_GROUPS}", "median s/step", round(statistics.median(ts), 3), [round(t, 2) for t in ts])
