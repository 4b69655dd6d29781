"""Learning curve of a pretraining recipe: held-out replaced-token AUC / excess (RTD) or MLM loss against
tokens seen, from a `vegalm pretrain` run (issue 18). Run it in the background on a shared machine:

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/learning_curve.py --recipe recipes/tiny.yaml \\
        --out runs/curve phase1.train.max_steps=20000 phase2=null health.eval_every=500
    .venv/bin/python bench/learning_curve.py --out runs/curve --table-only     # re-read a (partial) run

Prints a markdown table (step, tokens, tok/s, train AUC, held-out AUC, held-out excess, generator loss vs
unigram entropy) and the first step whose held-out AUC exceeds --leave-prior (default 0.6).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def table(out: Path, leave_prior: float) -> str:
    lines = ["| phase | step | tokens (M) | tok/s | train AUC | held-out AUC | context AUC | held-out excess | token cos | gen loss | unigram H |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    fmt = lambda r, k, s=".3f": "-" if r.get(k) is None else format(r[k], s)  # noqa: E731
    tokens, left = 0.0, None
    for phase in ("phase1", "phase2"):
        f = out / phase / "metrics.jsonl"
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
        prev_elapsed = 0.0
        for r in rows:
            tokens += r["tokens_per_s"] * (r["elapsed"] - prev_elapsed)  # the window's real (non-pad) tokens
            prev_elapsed = r["elapsed"]
            if r.get("heldout_mlm_loss") is None:
                continue
            if left is None and (r.get("heldout_rtd_auc") or 0.0) > leave_prior:
                left = f"{phase} step {r['step']} ({tokens / 1e6:.2f}M tokens)"
            lines.append(f"| {phase} | {r['step']} | {tokens / 1e6:.2f} | {r['tokens_per_s']:.0f} | {fmt(r, 'rtd_auc')} | "
                         f"{fmt(r, 'heldout_rtd_auc')} | {fmt(r, 'heldout_context_auc')} | {fmt(r, 'heldout_rtd_excess')} | {fmt(r, 'heldout_token_cos')} | "
                         f"{fmt(r, 'heldout_mlm_loss', '.2f')} | {fmt(r, 'unigram_entropy', '.2f')} |")  # fmt: skip
    lines += ["", f"held-out AUC first above {leave_prior}: {left or 'not reached'}"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/tiny.yaml")
    p.add_argument("--out", required=True)
    p.add_argument("--leave-prior", type=float, default=0.6)
    p.add_argument("--table-only", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args()
    if not a.table_only:
        from vegalm.config import load_config
        from vegalm.pretrain.run import RecipeConfig, run_pretrain

        run_pretrain(load_config(RecipeConfig, a.recipe, a.overrides), a.out)
    print(table(Path(a.out), a.leave_prior))


if __name__ == "__main__":
    main()
