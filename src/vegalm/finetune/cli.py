"""`vegalm finetune` (one task, one seed) and `vegalm glue` (tasks x seeds, report, submission)."""

from __future__ import annotations

import argparse
from typing import Any

from vegalm.config import ConfigError, apply_overrides, from_dict, load_yaml

_KEYS_HELP = (
    "Settings are FinetuneConfig keys given as key=value (YAML values; lists as a,b), e.g. lr=5e-5 epochs=10 "
    "batch_size=16 max_length=256 seed=1 defaults=run_glue mixed_precision=bf16 layerwise_lr_decay=0.8 "
    "reinit_top_layers=2 ema_decay=0.999 init_from=runs/ft/mnli/model tricks=adv,rdrop trick_args.adv.eps=1e-5 "
    "max_train_samples=512 glue_dir=../shared/data/glue checkpoint_every=50 (an interrupted run continues from its "
    "latest checkpoint when started again) grad_accum=4 (on a CPU: each batch as 4 length-sorted micro-batches, "
    "same gradient, less padding). Unset lr/epochs/batch_size/warmup_ratio/max_length "
    "take the per-task defaults (see vegalm/finetune/tasks.py)."
)

FINETUNE_DESC = f"""Fine-tune one model on one GLUE task with vegalm's Trainer, evaluate every dev split,
predict the test split(s), and write OUT/results.json, dev/test predictions (.tsv) and logits (.npy).
A run whose OUT/results.json has the same config hash is skipped (cached).

{_KEYS_HELP}

examples:
  vegalm finetune --task rte --model runs/pt/discriminator --out runs/ft/rte
  vegalm finetune --task stsb --model minilm-l6 --out runs/ft/stsb lr=5e-5 epochs=5
  vegalm finetune --task rte --model PATH --out runs/ft/rte2 init_from=runs/ft/mnli/model
  vegalm finetune --task cola --model PATH --out runs/ft/cola --recipe my_finetune.yaml seed=3
"""

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

def register(sub, formatter) -> None:
    p = sub.add_parser("finetune", help="fine-tune on one GLUE task", description=FINETUNE_DESC,
                       formatter_class=formatter)
    p.add_argument("--task", required=True, help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli")
    p.add_argument("--model", required=True, help="model folder (config.json + weights + tokenizer), or minilm-l6")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--recipe", default=None, help="YAML file of FinetuneConfig keys (key=value overrides win)")
    p.add_argument("settings", nargs="*", metavar="key=value", help="FinetuneConfig overrides")
    p.set_defaults(func=_finetune)

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


def _settings(recipe: str | None, settings: list[str]) -> dict[str, Any]:
    data = load_yaml(recipe) if recipe else {}
    try:
        return apply_overrides(data, settings)
    except ConfigError as e:
        raise ConfigError(f"{recipe}: {e}" if recipe else str(e)) from None


def _finetune(args: argparse.Namespace) -> int:
    from vegalm.finetune.runner import FinetuneConfig, run_finetune

    data = _settings(args.recipe, args.settings)
    for key in ("task", "model", "out"):
        if key in data:
            raise ConfigError(f"{key}: give it as --{key}, not as a key=value setting")
    data.update(task=args.task, model=args.model, out=args.out)
    try:
        cfg = from_dict(FinetuneConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{args.recipe}: {e}" if args.recipe else str(e)) from None
    res = run_finetune(cfg)
    metrics = "; ".join(("" if s == "dev" else f"{s} ") + ", ".join(f"{k} {v:.2f}" for k, v in m.items())
                        for s, m in res["dev"].items())
    how = "cached" if res["cached"] else f"{res['timing']['wall_s']:.0f} s"
    print(f"{res['task']} seed {res['seed']}: dev {metrics} (task score {res['dev_score']:.2f}; {how}) "
          f"-> {args.out}/results.json")
    return 0


def _glue(args: argparse.Namespace) -> int:
    from vegalm.finetune.glue_runner import run_glue

    data = _settings(args.recipe, args.settings)
    res = run_glue(args.model, args.tasks, args.seeds, args.out, ensemble=args.ensemble,
                   skip_missing=args.skip_missing, **data)
    g = res["glue"]["median"]
    print(f"GLUE dev score (median over {len(res['seeds'])} seed(s)): {g['score']:.2f} over "
          f"{len(g['task_scores'])} task(s){' (' + g['note'] + ')' if g['note'] else ''}\n"
          f"report: {args.out}/results.md, submission: {args.out}/submission.zip")
    return 0
