"""`vegalm glue` (tasks x seeds, report, submission) and `vegalm ablate` (the trick ablation and its records)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vegalm.config import ConfigError
from vegalm.finetune.cli import _KEYS_HELP, _settings

# the sweep's defaults without a --plan; literal here so that `vegalm --help` imports no torch (a test ties
# DEFAULT_COMBOS and PSEUDO_FRACTION to experiments/ablate/combos.py and finetune/stages/self_training.py)
ABLATE_DEFAULTS = {"tasks": "rte,mrpc,stsb,cola", "seeds": "3", "tricks": "vanilla,adv,selfcal,transductive,all",
                   "results_dir": "results/ablation", "pseudo_fraction": 0.3, "pseudo_min_dev_accuracy": 0.0}

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
name (smart, freelb, r3f, sift, rdrop, ema); join parts with + (adv+ema, all+ema). See docs/ablation.md.

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
    unset = argparse.SUPPRESS  # not set unless given: --plan refuses what it fixes; the defaults are applied later
    d = ABLATE_DEFAULTS
    a.add_argument("--model", default=unset, help="model folder, or minilm-l6 (not needed with --summary or --plan)")
    a.add_argument("--tasks", default=unset, help=f"comma-separated GLUE tasks (default {d['tasks']})")
    a.add_argument("--seeds", default=unset,
                   help=f"a count (3 = seeds 0,1,2; default {d['seeds']}) or a list (1,5,9; '0,' is seed 0 alone)")
    a.add_argument("--tricks", default=unset, help=f"comma-separated combos (default {d['tricks']})")
    a.add_argument("--out", default=None, help="run folder; with --summary, where to write ablation.md/.json/.png")
    a.add_argument("--results-dir", default=unset,
                   help=f"where the per-run JSON records go (default {d['results_dir']})")
    a.add_argument("--model-tag", default=unset, help="records subfolder; default: from --model (pt-discriminator)")
    a.add_argument("--pseudo-fraction", type=float, default=unset,
                   help="transductive: share of each test split kept as pseudo-labels, split evenly over classes "
                        f"(default {d['pseudo_fraction']})")
    a.add_argument("--plan", default=None, metavar="FILE",
                   help="a pre-registered sweep: model, tasks, seeds, combos, records folder, device and settings "
                        "from FILE (docs/ablation.md, experiments/ablate/plan.py); each record carries its sha256")
    a.add_argument("--jobs", type=int, default=1,
                   help="runs at once, in worker processes (e.g. 12 for MiniLM on one big GPU; on a CPU each "
                        "worker gets cores // jobs threads)")
    a.add_argument("--pseudo-min-dev-accuracy", type=float, default=unset, metavar="PCT",
                   help="transductive: skip the student (report the teacher) when the teacher's accuracy on the dev "
                        "rows past the pseudo-label confidence cut is below PCT (0 = off)")
    a.add_argument("--cached-only", action="store_true",
                   help="train nothing: read back the finished runs under --out, rewrite their records and the "
                        "report, and list the runs that are not cached")
    a.add_argument("--summary", default=None, metavar="RESULTS",
                   help="only reprint the table from the JSON records under RESULTS (no training)")
    a.add_argument("--recipe", default=unset, help="YAML file of FinetuneConfig keys applied to every run")
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
        if args.settings or hasattr(args, "model") or args.plan:
            raise ConfigError("--summary reads the JSON records only; drop --model, --plan and key=value settings")
        if args.out and Path(args.out).resolve() == Path(args.summary).resolve():
            raise ConfigError("--summary with --out: write the report outside the records folder")
        summary = ablate.summarize(ablate.load_records(args.summary))
        if args.out:  # the report files, from committed records (the records folder holds records only)
            ablate.write_report(summary, args.out)
        ablate.print_report(summary)
        return 0
    if not args.plan and not hasattr(args, "model"):
        raise ConfigError("--model: required for a sweep (or pass --summary RESULTS, or --plan FILE)")
    if not args.out:
        raise ConfigError("--out: required for a sweep (or pass --summary RESULTS)")
    if args.plan:
        kwargs = _planned(args)
    else:
        d = {**ABLATE_DEFAULTS, **vars(args)}
        kwargs = dict(model=args.model, tasks=d["tasks"], seeds=d["seeds"], combos=d["tricks"],
                      results_dir=d["results_dir"], tag=d.get("model_tag"), pseudo_fraction=d["pseudo_fraction"],
                      pseudo_min_dev_accuracy=d["pseudo_min_dev_accuracy"],
                      **_settings(d.get("recipe"), args.settings))
    summary = ablate.run_ablation(out=args.out, jobs=args.jobs, cached_only=args.cached_only, **kwargs)
    missing = summary.get("not_cached") or []
    print(f"trained {summary['trained_runs']} run(s); records: {summary['records_dir']}; "
          f"report: {args.out}/ablation.md, plot: {args.out}/ablation.png"
          + (f"; not cached (skipped): {', '.join(missing)}" if missing else ""))
    ablate.print_report(summary)
    return 0


# what a plan file fixes: given beside --plan, each is an error rather than a silent override
PLANNED_FLAGS = ("model", "tasks", "seeds", "tricks", "results_dir", "model_tag", "pseudo_fraction",
                 "pseudo_min_dev_accuracy", "recipe", "settings")


def _planned(args: argparse.Namespace) -> dict:
    from vegalm.experiments.ablate.plan import check_device, load_plan

    given = [f for f in PLANNED_FLAGS if getattr(args, f, None) not in (None, [])]
    if given:
        name = "key=value settings" if given[0] == "settings" else "--" + given[0].replace("_", "-")
        raise ConfigError(f"{name}: fixed by --plan {args.plan}; change the plan (before its runs) instead")
    loaded = load_plan(args.plan)
    check_device(loaded.plan, str(args.plan))
    return {**loaded.kwargs, "plan": loaded.stamp}

