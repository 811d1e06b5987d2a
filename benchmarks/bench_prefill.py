"""Prefill benchmark: the Top-θ tiled prefill kernel against SDPA (flash, cuDNN, efficient), FlexAttention and the
matmul floor.

Goals (issue 14): bf16, causal, D=128, 4k-32k tokens: at a kept element fraction near 0.1 at least 1.2x SDPA's flash
backend (FlashAttention-2), and in dense mode (``theta=None`` through the same kernel) at least 0.95x of it. Prefill
is compute-bound and only P·V shrinks (Q·Kᵀ and the exponentials stay dense), so the floor is
``FLOPs / measured bf16 matmul rate`` with ``FLOPs = 2·B·Hq·D·P·(1 + (1 - skipped tile fraction))`` over the
``P = L(L+1)/2`` visible pairs (dense: ``4·B·Hq·D·P``), and the ceiling over dense is below 2x.

Inputs come from ``synthetic.structured_qkv`` (and, with ``--source model`` or ``both``, from the shipped model).
Thresholds are calibrated the package's way on the inputs themselves (``synthetic.calibrate_theta``: the (k+1)-th
largest visible score of sampled rows, mean + 0.1·std per row-length point) with ``k = target · L / 2``, which keeps
about ``target`` of the causal elements (rows with ``n <= k`` stay dense, ``k_dense = k``); the record holds the
kept fraction actually measured and the fraction of K/V tiles in which nothing was kept. Every sparse main-loop
variant of the kernel (``--variants``: "pipelined", "skip_dot", "skip_load"; see kernels/prefill.py) is timed on the
same thresholds, side by side. Correctness is checked against the float32 reference on the first and the last
``CHECK_ROWS`` query rows of each timed specialisation's output (and of the statistics run, whose kept counts are
compared too) before it is timed (the full reference is quadratic in memory). One record per (shape, target,
variant); ``variant`` "dense" for ``theta=None``. ``speedup_vs_sdpa`` is against the fastest SDPA backend that ran,
``speedup_vs_sdpa_flash`` against flash (the goals' yardstick). Tile configs: autotuned, or with
``SPARSE_ATTENTION_AUTOTUNE=0`` the first one the fit rule allows (``block_config`` in the record).

Run: ``python benchmarks/bench_prefill.py [--quick] [--out FILE]`` (``--help`` for the rest); ``--shapes
bf16:128:32:8:16384,...`` times those shapes in that order (benchmarks/first_run.sh does).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import dataclass

import harness
import synthetic
import torch
import triton

from sparse_attention.kernels import config as kernel_config
from sparse_attention.kernels import prefill
from sparse_attention.ops import reference
from sparse_attention.ops.attention import run
from sparse_attention.ops.contract import prepare_call

# (dtype, D, Hq, Hkv): D=128 as in Llama-style GQA models, D=64 as in GPT-2-style multi-head models.
CONFIGS = (("bf16", 128, 32, 8), ("fp16", 64, 16, 16), ("fp16", 128, 32, 8), ("bf16", 64, 16, 16))
LENGTHS = (4096, 8192, 16384, 32768)
# Quick: both dtypes and both head dims at a short and a long length (each (dtype, D) pair costs its compiles).
QUICK_SHAPES = (("bf16", 128, 32, 8, 4096), ("bf16", 128, 32, 8, 16384), ("fp16", 64, 16, 16, 4096),
                ("fp16", 64, 16, 16, 16384))  # fmt: skip
KEPT_TARGETS = (0.1, 0.03, 0.3)
QUICK_KEPT_TARGETS = (0.1,)
# Sparse mode's main-loop strategies (kernels/prefill.py VARIANTS), each timed on the same thresholds.
VARIANTS = tuple(prefill.VARIANTS)
# SDPA backends timed; math materialises the [B, Hq, L, L] scores and only runs where they fit.
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")
QUICK_SDPA_BACKENDS = ("flash", "cudnn", "efficient")
# Goals (issue 14), against SDPA's flash backend (FlashAttention-2): sparse at a kept fraction near GOAL_TARGET, dense.
GOAL_SPEEDUP = 1.2
GOAL_DENSE_RATIO = 0.95
GOAL_TARGET = 0.1
CHECK_ROWS = 128
CALIBRATION_SIGMA = 0.1
# Model source: fp16 (the model's D is small; fp16 shares compiled kernels with the fp16 shapes), 8 text slots.
MODEL_DTYPE = "fp16"
MODEL_SLOTS = 8
MODEL_LENGTHS = (4096,)
SMOKE = dict(shapes=(("fp32", 64, 2, 1, 128),), targets=(0.1,))


def _shapes(text: str) -> tuple[tuple[str, int, int, int, int], ...]:
    shapes = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 5 or parts[0] not in harness.DTYPES or not all(p.isdigit() for p in parts[1:]):
            raise argparse.ArgumentTypeError(f"--shapes takes DTYPE:D:HQ:HKV:L items, e.g. bf16:128:32:8:16384; got "
                                             f"{item!r}")  # fmt: skip
        shapes.append((parts[0], *(int(p) for p in parts[1:])))
    return tuple(shapes)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--variants must be among {VARIANTS}, got {text!r}")
    return names


def parse_args(argv=None):
    parser = harness.common_parser(__doc__.splitlines()[0], "prefill.json")
    parser.add_argument("--lengths", type=lambda t: tuple(int(x) for x in t.split(",") if x), default=None)
    parser.add_argument("--targets", type=lambda t: tuple(float(x) for x in t.split(",") if x), default=None)
    parser.add_argument(
        "--shapes", type=_shapes, default=None,
        help="DTYPE:D:HQ:HKV:L items in order, e.g. bf16:128:32:8:16384; replaces the built-in shapes and --lengths",
    )  # fmt: skip
    parser.add_argument(
        "--variants", type=_names, default=VARIANTS,
        help=f"sparse main-loop variants to time, comma-separated (default {','.join(VARIANTS)})",
    )  # fmt: skip
    parser.add_argument("--source", choices=("synthetic", "model", "both"), default="both")
    return parser.parse_args(argv)


def _backend(args) -> str:
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return args.backend
    return "reference"


def _ours(q, k, v, theta, k_dense: int, backend: str, *, stats: bool = False):
    """The package's path (``ops.attention.run``): the default main-loop variant."""
    call = prepare_call(q, k, v, theta, k_dense=k_dense, return_stats=stats)
    return lambda: run(call, backend)


