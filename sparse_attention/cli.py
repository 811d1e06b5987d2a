"""Command line: ``python -m sparse_attention <command>`` (also installed as ``sparse-attention``).

Commands:
    demo       calibrate the shipped model on calibration text and report dense / top-k / Top-θ (the main job)
    calibrate  calibrate thresholds for a model and save them (and optionally a configured checkpoint)
    evaluate   report a configured model (or a model plus a thresholds file) against dense attention
    train      fine-tune a causal LM with the attention-condensation regularizer

Every command takes ``--model`` (a local directory or a hub id; default: the shipped model), ``--text`` (files or
directories of text; default: the matching split of the Python standard library), ``--k``, ``--placement``,
``--sdc``, ``--vmc`` and ``--device``. Bad input prints one line and exits with status 2.

``calibrate`` and ``train`` also run under ``torchrun --nproc-per-node N -m sparse_attention ...``: every process
computes (its share of the calibration batches; its share of each training batch, under DDP), only rank 0 writes files
and prints, and the results equal those of one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .hf.backend import use_top_theta
from .ops.contract import DEFAULT_DENSE_LAYERS, DEFAULT_SIGMA, PLACEMENTS, SDC_MODES


class UsageError(ValueError):
    """An input problem reported as one line, without a traceback."""


# ---- Under a launcher (torchrun): one process group, rank 0 writes --------------------------------------------------


def _launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _start_group(args) -> bool:
    """Initialise torch.distributed from the launcher's environment (gloo on CPU, NCCL on CUDA, where ``--device cuda``
    becomes this process's GPU, ``cuda:LOCAL_RANK``); True when this call initialised it."""
    import os

    import torch
    import torch.distributed as dist

    if not _launched() or dist.is_initialized():
        return False
    if args.command not in ("calibrate", "train"):
        raise UsageError(f"{args.command} runs in one process: launch it without torchrun")
    device = torch.device(args.device or "cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        args.device = str(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _rank0() -> bool:
    from .ops import distributed

    return distributed.rank(distributed.resolve_group("auto")) == 0


def _on_rank0(write) -> None:
    """Run ``write()`` on rank 0 only; every process then raises if it failed there, so all exit alike."""
    import torch

    from .ops import distributed

    group = distributed.resolve_group("auto")
    error = None
    if distributed.rank(group) == 0:
        try:
            write()
        except Exception as exc:  # re-raised below, after the other processes heard of it
            error = exc
    failed = distributed.all_reduce(torch.tensor([error is not None], dtype=torch.int32), group)
    if error is not None:
        raise error
    if int(failed) > 0:
        raise UsageError("rank 0 failed to write the results (its error is above)")


# ---- End of the launcher helpers ------------------------------------------------------------------------------------


def _load(args):
    import torch

    from .recipes.default_model import DEFAULT_MODEL_DIR, load_model_and_tokenizer

    torch.manual_seed(args.seed)
    if args.quiet or not _rank0():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    source = args.model or DEFAULT_MODEL_DIR
    model, tokenizer = load_model_and_tokenizer(source, attn_implementation="eager", device=args.device)
    try:
        use_top_theta(model)
    except ValueError as exc:
        raise UsageError(f"model {source}: {exc}") from None
    model.set_attn_implementation("eager")
    return model, tokenizer


def _texts(args, split: str) -> list[str]:
    from .recipes.data import load_texts, stdlib_texts

    if args.text:
        return load_texts(args.text)
    return stdlib_texts(split)


def _seq_len(args, model) -> int:
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 512)
    return min(args.seq_len or 512, limit)


def _split_windows(args, model, tokenizer, texts):
    """Disjoint calibration and held-out windows: separate corpus splits by default; with ``--text``, the first
    ``--calib-windows`` windows calibrate and the rest are held out. ``texts`` maps split names to texts."""
    from .recipes.data import token_windows

    seq_len = _seq_len(args, model)
    if args.text:
        windows = token_windows(tokenizer, texts["heldout"], seq_len)
        if windows.shape[0] < 2:
            raise UsageError("--text is too short: need at least two windows (one to calibrate, one to evaluate)")
        n_cal = min(args.calib_windows, windows.shape[0] // 2)
        heldout = windows[n_cal:]
        if heldout.shape[0] > args.windows:
            heldout = heldout[: args.windows]
        return windows[:n_cal], heldout
    calibration = token_windows(tokenizer, texts["calibration"], seq_len, args.calib_windows)
    heldout = token_windows(tokenizer, texts["heldout"], seq_len, args.windows)
    return calibration, heldout


def _write_report(args, records, extra: dict) -> None:
    from .recipes.report import format_table, plot

    print(format_table(records))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({**extra, "records": records}, indent=1))
    drawn = plot(records, out / "report.png")
    print(
        f"wrote {out / 'report.json'}" + (f" and {out / 'report.png'}" if drawn else " (install matplotlib for a plot)")
    )


