"""`vegalm pretrain --recipe R --out DIR [key=value ...]`."""

from __future__ import annotations


def register(sub, formatter) -> None:
    p = sub.add_parser(
        "pretrain",
        help="tokenizer + phase-1 RTD + phase-2 RTD/SimCSE pretraining, exported for transformers",
        description="Run the recipe's pretraining phases. Re-running the same command skips finished stages\n"
        "and resumes an interrupted phase from its latest checkpoint.\n\n"
        "examples:\n"
        "  vegalm pretrain --recipe recipes/tiny.yaml --out runs/pt\n"
        "  vegalm pretrain --recipe recipes/tiny.yaml --out runs/pt phase1.train.max_steps=100 model.num_hidden_layers=2\n"
        "  torchrun --nproc_per_node 8 -m vegalm.cli pretrain --recipe recipes/base.yaml --out runs/base",
        formatter_class=formatter,
    )
    p.add_argument("--recipe", required=True, help="YAML recipe (recipes/*.yaml)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints of unfinished phases")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, dotted names")
    p.set_defaults(func=_pretrain)


def _pretrain(args) -> int:
    from vegalm.config import load_config
    from vegalm.pretrain.run import RecipeConfig, run_pretrain

    cfg = load_config(RecipeConfig, args.recipe, args.overrides)
    res = run_pretrain(cfg, args.out, resume=not args.no_resume)
    if "model_path" in res:
        print(f"pretraining done in {res['wall_s']:.0f} s; model: {res['model_path']}")
    return 0
