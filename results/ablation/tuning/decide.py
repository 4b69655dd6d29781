"""Apply the pre-registration's decision rules (README.md here, "Decision rules") to the tuning records.

    python results/ablation/tuning/decide.py    # prints each rule's inputs and its outcome, then a JSON line

Rule 2 (head): t3 (pooling=mean) against t2 vanilla (cls), average on the (task, seed) cells both have.
Rule 3 (adv): t2 (SiFT defaults), t4 (step 0.03, regression off), t5 (weight 1), seed 0, average over the tasks
all three have; ties go to the weaker perturbation (t4, then t5, then t2).
"""
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADV = {"t4": ("minilm-l6-t4-step003-regoff", {"vat_learning_rate": 0.03, "regression": "off"}),
       "t5": ("minilm-l6-t5-lambda1", {"vat_lambda": 1}),
       "t2": ("minilm-l6-t2", {})}  # in tie order: the weaker perturbation first


def scores(tag: str, combo: str) -> dict[tuple[str, int], float]:
    out = {}
    for f in sorted((HERE / tag).glob(f"{combo}__*__seed*.json")):
        r = json.loads(f.read_text())
        out[(r["task"], r["seed"])] = r["dev_score"]
    return out


def main() -> None:
    mean, cls = scores("minilm-l6-t3-mean", "vanilla"), scores("minilm-l6-t2", "vanilla")
    both = sorted(set(mean) & set(cls))
    m = statistics.mean(mean[c] for c in both) if both else None
    c = statistics.mean(cls[c] for c in both) if both else None
    head = None if not both else ("mean" if m >= c else "cls")
    print(f"rule 2, cells {both}: mean {m}, cls {c} -> pooling={head}")
    adv = {k: {t: s for (t, seed), s in scores(tag, "adv").items() if seed == 0} for k, (tag, _) in ADV.items()}
    tasks = sorted(set.intersection(*(set(v) for v in adv.values())))
    avg = {k: statistics.mean(v[t] for t in tasks) if tasks else None for k, v in adv.items()}
    best = None
    if tasks:
        top = max(avg.values())
        best = next(k for k in ADV if avg[k] == top)
    van = {t: s for (t, seed), s in cls.items() if seed == 0 and t in tasks}
    print(f"rule 3, tasks {tasks}: {avg}; t2 vanilla on them {van} -> adv {best} {ADV[best][1] if best else ''}")
    print(json.dumps({"pooling": head, "rule2_cells": [list(x) for x in both], "adv": best,
                      "adv_params": ADV[best][1] if best else None, "rule3_tasks": tasks, "rule3_avg": avg}))


if __name__ == "__main__":
    main()