def _meta(args, model, calibration, heldout) -> dict:
    from .recipes.report import provenance

    return {
        "model": str(args.model or "shipped default"),
        "model_type": model.config.model_type,
        "layers": model.config.num_hidden_layers,
        "heads": model.config.num_attention_heads,
        "seq_len": int(heldout.shape[1]),
        "heldout_windows": int(heldout.shape[0]),
        "calibration_windows": None if calibration is None else int(calibration.shape[0]),
        **provenance(["sparse-attention", *args.argv]),
        "device": str(args.device or "cpu"),
    }


def cmd_demo(args) -> int:
    from .recipes.evaluation import compare

    # Text first: a bad --text is reported before any model is loaded.
    texts = {split: _texts(args, split) for split in (("heldout",) if args.text else ("calibration", "heldout"))}
    model, tokenizer = _load(args)
    calibration, heldout = _split_windows(args, model, tokenizer, texts)
    records = compare(
        model, heldout, calibration, ks=args.k, placement=args.placement, sdc=args.sdc, vmc=args.vmc,
        sigma=args.sigma, dense_layers=args.dense_layers, new_tokens=args.new_tokens, batch_size=args.batch_size,
        progress=not args.quiet,
    )  # fmt: skip
    _write_report(args, records, _meta(args, model, calibration, heldout))
    return 0


def cmd_calibrate(args) -> int:
    from .hf.backend import configure
    from .hf.calibration import calibrate
    from .ops.distributed import shard
    from .recipes.data import batches, token_windows

    texts = _texts(args, "calibration")
    model, tokenizer = _load(args)
    windows = token_windows(tokenizer, texts, _seq_len(args, model), args.calib_windows)
    th = calibrate(
        model, shard(batches(windows, args.batch_size)), k=args.k[0], placement=args.placement, sigma=args.sigma,
        dense_layers=args.dense_layers, progress=not args.quiet,
    )  # fmt: skip

    def write() -> None:
        path = th.save(args.out)
        print(f"calibrated k={th.k} placement={th.placement} on {windows.shape[0]} windows: wrote {path}")
        if args.save_model:
            configure(model, th, sdc=args.sdc, vmc=args.vmc, backend=args.backend)
            model.save_pretrained(args.save_model)
            tokenizer.save_pretrained(args.save_model)
            print(f"wrote a configured checkpoint to {args.save_model} (load it with attn_implementation='top_theta')")

    _on_rank0(write)
    return 0


def cmd_evaluate(args) -> int:
    from .hf.backend import configure, language_model, model_settings
    from .ops.thresholds import Thresholds
    from .recipes.data import token_windows
    from .recipes.evaluation import evaluate_configured

    texts = _texts(args, "heldout")
    thresholds = Thresholds.load(args.thresholds) if args.thresholds else None
    model, tokenizer = _load(args)
    if thresholds is not None:
        configure(model, thresholds, sdc=args.sdc, vmc=args.vmc, backend=args.backend)
    elif model_settings(language_model(model)[1]) is None:
        raise UsageError("the model has no Top-θ configuration: pass --thresholds FILE (from the calibrate command)")
    else:
        use_top_theta(model)
    heldout = token_windows(tokenizer, texts, _seq_len(args, model), args.windows)
    records = evaluate_configured(model, heldout, new_tokens=args.new_tokens, batch_size=args.batch_size)
    _write_report(args, records, _meta(args, model, None, heldout))
    return 0


