"""Where a discriminator collapses: the mean pairwise cosine (and mean norm) of its vectors after each sublayer, over
the real tokens of the first 16 packed segments, and its logits on them (BENCHMARKS.md, "Discriminator collapse").

    python bench/probes/collapse.py --recipe recipes/tiny-4x128.yaml --run runs/t4 \
        --weights runs/t4/rtd/phase1/checkpoints/step-001794/model.safetensors

`--run` is the `vegalm run` folder holding data/ and tokenizer/ (a `vegalm pretrain` folder works too).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from vegalm.config import load_config
from vegalm.pretrain.health import TokenCosine
from vegalm.pretrain.rtd import build_pretrain_model
from vegalm.pretrain.run import RecipeConfig, _collate, prepare_data


def cosine(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean pairwise cosine, mean norm) of x's vectors at the real tokens."""
    tc = TokenCosine()
    tc.add(x, mask)
    return tc.value(), float(x.float()[mask.bool()].norm(dim=-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--run", required=True, help="folder with data/ and tokenizer/")
    ap.add_argument("--weights", required=True, help="a phase checkpoint's model.safetensors")
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(RecipeConfig, a.recipe, [])
    tok, _, store = prepare_data(cfg, Path(a.run), None, None, False)
    model_cfg = replace(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    special = (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)
    model = build_pretrain_model(model_cfg, cfg.phase1.objective, tok.mask_token_id, special)
    model.load_state_dict(load_file(a.weights))
    model.eval()
    batch = _collate([store[i] for i in range(16)])
    mask = batch["attention_mask"]
    rows: list[tuple[str, float, float]] = []

    def watch(module: torch.nn.Module, name: str) -> None:
        module.register_forward_hook(lambda m, args, out: rows.append((name, *cosine(out, mask))))

    for i, layer in enumerate(model.discriminator.deberta.encoder.layer):
        watch(layer.attention, f"layer {i}: attention + LN")
        watch(layer.output.dense, f"layer {i}: FFN output (before LN)")
        watch(layer, f"layer {i}: FFN + LN")
    with torch.no_grad():
        torch.manual_seed(0)
        out = model(input_ids=batch["input_ids"], attention_mask=mask)
        emb = model.discriminator.deberta.embeddings(batch["input_ids"], mask=mask)
    print(f"{'where':36s} {'cosine':>8s} {'norm':>8s}")
    for name, c, n in [("embeddings", *cosine(emb, mask)), *rows]:
        print(f"{name:36s} {c:8.3f} {n:8.1f}")
    real = mask.bool()
    logits, replaced = out["disc_logits"].float(), out["replaced"]
    print(f"logits {logits[real].mean():.4f} +- {logits[real].std():.4f}; replaced {logits[replaced].mean():.4f}, "
          f"original {logits[real & ~replaced].mean():.4f}")


if __name__ == "__main__":
    main()
