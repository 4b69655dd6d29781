"""`vegalm glue` (tasks x seeds, report, submission) and `vegalm ablate` (the trick ablation and its records)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vegalm.config import ConfigError
from vegalm.finetune.cli import _KEYS_HELP, _settings

GLUE_DESC = f"""Run each task x seed with `vegalm finetune` into OUT/<task>/seed<k>/ (finished runs are
reused, so an interrupted sweep continues), then write OUT/results.md (median, mean ± std, best seed
per task and the GLUE score with its averaging rule), OUT/results.json, OUT/results.png and
OUT/submission.zip (11 files; tasks not run get placeholders). Test predictions come from the best
dev seed, or from the mean of the seeds' logits with --ensemble.

{_KEYS_HELP} They apply to every run; save_model defaults to false in a sweep.

examples:
  vegalm glue --model runs/pt/discriminator --tasks cola,sst2,mrpc,stsb,rte,wnli --seeds 3 --out runs/glue
  vegalm glue --model minilm-l6 --tasks rte,mrpc,stsb --seeds 5 --out runs/glue-mini --ensemble
  vegalm glue --model PATH --tasks cola,sst2,mrpc,stsb,rte,wnli,qnli --seeds 3 --out runs/glue --skip-missing
"""

ABLATE_DESC = f"""Trick ablation: run each combo x task x seed with `vegalm finetune` (vega per-task defaults)
into OUT/<combo>/<task>/seed<k>/ (finished runs are reused, so an interrupted sweep continues), write one
small JSON record per run to RESULTS_DIR/<model-tag>/<combo>__<task>__seed<k>.json (commit these), and
report per task and combo the mean ± std and median over seeds, the task average, each combo's change vs
vanilla, its wall-time cost vs vanilla, calibration (ECE/NLL before/after temperature scaling, cross-fitted)
and, for MiniLM-L6, the transformers-Trainer anchor. The report is printed and written to OUT/ablation.md,
OUT/ablation.json and OUT/ablation.png; the last stdout line is one JSON object
{{"tasks": [...], "seeds": N, "avg": {{combo: task-average dev score}}}}.

Combos: vanilla (no tricks), adv, selfcal, transductive (self-training on confident, class-balanced test
pseudo-labels; STS-B gets none: regression), all (= adv + selfcal + transductive), or any single trick
name (smart, freelb, r3f, sift, ema); join parts with + (adv+ema, all+ema). See docs/ablation.md.

{_KEYS_HELP} They apply to every run; save_model defaults to false. task/model/out/seed/tricks are set
by the ablation.

examples:
  vegalm ablate --model minilm-l6 --tasks rte,mrpc,stsb,cola --seeds 3 --out runs/ablate   # the default combos
  vegalm ablate --model runs/pt/discriminator --tasks rte --seeds 1,2 --tricks vanilla,all+ema --out runs/abl-pt
  vegalm ablate --model minilm-l6 --tasks rte --seeds 1 --tricks vanilla,adv --out /tmp/abl trick_args.adv.method=smart
  vegalm ablate --model minilm-l6 --seeds 3 --jobs 12 --out runs/ablate     # 12 runs at once on one GPU
  vegalm ablate --summary results/ablation/minilm-l6
  vegalm ablate --summary results/ablation/minilm-l6-gpu --out results/ablation-report/minilm-l6-gpu   # + .md/.png
  vegalm ablate --model minilm-l6 --seeds 3 --out runs/gpu-abl --cached-only mixed_precision=bf16   # no training
