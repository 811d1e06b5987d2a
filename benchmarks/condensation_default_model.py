"""Condensation on the shipped default model (CPU): top-k mass, perplexity and Top-θ pruning before and after a
short regularized fine-tune, next to the same fine-tune without the regularizer (λ = 0) as the control.

Writes ``benchmarks/results/condensation_default_model.json``. Run from anywhere:
``python benchmarks/condensation_default_model.py [--steps 60] [--lam 0.5] [--k 16]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def topk_mass(model, windows: torch.Tensor, k: int, dense_layers) -> float:
    """Mean top-k attention mass of the non-dense layers over ``windows`` (training mode, no dropout in the model)."""
    import sparse_attention as sa

    was = model.training
    model.train()
    total, rows = 0.0, 0
    with sa.condensation(model, k=k, lam=0.0, dense_layers=dense_layers) as reg:
        for batch in windows.split(4):
            model(input_ids=batch)
            total += reg.topk_mass * reg.rows
            rows += reg.rows
    model.train(was)
    return total / rows


def snapshot(model, heldout, calibration, k, dense_layers) -> dict:
    from sparse_attention.recipes.evaluation import compare

    rec = {"topk_mass": topk_mass(model, heldout, k, dense_layers)}
    records = compare(model, heldout, calibration, ks=(k,), dense_layers=dense_layers, new_tokens=16, progress=False)
    for r in records:
        for name in ("perplexity", "accuracy", "kept_fraction_pruned_layers", "kept_v_fraction_pruned_layers"):
            rec[f"{r['method']}_{name}"] = r[name]
    return rec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "condensation_default_model.json")
    args = parser.parse_args()

    import transformers
    import triton

    from sparse_attention import finetune, load_default_model, load_default_tokenizer, stdlib_texts, token_windows

    torch.manual_seed(0)
    tok = load_default_tokenizer()
    heldout = token_windows(tok, stdlib_texts("heldout"), args.seq_len, args.windows)
    calibration = token_windows(tok, stdlib_texts("calibration"), args.seq_len, args.windows)
    train_texts = stdlib_texts("train")
    dense_layers = (0, 1)
    runs = {"before": snapshot(load_default_model(), heldout, calibration, args.k, dense_layers)}
    for name, lam in (("control_lam0", 0.0), ("regularized", args.lam)):
        model = load_default_model()
        start = time.perf_counter()
        history = finetune(
            model, tok, train_texts, k=args.k, lam=lam, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
            seq_len=args.seq_len, dense_layers=dense_layers, progress=False,
        )  # fmt: skip
        model.eval()
        runs[name] = {
            "lam": lam,
            "train_seconds": time.perf_counter() - start,
            "final_lm_loss": history[-1].lm_loss,
            "train_topk_mass_last": history[-1].topk_mass,
            **snapshot(model, heldout, calibration, args.k, dense_layers),
        }
        print(name, json.dumps(runs[name]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent).stdout
    result = {
        "kind": "condensation",
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "commit": commit.strip() or "unknown",
        "command": " ".join(["python", *sys.argv]),
        "model": "shipped default (sparse_attention/assets/default)",
        "k": args.k,
        "steps": args.steps,
        "lr": args.lr,
        "batch": [args.batch_size, args.seq_len],
        "heldout_windows": list(heldout.shape),
        "dense_layers": list(dense_layers),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