def cmd_train(args) -> int:
    from .recipes.training import finetune

    texts = _texts(args, "train")
    model, tokenizer = _load(args)
    every = max(1, args.steps // 20)

    def log(entry) -> None:
        if (entry.step % every == 0 or entry.step == args.steps - 1) and _rank0():
            print(entry, flush=True)

    history = finetune(
        model, tokenizer, texts, k=args.k[0], lam=args.lam, steps=args.steps, lr=args.lr,
        batch_size=args.batch_size, seq_len=_seq_len(args, model), kind=args.kind, dense_layers=args.dense_layers,
        warmup=args.warmup, device=args.device, seed=args.seed, backend=args.backend, progress=not args.quiet,
        log=log,
    )  # fmt: skip
    out = Path(args.out)
    model.eval()

    def write() -> None:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        meta = {"command": " ".join(["sparse-attention", *args.argv]), "k": args.k[0], "lam": args.lam}
        (out / "train_log.json").write_text(json.dumps({**meta, "steps": [e.to_dict() for e in history]}, indent=1))
        print(f"wrote the fine-tuned checkpoint and train_log.json to {out}")

    _on_rank0(write)
    return 0


def _k_list(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes integers separated by commas, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--k values must be >= 1, got {text!r}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-attention", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="local model directory or hub id (default: the shipped GPT-2)")
    common.add_argument("--text", nargs="+", help="text files or directories (default: Python standard library)")
    common.add_argument("--k", type=_k_list, default=None, help="top-k target(s), comma-separated")
    common.add_argument("--placement", choices=PLACEMENTS, default="pre")
    common.add_argument("--sdc", choices=SDC_MODES, default="exact", help="softmax denominator compensation")
    common.add_argument("--vmc", action="store_true", help="V-mean compensation")
    common.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    common.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto")
    common.add_argument("--seq-len", type=int, default=None, help="window length (default: min(512, model limit))")
    common.add_argument("--batch-size", type=int, default=8)
    common.add_argument("--sigma", type=float, default=DEFAULT_SIGMA)
    common.add_argument("--dense-layers", type=int, nargs="*", default=list(DEFAULT_DENSE_LAYERS))
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    eval_opts = argparse.ArgumentParser(add_help=False)
    eval_opts.add_argument("--windows", type=int, default=24, help="held-out windows to evaluate")
    eval_opts.add_argument("--calib-windows", type=int, default=16, help="calibration windows")
    eval_opts.add_argument("--new-tokens", type=int, default=32, help="tokens generated to measure decoding")

    p = sub.add_parser("demo", parents=[common, eval_opts], help="calibrate and report on the shipped model")
    p.add_argument("--out", default="top_theta_report", help="report folder (JSON and PNG)")
    p.set_defaults(func=cmd_demo, k_default=[8, 16, 32])
    p = sub.add_parser("calibrate", parents=[common, eval_opts], help="calibrate and save thresholds")
    p.add_argument("--out", default="thresholds.safetensors", help="thresholds file to write")
    p.add_argument("--save-model", default=None, help="also save a configured checkpoint to this folder")
    p.set_defaults(func=cmd_calibrate, k_default=[16])
    p = sub.add_parser("evaluate", parents=[common, eval_opts], help="report a configured model against dense")
    p.add_argument("--thresholds", default=None, help="thresholds file from the calibrate command")
    p.add_argument("--out", default="top_theta_report", help="report folder (JSON and PNG)")
    p.set_defaults(func=cmd_evaluate, k_default=None)
    p = sub.add_parser("train", parents=[common], help="fine-tune with the condensation regularizer")
    p.add_argument("--out", default="condensed_model", help="folder for the fine-tuned checkpoint")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lam", type=float, default=0.1, help="regularizer weight")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--kind", choices=("logmass", "mass"), default="logmass")
    p.add_argument("--warmup", type=int, default=20, help="steps of linear warm-up of the regularizer weight")
    p.set_defaults(func=cmd_train, k_default=[16])
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.k is None:
        args.k = args.k_default
    if args.seq_len is not None and args.seq_len < 2:
        parser.error("--seq-len must be >= 2")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    started = False
    code = 2
    try:
        started = _start_group(args)
        code = args.func(args)
        return code
    except (ValueError, TypeError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
        return 130
    finally:
        if started:
            import torch.distributed as dist

            if code == 0:
                dist.barrier()  # a process that failed exits at once; the launcher then stops the others
            dist.destroy_process_group()