def _reference_call(q, k, v, *, theta, k_dense: int, backend: str):
    """The package's path without statistics, returning the output (the sparse timing of a non-Triton backend)."""
    timed = _ours(q, k, v, theta, k_dense, backend)
    return lambda: timed()[0]


def _launch(q, k, v, *, theta, k_dense: int, variant: str):
    """The prefill launcher with one main-loop ``variant`` (no statistics): the call the ops layer makes, with the
    variant the ops layer does not expose. Returns the output."""
    call = prepare_call(q, k, v, theta, k_dense=k_dense)
    kwargs = dict(
        theta=call.theta, sdc_table=call.sdc_table, sinks=call.sinks, attn_mask=call.attn_mask,
        key_padding=None if call.key_padding is None else call.key_padding.as_tuple(), k_dense=call.k_dense,
        sm_scale=call.scale, softcap=call.softcap, causal=call.causal, q_offset=call.q_offset,
        placement=call.placement, sdc=call.sdc, sdc_scale=call.sdc_scale, cap=call.cap, vmc=call.vmc,
        variant=variant,
    )  # fmt: skip
    return lambda: prefill.top_theta_prefill(call.query, call.key, call.value, **kwargs).out


def _references(q, k, v, theta, k_dense) -> list:
    """``(rows, reference output, reference stats)`` for the first and the last CHECK_ROWS rows of the causal call
    (rows are independent; the full reference is quadratic in memory)."""
    lq = q.shape[2]
    n_rows = min(CHECK_ROWS, lq)
    refs = []
    for start in sorted({0, lq - n_rows}):
        stop = start + n_rows
        # Row i sees keys 0..i: the first rows need only the first keys; the reference aligns them with q_offset.
        ref, ref_stats = reference.top_theta_attention(
            q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], theta, k_dense=k_dense, q_offset=start,
            return_stats=True,
        )  # fmt: skip
        refs.append((slice(start, stop), ref, ref_stats))
    return refs


