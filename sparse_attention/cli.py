"""Command line: ``python -m sparse_attention <command>`` (also installed as ``sparse-attention``).

Commands:
    demo       calibrate the shipped model on calibration text and report dense / top-k / Top-θ (the main job)
    calibrate  calibrate thresholds for a model and save them (and optionally a configured checkpoint)
    evaluate   report a configured model (or a model plus a thresholds file) against dense attention
    train      fine-tune a causal LM with the attention-condensation regularizer
    sweep      perplexity against kept work over k and methods, for one or more checkpoints (JSON and plot)

Every command takes ``--model`` (a local directory or a hub id; default: the shipped model), ``--text`` (files or
directories of text; default: the matching split of the Python standard library), ``--k``, ``--placement``,
``--sdc``, ``--vmc`` and ``--device``. Bad input prints one line and exits with status 2.
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


def _load(args):
    import torch

    from .recipes.default_model import DEFAULT_MODEL_DIR, load_model_and_tokenizer

    torch.manual_seed(args.seed)
    if args.quiet:
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


def _write_report(args, records, extra: dict, title: str | None = None) -> None:
    from .recipes.report import format_table, plot

    print(format_table(records))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({**extra, "records": records}, indent=1))
    drawn = plot(records, out / "report.png", title=title)
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


def _demo_condensed(args):
    """The model the demo compares with: ``--condensed PATH``, else the shipped condensed model when ``--model`` is
    not given, else none; ``--no-condensed`` turns it off. Returns ``(source, recipe or None)`` or ``None``."""
    from .recipes.default_model import CONDENSED_MODEL_DIR

    if args.no_condensed:
        return None
    if args.condensed is None and args.model is not None:
        return None
    source = Path(args.condensed) if args.condensed is not None else CONDENSED_MODEL_DIR
    if not (source / "config.json").is_file():
        raise UsageError(
            f"the condensed model {source} has no config.json: pass --condensed DIR, or --no-condensed to show the "
            "first model alone" + ("" if args.condensed else " (the package was installed without its data)")
        )
    recipe = None
    if (source / "train_log.json").is_file():
        recipe = json.loads((source / "train_log.json").read_text(encoding="utf-8")).get("recipe")
    return source, recipe


def cmd_demo(args) -> int:
    from .recipes.default_model import load_model_and_tokenizer
    from .recipes.evaluation import compare

    # Text first: a bad --text is reported before any model is loaded.
    texts = {split: _texts(args, split) for split in (("heldout",) if args.text else ("calibration", "heldout"))}
    condensed = _demo_condensed(args)
    model, tokenizer = _load(args)
    models = {"shipped" if args.model is None else str(args.model): model}
    if condensed is not None:
        other, _ = load_model_and_tokenizer(condensed[0], attn_implementation="eager", device=args.device)
        if other.config.vocab_size != model.config.vocab_size:
            raise UsageError(
                f"the condensed model {condensed[0]} has another vocabulary than {args.model or 'shipped'}"
            )
        use_top_theta(other)
        other.set_attn_implementation("eager")
        models["condensed"] = other
    calibration, heldout = _split_windows(args, model, tokenizer, texts)
    records = []
    for name, m in models.items():
        found = compare(
            m, heldout, calibration, ks=args.k, placement=args.placement, sdc=args.sdc, vmc=args.vmc,
            sigma=args.sigma, dense_layers=args.dense_layers, new_tokens=args.new_tokens, batch_size=args.batch_size,
            progress=not args.quiet,
        )  # fmt: skip
        records += [{"checkpoint": name, **r} for r in found]
    meta = _meta(args, model, calibration, heldout)
    title = None
    if condensed is not None:
        r = condensed[1] or {}
        recipe = ", ".join(f"{key}={r[key]}" for key in ("lam", "k", "distill", "steps") if key in r)
        meta |= {"condensed": str(condensed[0]), "condensed_recipe": condensed[1]}
        title = (
            f"train with condensation ({recipe or condensed[0]}) → calibrate ({calibration.shape[0]} windows) → "
            f"prune (Top-θ pre, sdc={args.sdc}{', vmc' if args.vmc else ''})"
        )
    _write_report(args, records, meta, title=title)
    return 0


def cmd_calibrate(args) -> int:
    from .hf.backend import configure
    from .hf.calibration import calibrate
    from .recipes.data import batches, token_windows

    texts = _texts(args, "calibration")
    model, tokenizer = _load(args)
    windows = token_windows(tokenizer, texts, _seq_len(args, model), args.calib_windows)
    th = calibrate(
        model, batches(windows, args.batch_size), k=args.k[0], placement=args.placement, sigma=args.sigma,
        dense_layers=args.dense_layers, progress=not args.quiet,
    )  # fmt: skip
    path = th.save(args.out)
    print(f"calibrated k={th.k} placement={th.placement} on {windows.shape[0]} windows: wrote {path}")
    if args.save_model:
        configure(model, th, sdc=args.sdc, vmc=args.vmc, backend=args.backend)
        model.save_pretrained(args.save_model)
        tokenizer.save_pretrained(args.save_model)
        print(f"wrote a configured checkpoint to {args.save_model} (load it with attn_implementation='top_theta')")
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
        if entry.step % every == 0 or entry.step == args.steps - 1:
            print(entry, flush=True)

    history = finetune(
        model, tokenizer, texts, k=args.k[0], lam=args.lam, steps=args.steps, lr=args.lr,
        batch_size=args.batch_size, seq_len=_seq_len(args, model), kind=args.kind, dense_layers=args.dense_layers,
        warmup=args.warmup, device=args.device, seed=args.seed, backend=args.backend, progress=not args.quiet,
        log=log, distill=args.distill,
    )  # fmt: skip
    out = Path(args.out)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {"command": " ".join(["sparse-attention", *args.argv]), "k": args.k[0], "lam": args.lam,
            "distill": args.distill}  # fmt: skip
    (out / "train_log.json").write_text(json.dumps({**meta, "steps": [e.to_dict() for e in history]}, indent=1))
    print(f"wrote the fine-tuned checkpoint and train_log.json to {out}")
    return 0


# ---- sweep: perplexity against kept work over k, methods and checkpoints ------------------------------------------

SWEEP_KIND = "sparse-attention sweep"


def _sweep_checkpoints(specs: list[str]) -> dict[str, str]:
    """``shipped``, ``condensed``, ``NAME=PATH`` or ``PATH`` (named by its folder) → {name: source}."""
    from .recipes.default_model import CONDENSED_MODEL_DIR, DEFAULT_MODEL_DIR

    named = {"shipped": str(DEFAULT_MODEL_DIR), "condensed": str(CONDENSED_MODEL_DIR)}
    found: dict[str, str] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep:
            name, source = (spec, named[spec]) if spec in named else (Path(spec).name or spec, spec)
        if not name or not source:
            raise UsageError(f"--model entries are shipped, condensed, NAME=PATH or PATH; got {spec!r}")
        if name in found:
            raise UsageError(f"--model names {name!r} twice: give each checkpoint its own NAME=PATH")
        found[name] = source
    return found


def _file_sha256(path: Path) -> str | None:
    import hashlib

    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sweep_windows(args, tokenizer, seq_len):
    """Calibration and held-out windows: ``--text`` split as in ``demo``, else the chosen built-in corpora (code: the
    standard library's calibration/heldout splits; prose: the documentation topics of ``pydoc_data``)."""
    from .recipes.data import load_texts, prose_texts, stdlib_texts, token_windows

    if args.text:
        windows = token_windows(tokenizer, load_texts(args.text), seq_len)
        if windows.shape[0] < 2:
            raise UsageError("--text is too short: need at least two windows (one to calibrate, one to evaluate)")
        n_cal = min(args.calib_windows, windows.shape[0] // 2)
        return windows[:n_cal], windows[n_cal:][: args.windows]
    corpus = {"code": stdlib_texts, "prose": prose_texts}
    calibration = token_windows(tokenizer, corpus[args.calib_corpus]("calibration"), seq_len, args.calib_windows)
    heldout = token_windows(tokenizer, corpus[args.eval_corpus]("heldout"), seq_len, args.windows)
    return calibration, heldout


def _is_sweep_file(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("kind") == SWEEP_KIND
    except (OSError, ValueError, AttributeError):
        return False


def cmd_sweep(args) -> int:
    import time

    import torch

    from .ops.files import check_target, write_text
    from .recipes.default_model import load_model_and_tokenizer
    from .recipes.report import provenance
    from .recipes.sweep import check_methods, format_sweep, fronts, plot_sweep, sweep

    start = time.perf_counter()
    methods = check_methods(args.methods)
    if args.text and (args.calib_corpus != "code" or args.eval_corpus != "code"):
        raise UsageError("--text replaces the built-in corpora: drop --calib-corpus / --eval-corpus")
    checkpoints = _sweep_checkpoints(args.model or ["shipped", "condensed"])
    original = args.original
    if original not in checkpoints:
        if original not in ("shipped", "condensed"):
            raise UsageError(f"--original {original!r} is not one of the --model names {list(checkpoints)}")
        checkpoints = {original: _sweep_checkpoints([original])[original], **checkpoints}
        dense_only = {original}
    else:
        dense_only = set()
    out = Path(args.out)
    if out.suffix != ".json":
        raise UsageError(f"--out must name a .json file (the plot goes beside it as .png), got {out}")
    png = out.with_suffix(".png")
    check_target(out, folder=False, ours=_is_sweep_file, what="sweep results", overwrite=args.overwrite)
    check_target(png, folder=False, ours=lambda p: _is_sweep_file(out), what="sweep plot", overwrite=args.overwrite)
    torch.manual_seed(args.seed)
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    models, tokenizer = {}, None
    for name, source in checkpoints.items():
        try:
            models[name], tok = load_model_and_tokenizer(source, attn_implementation="eager", device=args.device)
            use_top_theta(models[name])
        except ValueError as exc:
            raise UsageError(f"--model {name}={source}: {exc}") from None
        models[name].set_attn_implementation("eager")
        tokenizer = tokenizer or tok
    limits = [getattr(m.config, "n_positions", None) or getattr(m.config, "max_position_embeddings", 512)
              for m in models.values()]  # fmt: skip
    seq_len = min([args.seq_len or 512, *limits])
    calibration, heldout = _sweep_windows(args, tokenizer, seq_len)

    def sha(t):
        import hashlib

        return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()

    settings = {
        "checkpoints": {
            name: {"source": src, "model_sha256": _file_sha256(Path(src) / "model.safetensors")}
            for name, src in checkpoints.items()
        },
        "original": original,
        "dense_only": sorted(dense_only),
        "text": args.text,
        "calib_corpus": None if args.text else args.calib_corpus,
        "eval_corpus": None if args.text else args.eval_corpus,
        "seq_len": seq_len,
        "heldout_windows": int(heldout.shape[0]),
        "calibration_windows": int(calibration.shape[0]),
        "heldout_sha256": sha(heldout),
        "calibration_sha256": sha(calibration),
        "prompt_len": args.prompt_len,
        "num_prompts": args.num_prompts,
        "new_tokens": args.new_tokens,
        "sigma": args.sigma,
        "dense_layers": sorted(args.dense_layers),
        "batch_size": args.batch_size,
    }
    done, earlier_seconds, invocations = [], 0.0, []
    if args.resume and out.is_file():
        previous = json.loads(out.read_text(encoding="utf-8"))
        old = previous.get("settings", {})
        shared = {name: old.get("checkpoints", {}).get(name) for name in checkpoints}
        differ = [
            key for key in settings if key not in ("checkpoints", "dense_only") and old.get(key) != settings[key]
        ] + [name for name, got in shared.items() if got is not None and got != settings["checkpoints"][name]]
        if differ:
            raise UsageError(f"--resume: {out} was measured with other settings ({', '.join(differ)}); use a new --out")
        settings["checkpoints"] = {**old.get("checkpoints", {}), **settings["checkpoints"]}
        done = previous.get("records", [])
        earlier_seconds = float(previous.get("wall_seconds", 0.0))
        invocations = previous.get("invocations", [])
    meta = {
        "kind": SWEEP_KIND,
        **provenance(["sparse-attention", *args.argv]),
        "device": str(args.device or "cpu"),
        "torch_threads": torch.get_num_threads(),
        "settings": settings,
    }

    def write(records) -> None:
        wall = earlier_seconds + time.perf_counter() - start
        # Each call that measured records: what ran them (the top-level provenance is the latest call's).
        this = {key: meta[key] for key in ("command", "commit", "torch_threads")}
        this |= {"wall_seconds": time.perf_counter() - start, "records_measured": len(records) - len(done)}
        body = {**meta, "wall_seconds": wall, "invocations": [*invocations, this], "ks": args.k,
                "methods": list(methods), "fronts": fronts(records), "records": records}  # fmt: skip
        write_text(out, json.dumps(body, indent=1) + "\n")

    records = sweep(
        models, heldout, calibration, original=original, ks=args.k, methods=methods, dense_only=dense_only,
        sigma=args.sigma, dense_layers=args.dense_layers, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
        num_prompts=args.num_prompts, batch_size=args.batch_size, done=done, on_record=write, progress=not args.quiet,
    )  # fmt: skip
    write(records)
    print(format_sweep(records))
    title = f"{', '.join(models)} — {heldout.shape[0]} held-out windows of {seq_len} tokens"
    drawn = plot_sweep(records, png, title=title)
    print(f"wrote {out}" + (f" and {png}" if drawn else " (install matplotlib for the plot)"))
    return 0


def _add_sweep_parser(sub) -> None:
    from .recipes.sweep import DEFAULT_KS, METHODS

    p = sub.add_parser("sweep", help="perplexity against kept work over k, methods and checkpoints")
    p.add_argument(
        "--model",
        nargs="+",
        default=None,
        help="checkpoints: shipped, condensed, NAME=PATH or PATH (default: shipped condensed)",
    )
    p.add_argument(
        "--original",
        default="shipped",
        help="the checkpoint whose dense perplexity is the quality target (default: shipped)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        metavar="METHOD",
        help=f"a subset of: {', '.join(repr(m) for m in METHODS)} (default: all)",
    )
    p.add_argument("--text", nargs="+", help="text files or directories: the first --calib-windows windows calibrate")
    p.add_argument("--calib-corpus", choices=("code", "prose"), default="code", help="built-in calibration text")
    p.add_argument("--eval-corpus", choices=("code", "prose"), default="code", help="built-in held-out text")
    p.add_argument("--k", type=_k_list, default=None, help="top-k target(s), comma-separated (default 2,...,64)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: min(512, model limit))")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sigma", type=float, default=DEFAULT_SIGMA)
    p.add_argument("--dense-layers", type=int, nargs="*", default=list(DEFAULT_DENSE_LAYERS))
    p.add_argument("--windows", type=int, default=24, help="held-out windows to evaluate")
    p.add_argument("--calib-windows", type=int, default=16, help="calibration windows")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated to measure decoding")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens before generating")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts generated from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", default="sweep.json", help="results file (.json; the plot goes beside it as .png)")
    p.add_argument("--resume", action="store_true", help="keep the records of --out and measure only what is missing")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a sweep file")
    p.set_defaults(func=cmd_sweep, k_default=list(DEFAULT_KS))


# ---- end of sweep ------------------------------------------------------------------------------------------------


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
    p.add_argument(
        "--condensed",
        default=None,
        help="a condensed checkpoint to compare with (default without --model: the shipped one)",
    )
    p.add_argument("--no-condensed", action="store_true", help="show the first model alone")
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
    p.add_argument(
        "--distill",
        type=float,
        default=0.0,
        help="weight in [0, 1] of distillation to the model as loaded (KL of next-token distributions)",
    )
    p.set_defaults(func=cmd_train, k_default=[16])
    _add_sweep_parser(sub)
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
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
