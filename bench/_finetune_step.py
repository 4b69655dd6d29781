"""Per-piece cost of a MiniLM-L6 fine-tuning step (forward + backward + AdamW), one process, arms alternating.

    python bench/_finetune_step.py --task mrpc --steps 5     # median s/step of each arm, one JSON line last

Arms: pad128 (run_glue.py: every batch padded to 128, fp32), dynamic (padded to the batch's longest, fp32),
dynamic+bf16 (autocast), unpad (model/unpad.py, fp32), unpad+bf16, unpad+fastdrop+bf16
(nn.Dropout replaced by FastDropout). Same batches of 32 for every arm
(real GLUE train rows, in file order), dropout on as in training.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="mrpc")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arms", default="pad128,dynamic,dynamic+bf16,unpad,unpad+bf16,unpad+fastdrop+bf16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from vegalm.data.glue import get_task, load_split
    from vegalm.finetune.models import minilm_path
    from vegalm.model.unpad import enable_unpadding, use_fast_dropout

    spec = get_task(args.task)
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    rows = load_split(spec.name, "train", None)[: 32 * (args.steps + 1)]
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=spec.num_labels)
    arms = [a.strip() for a in args.arms.split(",")]
    models, opts = {}, {}
    for arm in arms:
        m = copy.deepcopy(base).train()
        if arm.startswith("unpad"):
            assert enable_unpadding(m)
        if "fastdrop" in arm:
            use_fast_dropout(m)
        models[arm], opts[arm] = m, torch.optim.AdamW(m.parameters(), lr=1e-5)

    def batch(i, arm):
        chunk = rows[32 * i : 32 * (i + 1)]
        pad = "max_length" if arm == "pad128" else True
        enc = tok([e.text_a for e in chunk], [e.text_b for e in chunk] if spec.is_pair else None, truncation=True,
                  max_length=128, padding=pad, return_tensors="pt")
        return dict(enc), torch.tensor([int(e.label) for e in chunk])

    times = {a: [] for a in arms}
    for i in range(args.steps + 1):
        for arm in arms:
            b, y = batch(i, arm)
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in arm else nullcontext()
            t = time.perf_counter()
            with amp:
                loss = models[arm](**b, labels=y).loss
            loss.backward()
            opts[arm].step()
            opts[arm].zero_grad(set_to_none=True)
            if i:  # step 0 warms up
                times[arm].append(time.perf_counter() - t)
    med = {a: statistics.median(v) for a, v in times.items()}
    for a in arms:
        print(f"{a:<14}{med[a]:8.3f} s/step  {med['pad128'] / med[a] if 'pad128' in med else 0:5.2f}x vs pad128")
    print(json.dumps({"task": args.task, "threads": args.threads, "steps": args.steps,
                      "s_per_step": {a: round(v, 4) for a, v in med.items()}}))


if __name__ == "__main__":
    main()
