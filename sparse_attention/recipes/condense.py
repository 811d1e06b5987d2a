"""The shipped condensed model: the default model fine-tuned so that its attention condenses onto few keys.

Reproduces ``sparse_attention/assets/condensed/`` from the shipped default model. One fine-tune
(:func:`sparse_attention.finetune`) minimises ``(1 - α) · LM loss + α · KL(original ‖ model) + λ · R``: R, the
condensation regularizer of the pruned layers, pushes every attention row's mass onto its top k keys; the
distillation term KL, against the frozen default model's next-token distribution, holds the model to the original's
predictions, which is what a pruned model is measured against. Then the held-out perplexity is measured as for the
default model, and the checkpoint, its tokenizer, ``train_log.json`` and ``MODEL_CARD.md`` are written as one folder.

Every default is the recipe of the shipped checkpoint (:data:`RECIPE`); its MODEL_CARD.md records the command::

    python -m sparse_attention.recipes.condense --out sparse_attention/assets/condensed
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import data

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "condensed"
# The default model's tokenizer, which the condensed model shares.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Recipe:
    """Settings of one condensation fine-tune of the default model (arguments of :func:`sparse_attention.finetune`).

    Attributes:
        lam: regularizer weight λ. k: the regularizer's top-k. distill: weight α of the distillation term.
        steps, lr, batch_size, seq_len: optimizer steps, AdamW learning rate (constant), windows per step and tokens
            per window. warmup: steps over which λ ramps up. kind: ``"logmass"`` or ``"mass"``. seed: window sampling.
        dense_layers: layers neither regularized nor pruned (Top-θ's default dense layers).
    """

    lam: float = 0.3
    k: int = 2
    distill: float = 0.5
    steps: int = 300
    lr: float = 2e-4
    batch_size: int = 8
    seq_len: int = 256
    warmup: int = 20
    kind: str = "logmass"
    seed: int = 0
    dense_layers: tuple[int, ...] = (0, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "dense_layers": list(self.dense_layers)}


RECIPE = Recipe()
"""The recipe of the shipped condensed checkpoint."""


def train_condensed(recipe: Recipe, model, tokenizer, train_stream, *, device=None, progress=True, log=None):
    """Fine-tune ``model`` (the default model) in place by ``recipe``; returns ``(history, wall seconds)``.

    The teacher of the distillation term is a frozen copy of ``model`` as it is on entry.
    """
    from .training import finetune

    start = time.perf_counter()
    history = finetune(
        model, tokenizer, train_stream, k=recipe.k, lam=recipe.lam, steps=recipe.steps, lr=recipe.lr,
        batch_size=recipe.batch_size, seq_len=recipe.seq_len, kind=recipe.kind, dense_layers=recipe.dense_layers,
        warmup=recipe.warmup, device=device, seed=recipe.seed, progress=progress, log=log, distill=recipe.distill,
    )  # fmt: skip
    model.eval()
    return history, time.perf_counter() - start


def heldout_topk_mass(model, windows, k: int, dense_layers, batch_size: int = 4) -> float:
    """Mean top-k softmax mass of the rows longer than k in the non-dense layers, over ``windows`` (no gradients)."""
    import torch

    from ..hf.condensation import condensation

    was = model.training
    model.train()  # the regularizer records training-mode forwards only; the shipped models have no dropout
    total, rows = 0.0, 0
    try:
        with condensation(model, k=k, lam=0.0, dense_layers=dense_layers) as reg, torch.no_grad():
            for batch in windows.split(batch_size):
                model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
                total += reg.topk_mass * reg.rows
                rows += reg.rows
    finally:
        model.train(was)
    return total / rows if rows else math.nan


def summarize(history) -> dict:
    """First and last ten steps' means of the logged losses and mass, and the total step time."""

    def mean(steps, field):
        values = [getattr(s, field) for s in steps if getattr(s, field) is not None]
        return sum(values) / len(values) if values else None

    first, last = history[:10], history[-10:]
    return {
        **{f"first10_{f}": mean(first, f) for f in ("lm_loss", "kl", "reg_loss", "topk_mass")},
        **{f"last10_{f}": mean(last, f) for f in ("lm_loss", "kl", "reg_loss", "topk_mass")},
        "step_seconds": sum(s.seconds for s in history),
    }


def write_model_card(folder: Path, facts: dict) -> None:
    """``MODEL_CARD.md`` of a condensed checkpoint from the collected facts."""
    f, r = facts, facts["recipe"]
    text = f"""# sparse-attention condensed model

The shipped default model (`sparse_attention/assets/default`, see its MODEL_CARD.md) fine-tuned so that the
attention of its pruned layers condenses onto a few keys per row, shipped so that the demo and the sweep can show
what condensation buys: how much less attention work Top-θ keeps for the same perplexity.
Load it with `sparse_attention.load_condensed_model()`; its tokenizer is the default model's.
Architecture, vocabulary and tokenizer are the default model's, unchanged.

## Recipe

One fine-tune (`sparse_attention.finetune`) of the default model minimising
`(1 - α) · LM loss + α · KL(default model ‖ this model) + λ · R`:

- R: the condensation regularizer (`{r["kind"]}`, mean `-log` of the top-k softmax mass of each attention row with
  more than k keys), on layers {f["regularized_layers"]} (layers {r["dense_layers"]} stay dense under Top-θ and are not
  regularized); k = {r["k"]}, λ = {r["lam"]}, ramped up linearly over the first {r["warmup"]} steps
- KL: distillation to the frozen default model's next-token distribution on the same windows, weight
  α = {r["distill"]}
- AdamW, constant lr {r["lr"]}, no weight decay, gradient clipping at 1.0
- Steps: {r["steps"]}, batch {r["batch_size"]} random windows of {r["seq_len"]} tokens of the standard library's train
  split; tokens seen: {f["tokens_seen"]:,}; window sampling seed {r["seed"]}
- Training wall time: {f["train_seconds"]:.0f} s ({f["train_seconds"] / 60:.1f} min) on {f["device"]}
  (the 2-core machine was shared with other jobs); torch {f["torch"]}, transformers {f["transformers"]}
- Last 10 steps (means): LM loss {f["train"]["last10_lm_loss"]:.4f}, KL {_fmt(f["train"]["last10_kl"])},
  R {f["train"]["last10_reg_loss"]:.4f}, top-{r["k"]} mass {f["train"]["last10_topk_mass"]:.4f}
- Date: {f["date"]}; commit {f["commit"]}
- Command (from the repository root):

```
{f["command"]}
```

## Evaluation

Held-out perplexity (dense attention): {f["heldout_ppl"]:.3f}; the default model's, measured the same way: \
{f["original_heldout_ppl"]:.3f}.

Measured on {f["eval_windows"]} consecutive non-overlapping windows of {f["eval_context"]} tokens of the heldout split
({f["eval_tokens"]:,} predicted tokens), as on the default model's card.
Mean top-{r["k"]} attention mass of layers {f["regularized_layers"]} on {f["mass_windows"]} held-out windows of
{f["eval_context"]} tokens: {f["heldout_topk_mass"]:.3f} (the default model: {f["original_heldout_topk_mass"]:.3f}).
What Top-θ keeps at a perplexity budget is in `benchmarks/results/` (the sweep) and the README.
"""
    (folder / "MODEL_CARD.md").write_text(text, encoding="utf-8")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; every default is the recipe of the shipped checkpoint."""
    d = RECIPE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lam", type=float, default=d.lam, help="regularizer weight λ")
    parser.add_argument("--k", type=int, default=d.k, help="top-k of the regularizer")
    parser.add_argument("--distill", type=float, default=d.distill, help="weight α of the distillation term")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--warmup", type=int, default=d.warmup, help="steps of linear warm-up of λ")
    parser.add_argument("--kind", choices=("logmass", "mass"), default=d.kind)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint folder (replaced as a whole)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def recipe_of(args: argparse.Namespace) -> Recipe:
    return replace(
        RECIPE, lam=args.lam, k=args.k, distill=args.distill, steps=args.steps, lr=args.lr,
        batch_size=args.batch_size, seq_len=args.seq_len, warmup=args.warmup, kind=args.kind, seed=args.seed,
    )  # fmt: skip


def is_condensed_checkpoint(path: Path) -> bool:
    """Whether a folder is one this recipe wrote (a checkpoint with its model card), which it may replace."""
    return (path / "config.json").is_file() and (path / "MODEL_CARD.md").is_file()


def save_checkpoint(out: Path, model, tokenizer_dir: Path, facts: dict, history, overwrite: bool = False) -> Path:
    """Write the model, the tokenizer files of ``tokenizer_dir``, ``train_log.json`` and ``MODEL_CARD.md`` as one
    folder (atomic swap). The tokenizer files are copied, not saved again: another transformers version would write
    other bytes for the same tokenizer."""
    import shutil

    from ..ops.files import check_target, write_folder

    check_target(out, folder=True, ours=is_condensed_checkpoint, what="condensed checkpoint", overwrite=overwrite)

    def write(folder: Path) -> None:
        model.to("cpu").save_pretrained(folder, safe_serialization=True)
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / name, folder / name)
        log = {**facts, "steps": [s.to_dict() for s in history]}
        (folder / "train_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
        write_model_card(folder, facts)

    return write_folder(out, write)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    from ..ops.files import check_target
    from .default_model import DEFAULT_MODEL_DIR, load_default_model, load_default_tokenizer
    from .pretrain import device_description, heldout_perplexity
    from .report import git_commit

    torch.set_num_threads(args.threads)
    recipe = recipe_of(args)
    check_target(args.out, folder=True, ours=is_condensed_checkpoint, what="condensed checkpoint",
                 overwrite=args.overwrite)  # fmt: skip
    device = torch.device(args.device)
    tokenizer = load_default_tokenizer()
    model = load_default_model(attn_implementation="sdpa", device=device)
    streams = {split: data.token_stream(tokenizer, data.stdlib_texts(split)) for split in ("train", "heldout")}
    mass_windows = data.token_windows(tokenizer, data.stdlib_texts("heldout"), 512, 16)
    regularized = [i for i in range(model.config.num_hidden_layers) if i not in recipe.dense_layers]
    original_mass = heldout_topk_mass(model, mass_windows, recipe.k, recipe.dense_layers)
    original_ppl, _ = heldout_perplexity(model, streams["heldout"], 512, 0, device)
    every = max(1, recipe.steps // 15)

    def log(entry) -> None:
        if entry.step % every == 0 or entry.step == recipe.steps - 1:
            print(entry, flush=True)

    history, seconds = train_condensed(
        recipe, model, tokenizer, streams["train"], device=device, progress=not args.quiet, log=log
    )
    ppl, eval_tokens = heldout_perplexity(model, streams["heldout"], 512, 0, device)
    command = shlex.join(
        ["python", "-m", "sparse_attention.recipes.condense", *(sys.argv[1:] if argv is None else argv)]
    )
    facts = {
        "recipe": recipe.to_dict(),
        "base_model": str(DEFAULT_MODEL_DIR.name),
        "regularized_layers": regularized,
        "tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
        "train_seconds": seconds,
        "device": device_description(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "train": summarize(history),
        "heldout_ppl": ppl,
        "original_heldout_ppl": original_ppl,
        "eval_windows": eval_tokens // 511,
        "eval_context": 512,
        "eval_tokens": eval_tokens,
        "mass_windows": int(mass_windows.shape[0]),
        "heldout_topk_mass": heldout_topk_mass(model, mass_windows, recipe.k, recipe.dense_layers),
        "original_heldout_topk_mass": original_mass,
    }
    path = save_checkpoint(args.out, model, DEFAULT_MODEL_DIR, facts, history, overwrite=True)
    print(json.dumps({k: facts[k] for k in ("train_seconds", "heldout_ppl", "original_heldout_ppl",
                                            "heldout_topk_mass", "original_heldout_topk_mass")}))  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
