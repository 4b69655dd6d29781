"""`vegalm finetune`: one task, one seed (the sweeps' commands are in vegalm.experiments.cli)."""

from __future__ import annotations

import argparse
from typing import Any

from vegalm.config import ConfigError, apply_overrides, from_dict, load_yaml

_KEYS_HELP = (
    "Settings are FinetuneConfig keys given as key=value (YAML values; lists as a,b); `vegalm finetune --help` "
    "lists them all. Training keys live under train. (train.lr=5e-5, train.seed=1, train.mixed_precision=bf16); "
    "the short forms lr=, epochs=, batch_size=, seed=, checkpoint_every= ... are aliases. Unset train.lr, "
    "train.epochs, train.batch_size, train.warmup_ratio and max_length take the per-task defaults."
)

FINETUNE_DESC = f"""Fine-tune one model on one GLUE task with vegalm's Trainer, evaluate every dev split,
predict the test split(s), and write OUT/results.json, dev/test predictions (.tsv) and logits (.npy).
A run whose OUT/results.json has the same config hash is skipped (cached).

{_KEYS_HELP}

examples:
  vegalm finetune --task rte --model runs/pt/discriminator --out runs/ft/rte
  vegalm finetune --task stsb --model minilm-l6 --out runs/ft/stsb train.lr=5e-5 train.epochs=5
  vegalm finetune --task mrpc --model minilm-l6 --out runs/ft/mrpc mixed_precision=bf16 group_by_length=true epochs=3
  vegalm finetune --task rte --model minilm-l6 --out runs/ft/rte-adv tricks=adv,selfcal trick_args.adv.method=smart
  vegalm finetune --task rte --model PATH --out runs/ft/rte2 init_from=runs/ft/mnli/model
  vegalm finetune --task cola --model PATH --out runs/ft/cola --recipe my_finetune.yaml seed=3
"""

class _HelpWithKeys(argparse.Action):
    """-h: the parser's help, then every FinetuneConfig key with its default and help text, read from the
    dataclass fields' metadata when asked (building the parser stays free of torch)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        print("\n" + keys_help())
        parser.exit()


def keys_help() -> str:
    """The table of FinetuneConfig keys (dotted), defaults and help, as `--help` prints it."""
    from vegalm.config import field_help
    from vegalm.finetune.config import FinetuneConfig

    rows = field_help(FinetuneConfig, skip=("task", "model", "out"))
    width = max(len(k) + len(d) for k, d, _ in rows) + 3
    aliases = ", ".join(f"{k}={v}" for k, v in FinetuneConfig.KEY_ALIASES.items() if k != v.split(".")[-1])
    lines = ["settings (key=value; default in brackets):"]
    lines += [f"  {(k + (f' [{d}]' if d else '')).ljust(width)} {h}" for k, d, h in rows]
    lines += ["", "aliases: each train.<key> in the list above also as <key>= (lr=, seed=, ...); " + aliases]
    return "\n".join(lines)


def register(sub, formatter) -> None:
    p = sub.add_parser("finetune", help="fine-tune on one GLUE task", description=FINETUNE_DESC,
                       formatter_class=formatter, add_help=False)
    p.add_argument("-h", "--help", action=_HelpWithKeys, help="show this help and every settings key, then exit")
    p.add_argument("--task", required=True, help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli")
    p.add_argument("--model", required=True, help="model folder (config.json + weights + tokenizer), or minilm-l6")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--recipe", default=None, help="YAML file of FinetuneConfig keys (key=value overrides win)")
    p.add_argument("settings", nargs="*", metavar="key=value", help="FinetuneConfig overrides")
    p.set_defaults(func=_finetune)


def _settings(recipe: str | None, settings: list[str]) -> dict[str, Any]:
    data = load_yaml(recipe) if recipe else {}
    try:
        return apply_overrides(data, settings)
    except ConfigError as e:
        raise ConfigError(f"{recipe}: {e}" if recipe else str(e)) from None


def _finetune(args: argparse.Namespace) -> int:
    from vegalm.finetune.config import FinetuneConfig
    from vegalm.finetune.run import run_finetune

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