def _compare(refs, outs, kept, dtype) -> dict:
    """The worst relative error of ``outs`` on the reference rows and, when the kernel's ``kept`` counts are given,
    their mismatch against the reference's."""
    errs, mismatch, visible = [], 0, 0
    for rows, ref, ref_stats in refs:
        errs += [harness.rel_error(out[:, :, rows], ref) for out in outs]
        if kept is not None:
            mismatch += int((kept[:, :, rows].long() - ref_stats.kept.long()).abs().sum())
            visible += int(ref_stats.visible.long().sum())
    err = max(errs)
    frac = None if kept is None else mismatch / max(1, visible)
    ok = err <= harness.REL_TOL[dtype] and (frac is None or frac <= harness.KEPT_MISMATCH_TOL)
    return {"check_rel_err": harness.json_number(err), "check_kept_mismatch": frac, "check_ok": bool(ok)}


def _flops(b: int, hq: int, d: int, length: int, skipped: float) -> float:
    """Q·Kᵀ over every visible pair plus P·V over the tiles not skipped."""
    pairs = length * (length + 1) / 2
    return 2 * b * hq * d * pairs * (1 + (1 - skipped))


def _block_config(q, v) -> list | str:
    """The tile config a launch without ``block_config`` runs: "autotuned", or the first config the fit rule allows
    (``SPARSE_ATTENTION_AUTOTUNE=0``, and always under the interpreter)."""
    if kernel_config.AUTOTUNE:
        return "autotuned"
    shared = prefill._device_shared_memory(q.device.index or 0) if q.is_cuda else 1 << 30
    dims = [triton.next_power_of_2(t.shape[-1]) for t in (q, v)]
    return list(prefill.fitting_configs(*dims, q.element_size(), shared)[0])


def _thresholds(q, k, length: int, targets) -> list[dict]:
    """Calibrated thresholds per kept target (k = target · L / 2; rows with n <= k stay dense)."""
    out = []
    for target in targets:
        top_k = max(1, round(target * length / 2))
        theta = synthetic.calibrate_theta(q, k, top_k, sigma=CALIBRATION_SIGMA)
        method = {"method": "calibrated, k = target * L / 2", "target": target, "k": top_k, "sigma": CALIBRATION_SIGMA}
        out.append({"target": target, "theta": theta, "k_dense": top_k, "threshold": method})
    return out


