"""How large each adversarial trick's term is at its defaults (docs/tricks.md's table, issue 17).

MiniLM-L6, 16 RTE train pairs, classifier head x30 (a trained model's confident logits), forward passes only.
Prints the two-dropout-pass KL, then per trick the dropout-off KL between perturbed and clean logits and its
ratio to the dropout KL.

  python bench/probes/perturbation_size.py
"""

import csv
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from vegalm.config import from_dict
from vegalm.finetune.models import minilm_path
from vegalm.finetune.tasks import TASKS
from vegalm.finetune.tricks import TRICKS, LossState, model_inputs, symmetric_kl, task_loss

GLUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"
CASES = [("sift", {}), ("sift", {"vat_learning_rate": 1e-4}), ("smart", {}), ("smart", {"eps": 0.1}),
         ("r3f", {}), ("r3f", {"eps": 1e-5}), ("freelb", {})]  # the defaults, and the old defaults beside them


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    p = minilm_path()
    tok = AutoTokenizer.from_pretrained(p)
    m = BertForSequenceClassification.from_pretrained(p, num_labels=2)
    with torch.no_grad():
        m.classifier.weight.mul_(30)
    with open(GLUE / "RTE" / "train.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:17]
    enc = tok([r[1] for r in rows], [r[2] for r in rows], truncation=True, max_length=128, padding=True,
              return_tensors="pt")
    b = dict(enc)
    b["labels"] = torch.tensor([int(r[3] == "entailment") for r in rows])
    m.train()
    torch.manual_seed(1)
    with torch.no_grad():
        ref = float(symmetric_kl(m(**model_inputs(b)).logits, m(**model_inputs(b)).logits))
    print("dropout KL", ref)
    m.eval()
    with torch.no_grad():
        clean = m(**model_inputs(b)).logits
    for name, args in CASES:
        cls = TRICKS[name]
        t = cls(from_dict(cls.Args, args), TASKS["rte"], 2)
        torch.manual_seed(2)
        out = m(**model_inputs(b))
        t.loss(m, b, out, task_loss(out.logits, b["labels"], 2), LossState())
        with torch.no_grad():
            kl = float(symmetric_kl(t.perturbed(m, b, t.last_delta), clean))
        print(name, args, "KL %.3g ratio %.3g" % (kl, kl / ref), flush=True)


if __name__ == "__main__":
    main()
