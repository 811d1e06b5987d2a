"""Command line: ``python -m sparse_attention <command>`` (also installed as ``sparse-attention``).

Commands:
    demo       calibrate the shipped and the shipped condensed model, report dense / top-k / Top-θ (the main job)
    calibrate  calibrate thresholds for a model and save them (and optionally a configured checkpoint)
    evaluate   report a configured model (or a model plus a thresholds file) against dense attention
    train      fine-tune a causal LM with the attention-condensation regularizer
    sweep      perplexity against kept work over k and methods, for one or more checkpoints (JSON and plot)

Every command takes ``--model`` (a local directory or a hub id; default: the shipped model), ``--text`` (files or
directories of text; default: the matching split of the Python standard library), ``--device``, ``--seq-len`` and
``--batch-size``; each command takes only the options it uses.

Every argument and output path is checked before any long work starts (the model's config is read before its
weights). A user error prints one line, ``error: ...``, on stderr and exits with status 2; an interrupt exits with 130.
Outputs follow ``sparse_attention.ops.files``: written beside the target and renamed into place (a folder is replaced
as a whole or not at all), and a path the package did not write is refused unless ``--overwrite`` is given.

``calibrate`` and ``train`` also run under ``torchrun --nproc-per-node N -m sparse_attention ...``: every process
computes (its share of the calibration batches; its share of each training batch, under DDP), only rank 0 writes files
and prints, and the results equal those of one process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .hf.backend import use_top_theta
from .ops.contract import DEFAULT_DENSE_LAYERS, DEFAULT_SIGMA, PLACEMENTS, SDC_MODES
from .ops.files import TRAIN_LOG, check_target, is_checkpoint_folder, is_report_folder, write_folder

# Prompt tokens of each greedy continuation that measures decoding (demo and evaluate).
PROMPT_LEN = 64
# Window length when --seq-len is not given (capped by the model's positions).
DEFAULT_SEQ_LEN = 512


class UsageError(ValueError):
    """An input problem reported as one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: they raise :class:`UsageError`, which :func:`main` prints as ``error: ...``."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


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