@dataclass
class _Shape:
    """What every record of one shape shares: inputs, rotated copies, timing options, baselines, record fields."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    sets: list
    opts: dict
    base: dict
    common: dict
    writer: harness.ResultWriter
    env: dict
    rates: dict
    input_mb: float
    dense_ms: float | None = None

    @property
    def label(self) -> str:
        return str(self.common["shape"])


def _fail(shape: _Shape, label: str, exc: Exception) -> None:
    """One failing variant is logged and recorded as a failure; the rest of the shape still runs."""
    line = f"prefill {shape.label} {label}: {type(exc).__name__}: {str(exc)[:300]}"
    harness.log(f"  FAILED {line}")
    shape.writer.failures.append(line)
    harness.release()


def _emit(shape: _Shape, *, variant: str, theta, target, threshold: dict, fns, check: dict, kept: float,
          skipped, total_tiles) -> None:  # fmt: skip
    """Time ``fns`` (a factory of the timed call on one input set) and write its record."""
    q, k, v = shape.q, shape.k, shape.v
    b, hq, length, d = q.shape
    base, matmul = shape.base, shape.rates["matmul_tflops"]
    timing = dict(base["timing"])
    ms, timing["ours"] = harness.time_ms([fns(*s) for s in shape.sets], **shape.opts)
    peak = harness.peak_memory_mb(fns(q, k, v))
    if theta is None:
        shape.dense_ms = ms
    dense_flops = _flops(b, hq, d, length, 0.0)
    flops = dense_flops if theta is None else _flops(b, hq, d, length, skipped or 0.0)
    sdpa_ms, sdpa_backend = harness.best_sdpa(base["sdpa_all_ms"])
    goal = GOAL_DENSE_RATIO if theta is None else GOAL_SPEEDUP
    record = harness.make_record(
        "prefill", shape.env, shape.rates, **shape.common, variant=variant, target=target, threshold=threshold, ms=ms,
        sdpa_ms=sdpa_ms, sdpa_backend=sdpa_backend, sdpa_all_ms=base["sdpa_all_ms"],
        **harness.sdpa_fields(base["sdpa_all_ms"]), sdpa_errors=base["sdpa_errors"],
        sdpa_expanded_kv=base["sdpa_expanded_kv"],
        sdpa_peak_mem_mb=base["sdpa_peak_mem_mb"], flex_ms=base["flex_ms"], flex_error=base["flex_error"],
        floor_ms=None if matmul is None else flops / (matmul * 1e12) * 1e3,
        floor_dense_ms=None if matmul is None else dense_flops / (matmul * 1e12) * 1e3,
        speedup_vs_sdpa=harness.ratio(sdpa_ms, ms),
        speedup_vs_sdpa_flash=harness.ratio(base["sdpa_all_ms"].get("flash"), ms),
        speedup_vs_flex=harness.ratio(base["flex_ms"], ms), speedup_vs_dense=harness.ratio(shape.dense_ms, ms),
        goal={"speedup_vs_sdpa_flash": goal, "applies": theta is None or target == GOAL_TARGET},
        kept_element_fraction=kept, skipped_tile_fraction=skipped, total_tiles=total_tiles,
        dense_mode=theta is None, gbps=None, tflops_dense_equivalent=dense_flops / (ms * 1e-3) / 1e12,
        peak_mem_mb=peak, input_mb=shape.input_mb, timing=timing, **check,
    )  # fmt: skip
    shape.writer.add(record)
    if not record["check_ok"]:
        shape.writer.failures.append(harness.summary_line(record))
    harness.log(harness.summary_line(record))


def _run_dense(shape: _Shape, backend: str) -> None:
    q, k, v = shape.q, shape.k, shape.v
    out = _ours(q, k, v, None, 0, backend)()[0]
    check = _compare(_references(q, k, v, None, 0), (out,), None, q.dtype)
    del out
    _emit(shape, variant="dense", theta=None, target=None, threshold={"method": "dense (theta=None)"},
          fns=lambda *s: _ours(*s, None, 0, backend), check=check, kept=1.0, skipped=0.0, total_tiles=None)  # fmt: skip


def _run_sparse(shape: _Shape, item: dict, variants, backend: str) -> None:
    """One thresholds target: its statistics run once (every variant makes the same keep decisions: kept and tile
    counts, checked with the kept counts), then each variant's timed specialisation, checked, then timed."""
    q, k, v = shape.q, shape.k, shape.v
    theta, k_dense, target = item["theta"], item["k_dense"], item["target"]
    out, stats = _ours(q, k, v, theta, k_dense, backend, stats=True)()
    kept = float(stats.kept.sum()) / max(1, int(stats.visible.sum()))
    total_tiles = harness.number(stats.total_tiles)
    skipped = harness.ratio(harness.number(stats.skipped_tiles), total_tiles)
    refs = _references(q, k, v, theta, k_dense)
    stats_check = _compare(refs, (out,), stats.kept, q.dtype)
    del out, stats
    for variant in variants:
        try:
            if variant == "reference":
                fns = functools.partial(_reference_call, theta=theta, k_dense=k_dense, backend=backend)
            else:
                fns = functools.partial(_launch, theta=theta, k_dense=k_dense, variant=variant)
            out = fns(q, k, v)()
            check = _compare(refs, (out,), None, q.dtype)
            del out
            check["check_rel_err_stats_run"] = stats_check["check_rel_err"]
            check["check_kept_mismatch"] = stats_check["check_kept_mismatch"]
            check["check_ok"] = check["check_ok"] and stats_check["check_ok"]
            _emit(shape, variant=variant, theta=theta, target=target, threshold=item["threshold"], fns=fns,
                  check=check, kept=kept, skipped=skipped, total_tiles=total_tiles)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the rest of the run
            _fail(shape, f"target={target} {variant}", exc)


