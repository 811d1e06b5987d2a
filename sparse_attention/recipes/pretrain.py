"""Train the package's default model: a small GPT-2 on the Python standard library.

Reproduces ``sparse_attention/assets/default/`` from a seed. Steps:

1. train a byte-level BPE tokenizer on the "train" split of the running interpreter's stdlib
   (``sparse_attention.recipes.data``), with ``<|endoftext|>`` as the only special token (eos, bos and pad);
2. train a ``GPT2LMHeadModel`` from scratch on random windows of the tokenized train split with AdamW,
   linear warmup and cosine decay;
3. measure the perplexity on fixed, non-overlapping windows of the "heldout" split;
4. save the model (safetensors), the tokenizer (``PreTrainedTokenizerFast`` files) and ``MODEL_CARD.md`` into a
   folder that replaces ``--out`` as a whole (``sparse_attention.ops.files``); an ``--out`` this package did not
   write is refused before training unless ``--overwrite`` is given.

Every random choice (tokenizer training is deterministic, weight init, window sampling) derives from
``--seed``. Results are bitwise reproducible for a given torch build, CPU and ``--threads``; a different
machine gives a statistically equivalent model.

Example (the command that produced the shipped checkpoint is recorded in its MODEL_CARD.md; it was run when this
module lived at ``benchmarks/train_default_model.py``, with the same code)::

    python -m sparse_attention.recipes.pretrain --seed 0 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from ..ops.files import TargetError, check_target, is_checkpoint_folder, write_folder
from . import data

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "default"
EOS_TOKEN = "<|endoftext|>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; every default is the setting used for the shipped checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed for weight init and window sampling")
    parser.add_argument("--steps", type=int, default=550, help="optimizer steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (replaced as a whole)")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out folder this package did not write")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and the tokenizer")
    parser.add_argument("--device", default="cpu", help="torch device to train on")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size incl. special token")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-positions", type=int, default=512, help="longest sequence the model accepts")
    parser.add_argument("--context", type=int, default=512, help="training window length in tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    parser.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on weight matrices")
    parser.add_argument("--eval-context", type=int, default=512, help="held-out window length")
    parser.add_argument("--eval-windows", type=int, default=0, help="held-out windows to score (0 = all)")
    parser.add_argument("--log-every", type=int, default=50, help="print the running loss every N steps")
    args = parser.parse_args(argv)
    if args.context > args.n_positions or args.eval_context > args.n_positions:
        parser.error("--context and --eval-context must not exceed --n-positions")
    if args.n_embd % args.n_head:
        parser.error("--n-embd must be a multiple of --n-head")
    # Before the long job: an output folder that cannot or must not be replaced.
    try:
        check_target(args.out, folder=True, ours=is_checkpoint_folder, what="checkpoint", overwrite=args.overwrite)
    except TargetError as exc:
        parser.error(str(exc))
    return args


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int):
    """Train a byte-level BPE on ``texts``; return a ``PreTrainedTokenizerFast`` using ``<|endoftext|>``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    # No prefix space: code is whitespace-sensitive and decode(encode(x)) must give x back exactly.
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN], show_progress=False
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup, then cosine to the floor."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.lr * args.min_lr_ratio
    return floor + 0.5 * (args.lr - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def heldout_perplexity(model, stream, context: int, max_windows: int, device) -> tuple[float, int]:
    """Perplexity on consecutive non-overlapping windows of ``stream``; returns (ppl, tokens scored)."""
    import torch

    windows = stream[: (len(stream) // context) * context].view(-1, context)
    if max_windows:
        windows = windows[:max_windows]
    total_loss, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(windows), 8):
            batch = windows[start : start + 8].to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_loss += loss.item()
            total_tokens += batch[:, 1:].numel()
    return math.exp(total_loss / total_tokens), total_tokens


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({_cpu_name()}), {torch.get_num_threads()} thread(s)"


def write_model_card(out: Path, facts: dict) -> None:
    """Write ``MODEL_CARD.md`` from the collected training facts."""
    f = facts
    text = f"""# sparse-attention default model

A small GPT-2 (`transformers.GPT2LMHeadModel`) trained from scratch on the Python standard library, shipped
with `sparse_attention` so that calibration, tests and examples run with no download.
Load it with `sparse_attention.load_default_model()` and `sparse_attention.load_default_tokenizer()`.
It is a test and demonstration model, not a useful code assistant.

## Architecture

- GPT-2, {f["n_layer"]} layers, {f["n_head"]} heads, hidden size {f["n_embd"]} (head dim {f["head_dim"]}),
  MLP {4 * f["n_embd"]}, context (`n_positions`) {f["n_positions"]}, tied input/output embeddings, no dropout
- Parameters: {f["params"]:,} ({f["params"] / 1e6:.2f} M), stored as float32 safetensors
- Tokenizer: byte-level BPE, vocabulary {f["vocab_size"]} including the single special token `{EOS_TOKEN}`
  (used as eos, bos and pad), no prefix space, so `decode(encode(text)) == text`

## Data

The `*.py` modules of the CPython {f["python"]} standard library of the training interpreter (tests,
`site-packages`, `pydoc_data` and build config excluded), split by module with a SHA-1 hash of the relative
path (`sparse_attention.recipes.data`): train {f["files"]["train"]} files / {f["tokens"]["train"]:,} tokens,
calibration {f["files"]["calibration"]} files / {f["tokens"]["calibration"]:,} tokens,
heldout {f["files"]["heldout"]} files / {f["tokens"]["heldout"]:,} tokens.
Documents are joined with `{EOS_TOKEN}`. The standard library is under the Python Software Foundation License.

## Training

- Seed: {f["seed"]}
- Steps: {f["steps"]}, batch {f["batch_size"]} random windows of {f["context"]} tokens
- Tokens seen: {f["tokens_seen"]:,} ({f["epochs"]:.2f} passes over the train split)
- Optimizer: AdamW (betas 0.9/0.95, weight decay {f["weight_decay"]} on weight matrices), peak lr {f["lr"]},
  {f["warmup"]} warmup steps, cosine decay to {f["min_lr_ratio"]} x peak, gradient clipping at 1.0
- Final training loss (mean of the last {f["last_n"]} steps): {f["final_train_loss"]:.4f}
- Training wall time: {f["train_seconds"]:.0f} s ({f["train_seconds"] / 60:.1f} min) for the optimizer steps;
  {f["total_seconds"]:.0f} s for the whole script (tokenizer, tokenization, training, evaluation)
- Training CPU time: {f["train_cpu_seconds"]:.0f} s for the optimizer steps (process CPU time; the wall time
  exceeds it when other jobs share the machine)
- Device: {f["device"]}; torch {f["torch"]}, transformers {f["transformers"]}, tokenizers {f["tokenizers"]}
- Date: {f["date"]}
- Command (from the repository root):

```
{f["command"]}
```

## Evaluation

Held-out perplexity: {f["heldout_ppl"]:.3f}

Measured on {f["eval_windows"]} consecutive non-overlapping windows of {f["eval_context"]} tokens of the heldout split
({f["eval_tokens"]:,} predicted tokens), i.e. exp of the mean next-token cross-entropy in nats. For scale, a
uniform guess over the vocabulary has perplexity {f["vocab_size"]}.
"""
    (out / "MODEL_CARD.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Run the whole pipeline; returns the process exit code."""
    args = parse_args(argv)
    script_start = time.perf_counter()
    # Both must be set before tokenizers and torch spin up their thread pools.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if args.threads > 1 else "false")

    import tokenizers
    import torch
    import transformers
    from tqdm import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    texts = {split: data.stdlib_texts(split) for split in data.SPLITS}
    print(f"stdlib {data.stdlib_root()}: " + ", ".join(f"{s} {len(t)} files" for s, t in texts.items()), flush=True)

    tokenizer = train_tokenizer(texts["train"], args.vocab_size, args.n_positions)
    streams = {split: data.token_stream(tokenizer, split_texts) for split, split_texts in texts.items()}
    print(
        f"tokenizer: vocab {len(tokenizer)}; tokens " + ", ".join(f"{s} {len(t):,}" for s, t in streams.items()),
        flush=True,
    )

    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=args.n_positions,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        # Less than two passes over the data: dropout would only slow learning down.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "wpe" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    train = streams["train"]
    sampler = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.context, dtype=torch.long)
    losses: list[float] = []
    model.train()
    train_start = time.perf_counter()
    train_cpu_start = time.process_time()
    progress = tqdm(range(args.steps), desc="train", dynamic_ncols=True, mininterval=5.0)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        starts = torch.randint(0, len(train) - args.context, (args.batch_size, 1), generator=sampler)
        batch = train[starts + offsets].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recent = losses[-args.log_every :]
            elapsed = time.perf_counter() - train_start
            tqdm.write(
                f"step {step + 1}/{args.steps} loss {sum(recent) / len(recent):.4f} "
                f"lr {lr_at(step, args):.2e} elapsed {elapsed:.0f}s"
            )
            sys.stdout.flush()
    progress.close()
    train_seconds = time.perf_counter() - train_start
    train_cpu_seconds = time.process_time() - train_cpu_start

    ppl, eval_tokens = heldout_perplexity(model, streams["heldout"], args.eval_context, args.eval_windows, device)
    eval_windows = eval_tokens // (args.eval_context - 1)
    print(f"held-out perplexity {ppl:.3f} over {eval_tokens:,} tokens", flush=True)

    model.to("cpu")
    last_n = min(100, len(losses))
    command_args = sys.argv[1:] if argv is None else argv
    facts = {
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "n_embd": args.n_embd,
        "head_dim": args.n_embd // args.n_head,
        "n_positions": args.n_positions,
        "params": params,
        "vocab_size": len(tokenizer),
        "python": platform.python_version(),
        "files": {s: len(t) for s, t in texts.items()},
        "tokens": {s: len(t) for s, t in streams.items()},
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "context": args.context,
        "tokens_seen": args.steps * args.batch_size * args.context,
        "epochs": args.steps * args.batch_size * args.context / len(train),
        "weight_decay": args.weight_decay,
        "lr": args.lr,
        "warmup": args.warmup,
        "min_lr_ratio": args.min_lr_ratio,
        "last_n": last_n,
        "final_train_loss": sum(losses[-last_n:]) / last_n,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "total_seconds": time.perf_counter() - script_start,
        "device": device_description(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["python", "-m", "sparse_attention.recipes.pretrain", *command_args]),
        "heldout_ppl": ppl,
        "eval_windows": eval_windows,
        "eval_context": args.eval_context,
        "eval_tokens": eval_tokens,
    }

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_model_card(tmp, facts)

    write_folder(args.out, write)
    print(json.dumps({k: facts[k] for k in ("params", "steps", "tokens_seen", "train_seconds", "heldout_ppl")}))
    print(f"saved to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
