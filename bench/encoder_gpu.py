"""Training-step speed and peak memory on a GPU: vegalm's encoder (sdpa / flex kernels) vs transformers'
DebertaV2Model (eager, its only attention path), same weights, same run.

    python bench/encoder_gpu.py                      # base config, bf16 + fp32, S128 / S512 / S2048 (~1-2 min)
    python bench/encoder_gpu.py --flex --attn-dropout 0   # also FlexAttention (compiles per shape; it has
                                                          # no attention dropout, so every side runs without)
    python bench/encoder_gpu.py --device cpu --size tiny --repeats 1 --cases 2x64   # a smoke run on CPU
    python bench/encoder_gpu.py --packages flashdeberta,disentangled-flash --attn-dropout 0
                                                          # also the two PyPI DeBERTa kernels (below)

The PyPI packages are the issue's anchors, timed from the same weights: `flashdeberta` (FlashDebertaV2Model,
Triton; it has no attention dropout) and `disentangled-flash` (its `enable_deberta_training` swaps the encoder
of a copy of transformers' model: Triton on a GPU, its torch path on a CPU). The device machine has no network,
so their wheels travel (both are pure Python; the machine's torch, triton, transformers and einops are used):

    pip download --no-deps flashdeberta==0.0.8 disentangled-flash==1.1.1 -d .whl          # here (.whl/ is ignored)
    # there, carry [".whl"]:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site

A package that fails to import or to build is left out with its error printed, not timed in its place.
Before timing, every side's fp32 forward (eval, one padded batch) is compared with transformers': the JSON
line's `max_abs_diff_vs_hf` gives the largest difference over real tokens per side.

A step is forward + backward + AdamW. The base config is DeBERTa-v3-base's shape (hidden 768, 12 layers,
12 heads, FFN 3072, vocab 128k, 256 buckets, shared keys, dropout 0.1). The sides alternate step by step
so that clock changes hit all of them; each time is the median of `--repeats` steps after 2 warm-up steps,
with the device synchronised around each step. Peak memory is torch.cuda.max_memory_allocated() over
one step minus the memory allocated before it (weights, grads and Adam state excluded once warm), i.e.
activations and temporaries. `x HF` columns are ratios against transformers in the same run.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install

COMMON = dict(relative_attention=True, position_buckets=256, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
              share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
              max_position_embeddings=512)  # fmt: skip
SIZES = {
    "base": dict(vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, **COMMON),
    "tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128, **COMMON),
}  # fmt: skip


def build(size: str, device: str, impls: list[str], attn_dropout: float | None = None,
          packages: tuple[str, ...] = ()) -> dict[str, torch.nn.Module]:
    """{'hf': DebertaV2Model, 'ours-<impl>': VegaModel with that kernel, '<package>': that package's model}, all
    with the same random weights. `attn_dropout` replaces the attention-probability dropout (DebertaV2Config's
    0.1) on every side. A package that cannot be imported or built is left out, with its error printed."""
    from transformers import DebertaV2Config, DebertaV2Model

    from vegalm.model import VegaModel

    torch.manual_seed(0)
    extra = {} if attn_dropout is None else {"attention_probs_dropout_prob": attn_dropout}
    hf = DebertaV2Model(DebertaV2Config(**SIZES[size], **extra))
    models = {"hf": hf}
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        for impl in impls:
            ours = VegaModel.from_pretrained(d)
            for mod in ours.modules():
                if hasattr(mod, "impl"):
                    mod.impl = impl
            models[f"ours-{impl}"] = ours
        for pkg in packages:
            try:
                models[pkg] = PACKAGES[pkg](d, hf, device)
            except Exception as e:  # noqa: BLE001 - a missing or broken anchor is reported, the rest still run
                print(f"{pkg}: left out ({type(e).__name__}: {e})", flush=True)
    return {k: m.to(device).train() for k, m in models.items()}


def _flashdeberta(path: str, hf: torch.nn.Module, device: str) -> torch.nn.Module:
    from flashdeberta import FlashDebertaV2Model  # imports triton: absent on a CPU-only machine

    return FlashDebertaV2Model.from_pretrained(path)


def _disentangled_flash(path: str, hf: torch.nn.Module, device: str) -> torch.nn.Module:
    import copy

    from disentangled_flash import DebertaV2OptimizedEncoder, enable_deberta_training

    backend = "triton" if device == "cuda" else "torch"  # its torch path is the one a CPU can run
    model = enable_deberta_training(copy.deepcopy(hf).to(device), backend=backend)
    if not isinstance(model.encoder, DebertaV2OptimizedEncoder):  # it keeps transformers' encoder when Triton
        raise RuntimeError(f"backend {backend!r} kept transformers' encoder (Triton missing or shape unsupported)")
    return model


PACKAGES = {"flashdeberta": _flashdeberta, "disentangled-flash": _disentangled_flash}
NO_ATTN_DROPOUT = ("flashdeberta",)  # packages whose attention has no dropout: every side must then run without


@torch.no_grad()
def max_abs_diff_vs_hf(models: dict, device: str, size: str) -> dict[str, float]:
    """Each side's largest |last_hidden_state - transformers'| over the real tokens of one padded fp32 batch
    (None where that side's fp32 forward failed)."""
    g = torch.Generator().manual_seed(2)
    vocab = SIZES[size]["vocab_size"]
    ids = torch.randint(5, vocab, (2, 48), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # one padded row: the varlen paths are compared too
    outs, real = {}, mask.bool()
    for name, m in models.items():
        was = m.training
        try:
            outs[name] = m.eval()(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        except Exception as e:  # noqa: BLE001 - e.g. a kernel without fp32: said, and null in the JSON line
            if name == "hf":  # the reference itself
                raise
            print(f"{name}: fp32 forward failed ({type(e).__name__}: {e})", flush=True)
        m.train(was)
    return {n: float((outs[n] - outs["hf"])[real].abs().max()) if n in outs else None
            for n in models if n != "hf"}


def make_step(model, B: int, L: int, dtype: str, device: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (B, L), generator=g).to(device)
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    amp = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def step():
        with amp:
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        h.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(models: dict, B: int, L: int, dtype: str, device: str, repeats: int, warmup: int = 2) -> dict:
    """name -> {"s": median step seconds, "mem_mb": peak extra memory of one step (CUDA only)}."""
    steps = {n: make_step(m, B, L, dtype, device) for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    mem: dict[str, float | None] = {n: None for n in models}
    for i in range(warmup + repeats):
        for name, step in list(steps.items()):
            _sync(device)
            if device == "cuda" and i == warmup:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t = time.perf_counter()
            try:
                step()
            except Exception as e:  # noqa: BLE001 - an anchor failing one case (dtype, length) skips that case
                if name == "hf":
                    raise
                print(f"{name} B{B}xS{L} {dtype}: failed ({type(e).__name__}: {e})", flush=True)
                del steps[name], times[name]
                continue
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
            if device == "cuda" and i == warmup:
                mem[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {n: {"s": statistics.median(times[n]), "mem_mb": mem[n]} if n in times else {"s": None, "mem_mb": None}
            for n in models}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="base", choices=sorted(SIZES))
    ap.add_argument("--cases", default="32x128,8x512,2x2048", help="BxL,... (batch x sequence length)")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--flex", action="store_true", help="also time the FlexAttention kernel (compiles per shape; "
                    "needs --attn-dropout 0)")
    ap.add_argument("--attn-dropout", type=float, default=None,
                    help="attention-probability dropout for every side (default: DebertaV2Config's 0.1)")
    ap.add_argument("--packages", default="", help=f"comma-separated PyPI anchors to time too: {', '.join(PACKAGES)}")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    packages = tuple(p for p in args.packages.split(",") if p)
    if unknown := [p for p in packages if p not in PACKAGES]:
        ap.error(f"--packages: unknown {', '.join(unknown)} (known: {', '.join(PACKAGES)})")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device (use --device cpu for a smoke run)")
    # a training step of `flex` with attention dropout runs `sdpa` (model/attention.py): its column would time sdpa
    # twice (the first GPU run, before this check, did exactly that); flashdeberta's kernel has no dropout either
    no_dropout = (["--flex"] if args.flex else []) + [f"--packages {p}" for p in packages if p in NO_ATTN_DROPOUT]
    if no_dropout and (args.attn_dropout is None or args.attn_dropout > 0):
        ap.error(f"{', '.join(no_dropout)}: no attention dropout in that kernel (flex falls back to sdpa with it); "
                 "add --attn-dropout 0 (applied to every side, transformers' too)")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    impls = ["sdpa"] + (["flex"] if args.flex else [])
    models = build(args.size, args.device, impls, args.attn_dropout, packages)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    drop = "default" if args.attn_dropout is None else args.attn_dropout
    diff = max_abs_diff_vs_hf(models, args.device, args.size)
    print(f"{name}, torch {torch.__version__}, size {args.size}, attention dropout {drop}, "
          f"median of {args.repeats} steps; fp32 max |diff| vs transformers: "
          + ", ".join(f"{n} {'failed' if v is None else f'{v:.1e}'}" for n, v in diff.items()))
    labels = ([f"{n} ms" for n in models] + [f"{n} x HF" for n in models if n != "hf"]
              + [f"{n} MB" for n in models])  # fmt: skip
    widths = [max(16, len(x) + 2) for x in labels]
    print(f"{'case':<12}{'dtype':<6}" + "".join(f"{x:>{w}}" for x, w in zip(labels, widths)))
    rows = []
    for dtype in args.dtypes.split(","):
        for case in args.cases.split(","):
            B, L = (int(x) for x in case.split("x"))
            r = measure(models, B, L, dtype, args.device, args.repeats)
            row = {"case": f"B{B}xS{L}", "dtype": dtype}
            ratio = {n: None if v["s"] is None else r["hf"]["s"] / v["s"] for n, v in r.items()}  # None: failed
            for n, v in r.items():
                row[f"{n}_ms"] = None if v["s"] is None else round(v["s"] * 1e3, 2)
                if n != "hf":
                    row[f"{n}_speedup"] = None if ratio[n] is None else round(ratio[n], 3)
                row[f"{n}_mem_mb"] = round(v["mem_mb"], 1) if v["mem_mb"] is not None else None
            rows.append(row)
            cells = ([(None if v["s"] is None else v["s"] * 1e3, ".1f", "") for v in r.values()]
                     + [(ratio[n], ".2f", "x") for n in r if n != "hf"]
                     + [(v["mem_mb"], ".0f", "") for v in r.values()])  # fmt: skip
            text = ["-" if x is None else format(x, f) + end for x, f, end in cells]
            print(f"B{B}xS{L:<8}{dtype:<6}" + "".join(f"{t:>{w}}" for t, w in zip(text, widths)), flush=True)
    print(json.dumps({"device": name, "size": args.size, "repeats": args.repeats, "attn_dropout": args.attn_dropout,
                      "max_abs_diff_vs_hf": diff, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