"""


def register(sub, formatter) -> None:
    g = sub.add_parser("glue", help="GLUE sweep: tasks x seeds, report, submission zip", description=GLUE_DESC,
                       formatter_class=formatter)
    g.add_argument("--model", required=True, help="model folder, or minilm-l6")
    g.add_argument("--tasks", required=True, help="comma-separated, e.g. cola,sst2,mrpc,stsb,rte,wnli,qnli")
    g.add_argument("--seeds", default="3", help="a count (3 = seeds 0,1,2) or a list (1,5,9)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--ensemble", action="store_true", help="average the seeds' logits (dev score + test predictions)")
    g.add_argument("--skip-missing", action="store_true", help="skip tasks without a train file instead of failing")
    g.add_argument("--recipe", default=None, help="YAML file of FinetuneConfig keys applied to every run")
    g.add_argument("settings", nargs="*", metavar="key=value", help="FinetuneConfig overrides for every run")
    g.set_defaults(func=_glue)

    a = sub.add_parser("ablate", help="trick ablation: combos x tasks x seeds, table, plot, committed records",
                       description=ABLATE_DESC, formatter_class=formatter)
    a.add_argument("--model", default=None, help="model folder, or minilm-l6 (not needed with --summary)")
    a.add_argument("--tasks", default="rte,mrpc,stsb,cola", help="comma-separated GLUE tasks")
    a.add_argument("--seeds", default="3", help="a count (3 = seeds 0,1,2) or a list (1,5,9)")
    a.add_argument("--tricks", default="vanilla,adv,selfcal,transductive,all", help="comma-separated combos")
    a.add_argument("--out", default=None, help="run folder; with --summary, where to write ablation.md/.json/.png")
    a.add_argument("--results-dir", default="results/ablation", help="where the per-run JSON records go")
    a.add_argument("--model-tag", default=None, help="records subfolder; default: from --model (pt-discriminator)")
    a.add_argument("--pseudo-fraction", type=float, default=0.3,
                   help="transductive: share of each test split kept as pseudo-labels, split evenly over classes")
    a.add_argument("--jobs", type=int, default=1,
                   help="runs at once, in worker processes (e.g. 12 for MiniLM on one big GPU; on a CPU each "
                        "worker gets cores // jobs threads)")
    a.add_argument("--pseudo-min-dev-accuracy", type=float, default=0.0, metavar="PCT",
                   help="transductive: skip the student (report the teacher) when the teacher's accuracy on the dev "
                        "rows past the pseudo-label confidence cut is below PCT (0 = off)")
    a.add_argument("--cached-only", action="store_true",
                   help="train nothing: read back the finished runs under --out, rewrite their records and the "
                        "report, and list the runs that are not cached")
    a.add_argument("--summary", default=None, metavar="RESULTS",
                   help="only reprint the table from the JSON records under RESULTS (no training)")
    a.add_argument("--recipe", default=None, help="YAML file of FinetuneConfig keys applied to every run")
    a.add_argument("settings", nargs="*", metavar="key=value", help="FinetuneConfig overrides for every run")
    a.set_defaults(func=_ablate)


def _glue(args: argparse.Namespace) -> int:
    from vegalm.experiments.glue import run_glue

    data = _settings(args.recipe, args.settings)
    res = run_glue(args.model, args.tasks, args.seeds, args.out, ensemble=args.ensemble,
                   skip_missing=args.skip_missing, **data)
    g = res["glue"]["median"]
    print(f"GLUE dev score (median over {len(res['seeds'])} seed(s)): {g['score']:.2f} over "
          f"{len(g['task_scores'])} task(s){' (' + g['note'] + ')' if g['note'] else ''}\n"
          f"report: {args.out}/results.md, submission: {args.out}/submission.zip")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from vegalm.experiments import ablate

    if args.summary:
        if args.settings or args.model:
            raise ConfigError("--summary reads the JSON records only; drop --model and key=value settings")
        if args.out and Path(args.out).resolve() == Path(args.summary).resolve():
            raise ConfigError("--summary with --out: write the report outside the records folder")
        summary = ablate.summarize(ablate.load_records(args.summary))
        if args.out:  # the report files, from committed records (the records folder holds records only)
            ablate.write_report(summary, args.out)
        ablate.print_report(summary)
        return 0
    for flag in ("model", "out"):
        if not getattr(args, flag):
            raise ConfigError(f"--{flag}: required for a sweep (or pass --summary RESULTS)")
    data = _settings(args.recipe, args.settings)
    summary = ablate.run_ablation(args.model, args.tasks, args.seeds, args.tricks, args.out,
                                  results_dir=args.results_dir, tag=args.model_tag,
                                  pseudo_fraction=args.pseudo_fraction,
                                  pseudo_min_dev_accuracy=args.pseudo_min_dev_accuracy, jobs=args.jobs,
                                  cached_only=args.cached_only, **data)
    missing = summary.get("not_cached") or []
    print(f"trained {summary['trained_runs']} run(s); records: {summary['records_dir']}; "
          f"report: {args.out}/ablation.md, plot: {args.out}/ablation.png"
          + (f"; not cached (skipped): {', '.join(missing)}" if missing else ""))
    ablate.print_report(summary)
    return 0
