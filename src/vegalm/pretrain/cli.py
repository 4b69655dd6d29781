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
    p.add_argument("--retrain", action="store_true",
                   help="rebuild finished stages (tokenizer, data, phases, export) made with other settings, "
                        "and every stage after them; without it such a rerun stops and names the changed keys")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, dotted names")
    p.set_defaults(func=_pretrain)

    t = sub.add_parser(
        "tapt",
        help="task-adaptive continued RTD on a GLUE task's train+dev+test text (transductive fine-tuning (a))",
        description="Continue RTD pretraining (generator + discriminator, GDES) of our own pretrained encoder on\n"
        "every sentence of one GLUE task (train, dev and the unlabeled test inputs), then fine-tune from\n"
        "OUT/discriminator. Needs the RTD generator (a `vegalm pretrain` output); transformers backbones\n"
        "without one (MiniLM-L6) cannot use it. Settings are TaptConfig keys (vegalm/pretrain/tapt.py):\n"
        "seq_len, generator, glue_dir, objective.*, train.* (defaults: 10 epochs, lr 1e-4, 6% warm-up).\n\n"
        "examples:\n"
        "  vegalm tapt --task rte --model runs/pt --out runs/tapt/rte\n"
        "  vegalm finetune --task rte --model runs/tapt/rte/discriminator --out runs/ft/rte-tapt\n"
        "  vegalm tapt --task cola --model runs/pt/discriminator --out runs/tapt/cola train.epochs=20 train.lr=5e-5",
        formatter_class=formatter,
    )
    t.add_argument("--task", required=True, help="a GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli")
    t.add_argument("--model", required=True, help="a `vegalm pretrain` output folder, or its discriminator/ folder")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--recipe", default=None, help="YAML file of TaptConfig keys (key=value overrides win)")
    t.add_argument("settings", nargs="*", metavar="key=value", help="TaptConfig overrides, dotted names")
    t.set_defaults(func=_tapt)


def _pretrain(args) -> int:
    from vegalm.config import load_config
    from vegalm.pretrain.run import RecipeConfig, run_pretrain

    cfg = load_config(RecipeConfig, args.recipe, args.overrides)
    res = run_pretrain(cfg, args.out, resume=not args.no_resume, retrain=args.retrain)
    if "model_path" in res:
        print(f"pretraining done in {res['wall_s']:.0f} s; model: {res['model_path']}")
    return 0


def _tapt(args) -> int:
    from vegalm.pretrain.tapt import load_tapt_config, run_tapt

    cfg = load_tapt_config(args.recipe, [f"task={args.task}", f"model={args.model}", f"out={args.out}", *args.settings])
    res = run_tapt(cfg)
    state = "already complete" if res["cached"] else f"done in {res['wall_s']:.0f} s"
    print(f"tapt {res['task']}: {state}; {res['texts']} sentences, {res['segments']} segments; "
          f"fine-tune from {res['model_path']}")
    return 0