# ---- argument types (argparse reports their messages on one line) -----------------------------------------------


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def _finite(*, minimum: float | None = None, maximum: float | None = None, positive: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    parse.__name__ = "number"
    return parse


def _k_list(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes integers separated by commas, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--k values must be >= 1, got {text!r}")
    return ks


def _layer_k(text: str) -> dict[int, int]:
    found: dict[int, int] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        layer, sep, k = item.partition(":")
        try:
            layer_i, k_i = int(layer), int(k)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--layer-k takes LAYER:K pairs separated by commas, got {item!r}"
            ) from None
        if not sep or layer_i < 0 or k_i < 1:
            raise argparse.ArgumentTypeError(f"--layer-k needs LAYER >= 0 and K >= 1 in each LAYER:K, got {item!r}")
        if layer_i in found:
            raise argparse.ArgumentTypeError(f"--layer-k gives layer {layer_i} twice")
        found[layer_i] = k_i
    if not found:
        raise argparse.ArgumentTypeError(f"--layer-k takes LAYER:K pairs separated by commas, got {text!r}")
    return found


def _check_device(text: str | None):
    """``--device`` as a ``torch.device``: cpu, cuda or cuda:N, and only a CUDA device that exists."""
    import torch

    if text is None:
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device {text!r}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise UsageError(f"--device {text!r}: no CUDA device is available (torch {torch.__version__}, {build})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_targets(args) -> None:
    """Every output path, before any work: refuse what cannot be written or was not written by the package."""
    overwrite = args.overwrite
    if args.command in ("demo", "evaluate"):
        check_target(args.out, folder=True, ours=is_report_folder, what="report", overwrite=overwrite)
    elif args.command == "calibrate":
        from .ops.thresholds import is_thresholds_file

        if args.save_model and Path(args.save_model).resolve() in Path(args.out).resolve().parents:
            raise UsageError(
                f"--out {args.out} is inside --save-model {args.save_model}, which is replaced as a whole: "
                "write the thresholds file elsewhere"
            )
        check_target(args.out, folder=False, ours=is_thresholds_file, what="thresholds file", overwrite=overwrite)
        if args.save_model:
            check_target(args.save_model, folder=True, ours=is_checkpoint_folder, what="checkpoint",
                         overwrite=overwrite)  # fmt: skip
    elif args.command == "train":
        check_target(args.out, folder=True, ours=is_checkpoint_folder, what="checkpoint", overwrite=overwrite)
    elif args.command == "sweep":
        out = Path(args.out)
        if out.suffix != ".json":
            raise UsageError(f"--out must name a .json file (the plot goes beside it as .png), got {out}")
        check_target(out, folder=False, ours=_is_sweep_file, what="sweep results", overwrite=overwrite)
        check_target(out.with_suffix(".png"), folder=False, ours=lambda p: _is_sweep_file(out), what="sweep plot",
                     overwrite=overwrite)  # fmt: skip


def _check_args(args) -> None:
    """The checks that need no model: options that depend on each other, the device and the output paths."""
    if args.command in ("calibrate", "train") and len(args.k) != 1:
        raise UsageError(f"{args.command} takes one --k, got {','.join(map(str, args.k))}")
    if args.command == "calibrate" and not args.save_model:
        given = [f"--{name.replace('_', '-')}" for name in ("sdc", "sdc_scale", "cap", "backend")
                 if getattr(args, name) is not None]  # fmt: skip
        if given:
            verb, pronoun = ("applies", "it") if len(given) == 1 else ("apply", "them")
            raise UsageError(
                f"{' and '.join(given)} only {verb} to the checkpoint written by --save-model: add --save-model DIR "
                f"or leave {pronoun} out"
            )
    if args.command == "sweep" and args.text and (args.calib_corpus != "code" or args.eval_corpus != "code"):
        raise UsageError("--text replaces the built-in corpora: drop --calib-corpus / --eval-corpus")
    if args.command == "demo" and args.condensed is not None and args.no_condensed:
        raise UsageError("--condensed and --no-condensed contradict each other: give one")
    args.device = _check_device(args.device)
    _check_targets(args)


# ---- the model: its config before its weights -------------------------------------------------------------------


def _source(args) -> str:
    from .recipes.default_model import DEFAULT_MODEL_DIR

    return str(args.model or DEFAULT_MODEL_DIR)


def _read_config(args):
    """The config of a local model folder (``config.json`` only, no weights), or ``None`` for a hub id or a folder
    that cannot be read this way (then the model load reports why, and the checks run on the loaded model's config).
    """
    from transformers import AutoConfig

    path = Path(_source(args)).expanduser()
    if not (path / "config.json").is_file():
        return None
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        return None


def _positions(config) -> int | None:
    """The model's position limit, or ``None`` when it has none (some configs say -1)."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_model_args(args, config) -> None:
    """The checks that need the model's config: layers, positions, k against the window length, thresholds."""
    from .hf.backend import model_settings, text_config

    text = text_config(config)
    layers = getattr(text, "num_hidden_layers", None)
    given_dense = getattr(args, "dense_layers", None)
    if given_dense is not None and layers is not None:
        bad = [i for i in given_dense if i >= layers]
        if bad:
            raise UsageError(f"--dense-layers {bad[0]} is out of range: the model has layers 0..{layers - 1}")
    layer_k = getattr(args, "layer_k", None) or {}
    if layer_k and layers is not None:
        bad = [i for i in layer_k if i >= layers]
        if bad:
            raise UsageError(f"--layer-k {bad[0]}:... is out of range: the model has layers 0..{layers - 1}")
    limit = _positions(text) or _positions(config)
    if args.seq_len is not None and limit is not None and args.seq_len > limit:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's {limit} positions")
    seq_len = _seq_len(args, config)
    ks = [*(getattr(args, "k", None) or []), *layer_k.values()]
    if ks and max(ks) >= seq_len:
        raise UsageError(
            f"--k {max(ks)} needs rows longer than k, but windows have {seq_len} tokens: lower --k or raise --seq-len"
        )
    new_tokens = getattr(args, "new_tokens", None)
    if new_tokens is not None and limit is not None and min(PROMPT_LEN, seq_len) + new_tokens > limit:
        raise UsageError(
            f"--new-tokens {new_tokens} after a prompt of {min(PROMPT_LEN, seq_len)} tokens exceeds the model's "
            f"{limit} positions"
        )
    # A malformed config.top_theta is reported here, naming the file and the field, before the weights are read.
    settings = model_settings(text, where=f"{_source(args)}/config.json")
    if args.command == "evaluate":
        if args.thresholds_obj is not None:
            args.thresholds_obj.check_model(text, where=f"--thresholds {args.thresholds}")
        elif settings is None or settings.thresholds is None:
            raise UsageError(
                "the model has no Top-θ configuration: pass --thresholds FILE (from the calibrate command)"
            )


def _load(args):
    """Check what the model's config allows, then load the model (eager attention) and its tokenizer."""
    import torch

    from .recipes.default_model import load_model_and_tokenizer

    config = _read_config(args)
    if config is not None:
        _check_model_args(args, config)
    torch.manual_seed(args.seed)
    if args.quiet or not _rank0():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    source = _source(args)
    model, tokenizer = load_model_and_tokenizer(source, attn_implementation="eager", device=args.device)
    _check_top_theta(model, f"model {source}")
    if config is None:
        _check_model_args(args, model.config)
    return model, tokenizer


def _check_top_theta(model, what: str) -> None:
    """Refuse a model that cannot run ``top_theta`` (naming it as ``what``), then leave it on eager attention until a
    command configures it."""
    try:
        use_top_theta(model)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None
    model.set_attn_implementation("eager")


def _texts(args, split: str) -> list[str]:
    from .recipes.data import load_texts, stdlib_texts

    if args.text:
        return load_texts(args.text)
    return stdlib_texts(split)


def _seq_len(args, config) -> int:
    from .hf.backend import text_config

    limit = _positions(text_config(config)) or _positions(config) or DEFAULT_SEQ_LEN
    return min(args.seq_len or DEFAULT_SEQ_LEN, limit)


def _split_text_windows(args, windows):
    """``--text`` windows split in two: the first ``--calib-windows`` (at most half) calibrate, the next ``--windows``
    are held out."""
    if windows.shape[0] < 2:
        raise UsageError("--text is too short: need at least two windows (one to calibrate, one to evaluate)")
    n_cal = min(args.calib_windows, windows.shape[0] // 2)
    return windows[:n_cal], windows[n_cal:][: args.windows]


def _split_windows(args, model, tokenizer, texts):
    """Disjoint calibration and held-out windows: separate corpus splits by default; with ``--text``, the first
    ``--calib-windows`` windows calibrate and the rest are held out. ``texts`` maps split names to texts."""
    from .recipes.data import token_windows

    seq_len = _seq_len(args, model.config)
    if args.text:
        return _split_text_windows(args, token_windows(tokenizer, texts["heldout"], seq_len))
    calibration = token_windows(tokenizer, texts["calibration"], seq_len, args.calib_windows)
    heldout = token_windows(tokenizer, texts["heldout"], seq_len, args.windows)
    return calibration, heldout


# ---- writing ------------------------------------------------------------------------------------------------------


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError, and safetensors' own error (not an OSError)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return (OSError,)
    return (OSError, SafetensorError)


def _writing(what: str, path, write):
    """Run ``write()``; a failed write becomes a :class:`UsageError` naming the ``what`` and the path."""
    try:
        return write()
    except _write_errors() as exc:
        raise UsageError(f"cannot write the {what} {path}: {exc}") from None


def _save_checkpoint(model, tokenizer, folder: Path, extra=None) -> None:
    """``model`` and ``tokenizer`` (plus ``extra(tmp)``) saved into a folder that then replaces ``folder`` whole."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not (tmp / "config.json").is_file():
            raise OSError("save_pretrained wrote no config.json")
        if extra is not None:
            extra(tmp)

    _writing("checkpoint", folder, lambda: write_folder(folder, write))


def _write_report(args, records, extra: dict, title: str | None = None) -> None:
    from .recipes.report import format_table, plot

    print(format_table(records))
    out = check_target(args.out, folder=True, ours=is_report_folder, what="report", overwrite=args.overwrite)
    drawn = []

    def write(tmp: Path) -> None:
        (tmp / "report.json").write_text(json.dumps({**extra, "records": records}, indent=1), encoding="utf-8")
        drawn.append(plot(records, tmp / "report.png", title=title))

    _writing("report", out, lambda: write_folder(out, write))
    print(
        f"wrote {out / 'report.json'}"
        + (f" and {out / 'report.png'}" if drawn[0] else " (install matplotlib for a plot)")
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
        "device": str(args.device),
    }


# ---- the commands -------------------------------------------------------------------------------------------------


def _given(value, default):
    """An option's value, or ``default`` when it was not given (``None``; 0 and False are given values)."""
    return default if value is None else value


def _dense_layers(args) -> list[int]:
    return list(DEFAULT_DENSE_LAYERS) if args.dense_layers is None else args.dense_layers


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
        _check_top_theta(other, f"the condensed model {condensed[0]}")
        models["condensed"] = other
    calibration, heldout = _split_windows(args, model, tokenizer, texts)
    records = []
    for name, m in models.items():
        found = compare(
            m, heldout, calibration, ks=args.k, placement=args.placement, sdc=args.sdc or "exact",
            sdc_scale=_given(args.sdc_scale, 1.0), cap=args.cap, vmc=bool(args.vmc), sigma=args.sigma,
            dense_layers=_dense_layers(args), prompt_len=PROMPT_LEN, new_tokens=args.new_tokens,
            batch_size=args.batch_size, backend=args.backend or "auto",
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
            f"prune (Top-θ {args.placement}, sdc={args.sdc or 'exact'}{', vmc' if args.vmc else ''})"
        )
    _write_report(args, records, meta, title=title)
    return 0


def cmd_calibrate(args) -> int:
    from .hf.backend import configure, text_config
    from .hf.calibration import calibrate
    from .ops.distributed import shard
    from .recipes.data import batches, token_windows

    texts = _texts(args, "calibration")
    model, tokenizer = _load(args)
    windows = token_windows(tokenizer, texts, _seq_len(args, model.config), args.calib_windows)
    k = args.k[0]
    if args.layer_k:
        k = {i: args.layer_k.get(i, k) for i in range(text_config(model.config).num_hidden_layers)}
    th = calibrate(
        model, shard(batches(windows, args.batch_size)), k=k, placement=args.placement, sigma=args.sigma,
        dense_layers=_dense_layers(args), vmc=bool(args.vmc), progress=not args.quiet,
    )  # fmt: skip

    def write() -> None:
        path = _writing("thresholds file", args.out, lambda: th.save(args.out, overwrite=args.overwrite))
        per_layer = f"per layer {th.to_dict()['k']}" if args.layer_k else th.k
        print(f"calibrated k={per_layer} placement={th.placement} on {windows.shape[0]} windows: wrote {path}")
        if args.save_model:
            configure(model, th, sdc=args.sdc or "exact", sdc_scale=_given(args.sdc_scale, 1.0), cap=args.cap,
                      vmc=bool(args.vmc), backend=args.backend or "auto")  # fmt: skip
            folder = check_target(args.save_model, folder=True, ours=is_checkpoint_folder, what="checkpoint",
                                  overwrite=args.overwrite)  # fmt: skip
            _save_checkpoint(model, tokenizer, folder)
            print(f"wrote a configured checkpoint to {folder} (load it with attn_implementation='top_theta')")

    _on_rank0(write)
    return 0


def cmd_evaluate(args) -> int:
    from .hf.backend import configure, language_model, model_settings
    from .recipes.data import token_windows
    from .recipes.evaluation import evaluate_configured

    texts = _texts(args, "heldout")
    model, tokenizer = _load(args)
    if args.thresholds_obj is not None:
        configure(model, args.thresholds_obj, sdc=args.sdc or "exact", sdc_scale=_given(args.sdc_scale, 1.0),
                  cap=args.cap, vmc=bool(args.vmc), backend=args.backend or "auto")  # fmt: skip
    elif any(getattr(args, name) is not None for name in ("sdc", "sdc_scale", "cap", "vmc", "backend")):
        # Override the checkpoint's own settings with the ones given; keep the rest.
        settings = model_settings(language_model(model)[1])
        configure(
            model, settings.thresholds, sdc=args.sdc or settings.sdc,
            sdc_scale=_given(args.sdc_scale, settings.sdc_scale), cap=_given(args.cap, settings.cap),
            vmc=_given(args.vmc, settings.vmc), backend=args.backend or settings.backend,
        )  # fmt: skip
    else:
        use_top_theta(model)
    heldout = token_windows(tokenizer, texts, _seq_len(args, model.config), args.windows)
    records = evaluate_configured(
        model, heldout, prompt_len=PROMPT_LEN, new_tokens=args.new_tokens, batch_size=args.batch_size
    )
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
        batch_size=args.batch_size, seq_len=_seq_len(args, model.config), kind=args.kind,
        dense_layers=_dense_layers(args), warmup=args.warmup, device=args.device, seed=args.seed,
        backend=args.backend or "auto", progress=not args.quiet, log=log, distill=args.distill,
    )  # fmt: skip
    model.eval()
    meta = {"command": " ".join(["sparse-attention", *args.argv]), "k": args.k[0], "lam": args.lam,
            "distill": args.distill}  # fmt: skip
    log_text = json.dumps({**meta, "steps": [e.to_dict() for e in history]}, indent=1)

    def write() -> None:
        folder = check_target(args.out, folder=True, ours=is_checkpoint_folder, what="checkpoint",
                              overwrite=args.overwrite)  # fmt: skip
        _save_checkpoint(model, tokenizer, folder, lambda tmp: (tmp / TRAIN_LOG).write_text(log_text, encoding="utf-8"))
        print(f"wrote the fine-tuned checkpoint and {TRAIN_LOG} to {folder}")

    _on_rank0(write)
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
        return _split_text_windows(args, token_windows(tokenizer, load_texts(args.text), seq_len))
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

    from .ops.files import write_text
    from .recipes.default_model import load_model_and_tokenizer
    from .recipes.report import provenance
    from .recipes.sweep import check_methods, format_sweep, fronts, plot_sweep, sweep

    start = time.perf_counter()
    methods = check_methods(args.methods)
    checkpoints = _sweep_checkpoints(args.model or ["shipped", "condensed"])
    original = args.original
    if original not in checkpoints:
        if original not in ("shipped", "condensed"):
            raise UsageError(f"--original {original!r} is not one of the --model names {list(checkpoints)}")
        checkpoints = {original: _sweep_checkpoints([original])[original], **checkpoints}
        dense_only = {original}
    else:
        dense_only = set()
    out = Path(args.out)  # checked with every other output path, before any work
    png = out.with_suffix(".png")
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    models, tokenizer = {}, None
    for name, source in checkpoints.items():
        try:
            models[name], tok = load_model_and_tokenizer(source, attn_implementation="eager", device=args.device)
        except ValueError as exc:
            raise UsageError(f"--model {name}={source}: {exc}") from None
        _check_top_theta(models[name], f"--model {name}={source}")
        tokenizer = tokenizer or tok
    seq_len = min(_seq_len(args, m.config) for m in models.values())
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
        # A file written before invocations were recorded: its one call is the file's own provenance.
        invocations = previous.get("invocations") or [
            {key: previous.get(key) for key in ("command", "commit", "torch_threads")}
            | {"wall_seconds": earlier_seconds, "records_measured": len(done)}
        ]
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
    shown = dict.fromkeys(r["checkpoint"] for r in records)  # resumed records' checkpoints too
    title = f"{', '.join(shown)} — {heldout.shape[0]} held-out windows of {seq_len} tokens"
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
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--seq-len", type=_int_at_least(2), default=None,
                   help=f"window length (default: min({DEFAULT_SEQ_LEN}, the models' positions))")  # fmt: skip
    p.add_argument("--batch-size", type=_int_at_least(1), default=8)
    p.add_argument("--sigma", type=_finite(), default=DEFAULT_SIGMA, help="theta = mean + sigma * std")
    p.add_argument("--dense-layers", type=_int_at_least(0), nargs="*", default=list(DEFAULT_DENSE_LAYERS),
                   help="layers never pruned (default: 0 1)")  # fmt: skip
    p.add_argument("--windows", type=_int_at_least(1), default=24, help="held-out windows to evaluate")
    p.add_argument("--calib-windows", type=_int_at_least(1), default=16, help="calibration windows")
    p.add_argument("--new-tokens", type=_int_at_least(1), default=32, help="tokens generated to measure decoding")
    p.add_argument("--prompt-len", type=_int_at_least(1), default=PROMPT_LEN, help="prompt tokens before generating")
    p.add_argument("--num-prompts", type=_int_at_least(1), default=4, help="prompts generated from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch CPU threads (default: torch's own choice)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", default="sweep.json", help="results file (.json; the plot goes beside it as .png)")
    p.add_argument("--resume", action="store_true", help="keep the records of --out and measure only what is missing")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a sweep file")
    p.set_defaults(func=cmd_sweep, k_default=list(DEFAULT_KS))


# ---- the parser ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparse-attention", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    common = _Parser(add_help=False)
    common.add_argument("--model", help="local model directory or hub id (default: the shipped GPT-2)")
    common.add_argument("--text", nargs="+", help="text files or directories (default: Python standard library)")
    common.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    common.add_argument("--seq-len", type=_int_at_least(2), default=None,
                        help=f"window length (default: min({DEFAULT_SEQ_LEN}, the model's positions))")  # fmt: skip
    common.add_argument("--batch-size", type=_int_at_least(1), default=8)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument(
        "--overwrite", action="store_true", help="replace outputs that sparse-attention did not write (folders whole)"
    )

    calib = _Parser(add_help=False)
    calib.add_argument("--k", type=_k_list, default=None, help="top-k target(s), comma-separated")
    calib.add_argument("--placement", choices=PLACEMENTS, default="pre")
    calib.add_argument("--sigma", type=_finite(), default=DEFAULT_SIGMA, help="theta = mean + sigma * std")
    calib.add_argument("--dense-layers", type=_int_at_least(0), nargs="*", default=None,
                       help="layers never pruned (default: 0 1)")  # fmt: skip
    calib.add_argument("--calib-windows", type=_int_at_least(1), default=16, help="calibration windows")

    infer = _Parser(add_help=False)
    infer.add_argument("--sdc", choices=SDC_MODES, default=None, help="softmax denominator compensation (exact)")
    infer.add_argument("--vmc", action=argparse.BooleanOptionalAction, default=None, help="V-mean compensation")
    infer.add_argument("--sdc-scale", type=_finite(minimum=0.0), default=None,
                       help="weight of the compensated mass in pre placement (1)")  # fmt: skip
    infer.add_argument("--cap", type=_int_at_least(1), default=None,
                       help="keep at most this many keys per row, the highest scores (no cap)")  # fmt: skip
    infer.add_argument("--backend", choices=("auto", "reference", "triton"), default=None, help="(auto)")

    report = _Parser(add_help=False)
    report.add_argument("--windows", type=_int_at_least(1), default=24, help="held-out windows to evaluate")
    report.add_argument("--new-tokens", type=_int_at_least(1), default=32,
                        help="tokens generated to measure decoding")  # fmt: skip
    report.add_argument("--out", default="top_theta_report", help="report folder (JSON and PNG)")

    p = sub.add_parser("demo", parents=[common, calib, infer, report], help="calibrate and report on a model")
    p.add_argument(
        "--condensed",
        default=None,
        help="a condensed checkpoint to compare with (default without --model: the shipped one)",
    )
    p.add_argument("--no-condensed", action="store_true", help="show the first model alone")
    p.set_defaults(func=cmd_demo, k_default=[2, 8, 32])
    p = sub.add_parser("calibrate", parents=[common, calib, infer], help="calibrate and save thresholds")
    p.add_argument("--out", default="thresholds.safetensors", help="thresholds file to write")
    p.add_argument("--save-model", default=None, help="also save a configured checkpoint to this folder")
    p.add_argument("--layer-k", type=_layer_k, default=None, metavar="L:K,...",
                   help="a k of their own for some layers, e.g. 2:4,3:8 (the others: --k)")  # fmt: skip
    p.set_defaults(func=cmd_calibrate, k_default=[16])
    p = sub.add_parser(
        "evaluate", parents=[common, infer, report], help="report a configured model against dense",
        description="--sdc, --vmc and --backend apply to --thresholds, or override the checkpoint's own settings",
    )  # fmt: skip
    p.add_argument("--thresholds", default=None, help="thresholds file from the calibrate command")
    p.set_defaults(func=cmd_evaluate, k_default=None)
    p = sub.add_parser("train", parents=[common], help="fine-tune with the condensation regularizer")
    p.add_argument("--k", type=_k_list, default=None, help="top-k size of the regularizer (16)")
    p.add_argument("--dense-layers", type=_int_at_least(0), nargs="*", default=None,
                   help="layers left out of the regularizer (default: 0 1)")  # fmt: skip
    p.add_argument("--backend", choices=("auto", "reference", "triton"), default=None, help="(auto)")
    p.add_argument("--out", default="condensed_model", help="folder for the fine-tuned checkpoint")
    p.add_argument("--steps", type=_int_at_least(1), default=200)
    p.add_argument("--lam", type=_finite(minimum=0.0), default=0.1, help="regularizer weight")
    p.add_argument("--lr", type=_finite(positive=True), default=3e-4)
    p.add_argument("--kind", choices=("logmass", "mass"), default="logmass")
    p.add_argument("--warmup", type=_int_at_least(0), default=20,
                   help="steps of linear warm-up of the regularizer weight")  # fmt: skip
    p.add_argument(
        "--distill",
        type=_finite(minimum=0.0, maximum=1.0),
        default=0.0,
        help="weight in [0, 1] of distillation to the model as loaded (KL of next-token distributions)",
    )
    p.set_defaults(func=cmd_train, k_default=[16])
    _add_sweep_parser(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _user_errors() -> tuple[type[BaseException], ...]:
    return (ValueError, TypeError, ImportError, *_write_errors())


def _prepare(argv: list[str]):
    """Parse and check everything that needs no model; raises :class:`UsageError` (or another user error)."""
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "k", None) is None:
        args.k = args.k_default
    args.thresholds_obj = None
    if getattr(args, "thresholds", None):
        from .ops.thresholds import Thresholds

        args.thresholds_obj = Thresholds.load(args.thresholds)
    _check_args(args)
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    started = False
    code = 2
    try:
        args = _prepare(argv)
        started = _start_group(args)
        code = args.func(args)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
        return 130
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        if started:
            import torch.distributed as dist

            if code == 0:
                dist.barrier()  # a process that failed exits at once; the launcher then stops the others
            dist.destroy_process_group()
