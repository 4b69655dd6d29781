"""A tiny end-to-end run of vegalm's Trainer, for the tests (run directly, under torchrun, or imported).

    python tests/_tiny_train.py --out /tmp/run --steps 20 --save-every 5
    python tests/_tiny_train.py --out /tmp/run --steps 20 --save-every 5 --resume
    torchrun --nproc_per_node 2 tests/_tiny_train.py --out /tmp/ddp --steps 10 --batch-size 8 --dropout 0
    torchrun --nproc_per_node 2 tests/_tiny_train.py --out /tmp/fsdp --steps 10 --batch-size 8 --dropout 0 --fsdp
    python tests/_tiny_train.py --serve      # fork server for many short runs (see `serve`)

Model: token embedding -> 2 residual MLP blocks (Linear, GELU, Dropout, LayerNorm) -> mean pool -> linear
head; names `embeddings.*`, `layers.N.*`, `head.*` as in a real encoder. Data: sequences of 8 tokens
drawn from a per-index seeded generator; the label says whether token 3 appears (a learnable task).
The last stdout line is a JSON summary (main process only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

SEQ, VOCAB, DIM = 8, 16, 16


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 256):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + i)
        ids = torch.randint(1, VOCAB, (SEQ,), generator=g)
        return {"input_ids": ids, "label": (ids == 3).any().long()}


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class Block(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(nn.functional.gelu(self.fc(x))))


class TinyModel(nn.Module):
    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block(DIM, dropout) for _ in range(2)])
        self.head = nn.Linear(DIM, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(dim=1))


def make_objective(nan_at: set[int], trainer_ref: dict, step_sleep: float = 0.0):
    """Cross-entropy; returns NaN on the (1-based) steps in `nan_at`."""

    def objective(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch["input_ids"])
        loss = nn.functional.cross_entropy(logits.float(), batch["label"])
        acc = (logits.argmax(-1) == batch["label"]).float().mean().item()
        if nan_at and trainer_ref["trainer"].step + 1 in nan_at:
            loss = loss * float("nan")
        if step_sleep:
            time.sleep(step_sleep)
        return loss, {"accuracy": acc, "tokens": float(batch["input_ids"].numel())}

    return objective


class StopAfter:
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step: int) -> None:
        if step >= self.step:
            trainer.should_stop = True


class SignalAt:
    """Sends SIGTERM to this process at the end of a step, on one rank only (the others must follow it)."""

    def __init__(self, spec: str):
        step, _, rank = spec.partition(":")
        self.step, self.rank = int(step), int(rank or 0)

    def on_step_end(self, trainer, step: int) -> None:
        if step == self.step and trainer.accelerator.process_index == self.rank:
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


def build(args: argparse.Namespace):
    from vegalm.train.trainer import TrainConfig, Trainer

    torch.manual_seed(args.seed)  # model init
    model = TinyModel(dropout=args.dropout)
    cfg = TrainConfig(
        lr=args.lr, max_steps=args.steps, warmup_steps=2, batch_size=args.batch_size, grad_accum=args.grad_accum,
        seed=args.seed, log_every=args.log_every, save_every=args.save_every, keep_last=args.keep_last,
        max_bad_steps=args.max_bad_steps, progress=False, fsdp=args.fsdp, mixed_precision=args.mixed_precision,
        activation_checkpointing=args.activation_checkpointing,
    )
    ref: dict = {}
    objective = make_objective({int(s) for s in args.nan_at.split(",") if s}, ref, args.step_sleep)
    callbacks = [StopAfter(args.stop_after)] if args.stop_after else []
    callbacks += [SignalAt(args.signal_at)] if args.signal_at else []
    trainer = Trainer(model, objective, TinyDataset(args.n_samples), collate, cfg, args.out, callbacks=callbacks)
    ref["trainer"] = trainer
    return trainer


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--nan-at", default="", help="comma-separated 1-based steps whose loss is NaN")
    p.add_argument("--max-bad-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--n-samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-after", type=int, default=0, help="stop cleanly (with a checkpoint) after this step")
    p.add_argument("--signal-at", default="", help="STEP[:RANK]: that rank sends itself SIGTERM after STEP")
    p.add_argument("--fsdp", action="store_true", help="train.fsdp=true (under torchrun)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds per micro-batch (widens kill windows)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)  # the test machine's cores are shared
    args = parse(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    trainer = build(args)
    if trainer.is_main:
        print("TRAINING_STARTED", flush=True)
    from vegalm.errors import Interrupted

    try:
        summary = trainer.train(resume=args.resume)
    except Interrupted as e:  # as the vegalm CLI reports it
        print(e, file=sys.stderr, flush=True)
        return e.exit_code
    if trainer.is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "metrics"}), flush=True)
    return 0


def serve() -> int:
    """`--serve`: a fork server, so a test can start many short runs without paying ~3 s of imports each.

    Reads commands from stdin, one per line, and answers one line each:
      run <json argv> <json env>  -> forks a child that sets env, sends stdout/stderr to <--out>.log and runs
                                     main(argv); answers the child's pid
      wait <pid>                  -> waits for it; answers its status (exit code, or -signal if killed)
    Each child is a separate process (kill -9 kills only it) that imported everything but never trained.
    """
    torch.set_num_threads(1)
    import accelerate  # noqa: F401  (warm the imports the children need)
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    import vegalm.train.trainer  # noqa: F401

    torch.optim.AdamW([nn.Parameter(torch.zeros(1))], fused=True)  # first optimizer imports torch._dynamo
    print("READY", flush=True)
    for line in sys.stdin:
        cmd, _, rest = line.strip().partition(" ")
        if cmd == "run":
            argv_json, env_json = rest.split("\t")
            argv, env = json.loads(argv_json), json.loads(env_json)
            pid = os.fork()
            if pid == 0:
                os.environ.update(env)
                log = os.open(argv[argv.index("--out") + 1] + ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(log, 1)
                os.dup2(log, 2)
                try:
                    code = main(argv)
                except BaseException:  # noqa: BLE001  (report any failure through the exit status)
                    import traceback

                    traceback.print_exc()
                    code = 1
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            print(pid, flush=True)
        elif cmd == "wait":
            _, status = os.waitpid(int(rest), 0)
            print(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main())