def run_shape(qkv: synthetic.QKV, args, writer, env, rates, *, targets, flex: bool) -> None:
    """One shape: the SDPA (and Flex) baselines, dense mode, then each target in every main-loop variant on the
    same thresholds. Each timed specialisation's output is checked against the float32 reference before it is
    timed."""
    q, k, v = qkv.query, qkv.key, qkv.value
    b, hq, length, d = q.shape
    backend = _backend(args)
    opts = dict(warmup_ms=args.warmup_ms, rep_ms=harness.rep_ms(args), graph=not args.no_graph)
    sets = harness.input_copies((q, k, v), harness.rotation_count(qkv.nbytes))
    backends = args.sdpa_backends or (QUICK_SDPA_BACKENDS if args.quick else SDPA_BACKENDS)
    base = harness.attention_baselines(sets, causal=True, flex=flex, backends=backends, **opts)
    common = dict(
        source=qkv.info["source"], inputs=qkv.info, backend=backend, dtype=harness.DTYPE_NAMES[q.dtype],
        shape={"B": b, "Hq": hq, "Hkv": k.shape[1], "Lq": length, "Lk": length, "D": d}, causal=True,
        block_config=_block_config(q, v), autotune=os.environ.get("SPARSE_ATTENTION_AUTOTUNE", "1"),
    )  # fmt: skip
    shape = _Shape(q, k, v, sets, opts, base, common, writer, env, rates, qkv.nbytes / harness.MIB)
    try:
        _run_dense(shape, backend)
    except Exception as exc:  # noqa: BLE001 - recorded; the sparse variants still run
        _fail(shape, "dense", exc)
    variants = args.variants if backend == "triton" else ("reference",)
    for item in _thresholds(q, k, length, targets):
        try:
            _run_sparse(shape, item, variants, backend)
        except Exception as exc:  # noqa: BLE001 - recorded; the next target still runs
            _fail(shape, f"target={item['target']}", exc)
    harness.release()


def _run_job(source, dtype_name, heads, length, args, writer, env, rates, device, *, targets, flex) -> None:
    d, hq, hkv = heads
    dtype = harness.DTYPES[dtype_name]
    if source == "synthetic":
        structure = synthetic.StructureConfig(**args.structure)
        qkv = synthetic.structured_qkv(1, hq, hkv, length, d, dtype=dtype, device=device, seed=args.seed,
                                       config=structure)  # fmt: skip
    else:
        try:
            qkv = synthetic.captured_qkv(length, 1 if args.smoke else MODEL_SLOTS, dtype=dtype, device=device)
        except synthetic.ModelUnavailable as exc:
            harness.log(f"  skipped: {exc}")
            return
    run_shape(qkv, args, writer, env, rates, targets=targets, flex=flex)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = harness.device_for(args)
    writer = harness.ResultWriter(args.out)
    env, rates = harness.environment(), harness.machine_rates()
    deadline = harness.Deadline(args.time_budget)
    synthetic.StructureConfig(**args.structure)  # an unknown --structure key fails here, not in every shape
    if args.smoke:
        shapes, targets = SMOKE["shapes"], SMOKE["targets"]
    elif args.quick:
        shapes, targets = QUICK_SHAPES, QUICK_KEPT_TARGETS
    else:
        shapes = tuple(c + (length,) for c in CONFIGS for length in LENGTHS)
        targets = KEPT_TARGETS
    if args.lengths:
        configs = dict.fromkeys(s[:4] for s in shapes)
        shapes = tuple(c + (length,) for c in configs for length in args.lengths)
    shapes = args.shapes or shapes
    targets = args.targets or targets
    jobs = []
    if args.source in ("synthetic", "both"):
        jobs += [("synthetic",) + s for s in shapes]
    if args.source in ("model", "both"):
        model_dtype = shapes[0][0] if args.smoke else MODEL_DTYPE
        lengths = (shapes[0][4],) if args.smoke else MODEL_LENGTHS
        jobs += [("model", model_dtype, None, None, None, length) for length in lengths]
    flex_seen: set = set()
    for source, dtype_name, d, hq, hkv, length in jobs:
        if deadline.expired():
            harness.log(f"time budget spent: skipping prefill {source} {dtype_name} L={length} and later shapes")
            break
        label = f"prefill {source} {dtype_name} D={d} Hq={hq} Hkv={hkv} L={length}"
        harness.log(label)
        # Quick runs time FlexAttention once per (dtype, head dim): each new shape costs it a compile.
        flex = not args.no_flex and (not args.quick or (dtype_name, d) not in flex_seen)
        flex_seen.add((dtype_name, d))
        harness.guarded(writer, label, _run_job, source, dtype_name, (d, hq, hkv), length, args, writer, env, rates,
                        device, targets=targets, flex=flex)  # fmt: skip
    harness.log(f"wrote {len(writer.records)} prefill records to {writer.path}")
    for line in writer.failures:
        harness.log(f"FAILED: {line}")
    return 1 if writer.failures else 0


if __name__ == "__main__":
    sys.exit(main())
