"""The `vegalm` command line.

    vegalm run --recipe recipes/tiny.yaml --out runs/demo        # the whole recipe (make demo)
    vegalm tokenizer train --corpus '../shared/data/corpus/**/*.gz' --vocab-size 8000 --out runs/tok
    vegalm pretrain --recipe recipes/tiny.yaml --out runs/pt phase1.train.lr=5e-4
    vegalm finetune --task rte --model runs/pt/discriminator --out runs/ft-rte
    vegalm glue --model PATH --tasks cola,sst2,mrpc,stsb,rte,wnli,qnli --seeds 3 --out runs/glue
    vegalm ablate --model PATH --tasks rte,mrpc,stsb,cola --seeds 3 --tricks vanilla,adv,all --out runs/abl
    vegalm model-info --size vega-1.3b --world-size 8 --activation-checkpointing

Each area registers its own subcommands (a `register(subparsers)` function), so the
parser for a command lives next to the code it runs. User mistakes (`VegaError`) print
one line and exit 2; pass --debug for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from vegalm.errors import Interrupted, VegaError
from vegalm.workers import LOG_FORMAT

# Modules that add subcommands. A module that is missing (work in progress) is skipped.
AREAS = (
    "vegalm.data.cli",
    "vegalm.pretrain.cli",
    "vegalm.finetune.cli",
    "vegalm.experiments.cli",
    "vegalm.pipeline",
)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _model_info(args: argparse.Namespace) -> int:
    import torch

    from vegalm.model import VegaModel, config_for_size
    from vegalm.model.config import SIZES
    from vegalm.model.memory import estimate_memory, memory_table

    if args.size not in SIZES:
        raise VegaError(f"--size {args.size}: expected one of {', '.join(SIZES)}")
    cfg = config_for_size(args.size, vocab_size=args.vocab_size)
    est = estimate_memory(cfg, args.world_size, args.batch_size, args.seq_len, args.dtype,
                          args.activation_checkpointing, args.head)  # fmt: skip
    with torch.device("meta"):  # no memory is allocated: shapes only
        model = VegaModel(cfg, init=False)
    total = model.num_parameters()
    emb = total - model.num_parameters(exclude_embeddings=True)
    print(
        f"{args.size}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
        f"FFN {cfg.intermediate_size}, vocab {cfg.vocab_size}\n"
        f"  parameters: {total / 1e6:,.1f}M total = {(total - emb) / 1e6:,.1f}M non-embedding + {emb / 1e6:,.1f}M embedding\n"
        f"  training estimate: FSDP full sharding, AdamW, head {args.head}, {args.dtype}, local batch "
        f"{args.batch_size} x {args.seq_len} tokens\n{memory_table(est)}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vegalm", description=__doc__, formatter_class=_Formatter)
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "model-info",
        help="parameter count and memory per rank of a size recipe (built on the meta device)",
        description="Print the parameter count of a size recipe and an estimate of the training memory per rank "
        "under FSDP full sharding (docs/scaling.md), without allocating memory.\n\n"
        "example: vegalm model-info --size vega-1.3b --vocab-size 128100\n"
        "example: vegalm model-info --size vega-1.3b --world-size 8 --batch-size 8 --seq-len 512 --activation-checkpointing",
        formatter_class=_Formatter,
    )
    # no `choices`: the size table lives in vegalm.model, whose import pulls in torch (checked in _model_info)
    p.add_argument("--size", default="tiny", help="tiny, xsmall, small, base, large or vega-1.3b")
    p.add_argument("--vocab-size", type=int, default=128100)
    p.add_argument("--world-size", type=int, default=1, help="processes the model is sharded over (train.fsdp)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per process per micro-batch")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--dtype", default="bf16", help="compute dtype: bf16 or fp32 (train.mixed_precision)")
    p.add_argument("--activation-checkpointing", action="store_true", help="train.activation_checkpointing=true")
    p.add_argument("--head", default="rtd", help="none (bare encoder), mlm (generator) or rtd (discriminator)")
    p.set_defaults(func=_model_info)
    for name in AREAS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        mod.register(sub, _Formatter)
    _debug_everywhere(ap)
    return ap


def _debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept --debug after any subcommand too (SUPPRESS: an absent one keeps the top-level value)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "--debug" not in sub._option_string_actions:
                    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
                _debug_everywhere(sub)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except VegaError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Interrupted: the Trainer stopped at a step boundary and says how to resume
        print(e if isinstance(e, Interrupted) else "interrupted", file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 130


if __name__ == "__main__":
    sys.exit(main())
