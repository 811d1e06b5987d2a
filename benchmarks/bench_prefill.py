"""Prefill benchmark: the Top-θ tiled prefill kernel against SDPA's flash backend, FlexAttention and the matmul floor.

Issue 7's prefill goal: bf16 and fp16, causal, D=64 and 128, 4k-32k tokens, a kept element fraction near 0.1: at
least 1.2x SDPA's flash backend, and in dense mode (``theta=None`` through the same kernel) at least 0.85x of it.
Prefill is compute-bound and only P·V shrinks (Q·Kᵀ and the exponentials stay dense), so the floor is
``FLOPs / measured bf16 matmul rate`` with ``FLOPs = 2·B·Hq·D·P·(1 + (1 - skipped tile fraction))`` over the
``P = L(L+1)/2`` visible pairs (dense: ``4·B·Hq·D·P``), and the ceiling over dense is below 2x.

Inputs come from ``synthetic.structured_qkv`` (and, with ``--source model`` or ``both``, from the shipped model).
Thresholds are calibrated the package's way on the inputs themselves (``synthetic.calibrate_theta``: the (k+1)-th
largest visible score of sampled rows, mean + 0.1·std per row-length point) with ``k = target · L / 2``, which keeps
about ``target`` of the causal elements (rows with ``n <= k`` stay dense, ``k_dense = k``); the record holds the
kept fraction actually measured and the fraction of P·V tiles the kernel skipped. Correctness is checked against the
float32 reference on the first and the last ``CHECK_ROWS`` query rows of the timed call's output (the full reference
is quadratic in memory). One record per (shape, variant): ``dense_mode`` true for ``theta=None``.

Run: ``python benchmarks/bench_prefill.py [--quick] [--out FILE]`` (``--help`` for the rest).
"""

from __future__ import annotations

import os
import sys

import harness
import synthetic
import torch

from sparse_attention.ops import reference
from sparse_attention.ops.attention import run
from sparse_attention.ops.contract import prepare_call

# (dtype, D, Hq, Hkv): D=128 as in Llama-style GQA models, D=64 as in GPT-2-style multi-head models.
CONFIGS = (("bf16", 128, 32, 8), ("fp16", 64, 16, 16), ("fp16", 128, 32, 8), ("bf16", 64, 16, 16))
LENGTHS = (4096, 8192, 16384, 32768)
# Quick: both dtypes and both head dims at a short and a long length (each (dtype, D) pair costs an autotune).
QUICK_SHAPES = (("bf16", 128, 32, 8, 4096), ("bf16", 128, 32, 8, 16384), ("fp16", 64, 16, 16, 4096),
                ("fp16", 64, 16, 16, 16384))  # fmt: skip
KEPT_TARGETS = (0.1, 0.03, 0.3)
QUICK_KEPT_TARGETS = (0.1,)
GOAL_SPEEDUP = 1.2
GOAL_DENSE_RATIO = 0.85
CHECK_ROWS = 128
CALIBRATION_SIGMA = 0.1
# Model source: fp16 (the model's D is small; fp16 shares compiled kernels with the fp16 shapes), 8 text slots.
MODEL_DTYPE = "fp16"
MODEL_SLOTS = 8
MODEL_LENGTHS = (4096,)
SMOKE = dict(shapes=(("fp32", 64, 2, 1, 128),), targets=(0.1,))


def parse_args(argv=None):
    parser = harness.common_parser(__doc__.splitlines()[0], "prefill.json")
    parser.add_argument("--lengths", type=lambda t: tuple(int(x) for x in t.split(",") if x), default=None)
    parser.add_argument("--targets", type=lambda t: tuple(float(x) for x in t.split(",") if x), default=None)
    parser.add_argument("--source", choices=("synthetic", "model", "both"), default="both")
    return parser.parse_args(argv)


def _backend(args) -> str:
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return args.backend
    return "reference"


def _ours(q, k, v, theta, k_dense: int, backend: str, *, stats: bool = False):
    call = prepare_call(q, k, v, theta, k_dense=k_dense, return_stats=stats)
    return lambda: run(call, backend)


def _check(q, k, v, theta, k_dense, outs, kept, dtype) -> dict:
    """Reference on the first and the last CHECK_ROWS rows of the causal call (rows are independent), for each of
    ``outs`` (the statistics run and the timed run, which are different kernel specialisations)."""
    lq = q.shape[2]
    rows = min(CHECK_ROWS, lq)
    errs, mismatch, visible = [], 0, 0
    for start in sorted({0, lq - rows}):
        stop = start + rows
        # Row i sees keys 0..i: the first rows need only the first keys; the reference aligns them with q_offset.
        ref, ref_stats = reference.top_theta_attention(
            q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], theta, k_dense=k_dense, q_offset=start,
            return_stats=True,
        )  # fmt: skip
        errs += [harness.rel_error(out[:, :, start:stop], ref) for out in outs]
        mismatch += int((kept[:, :, start:stop].long() - ref_stats.kept.long()).abs().sum())
        visible += int(ref_stats.visible.long().sum())
    err = max(errs)
    frac = mismatch / max(1, visible)
    ok = err <= harness.REL_TOL[dtype] and frac <= harness.KEPT_MISMATCH_TOL
    return {"check_rel_err": harness.json_number(err), "check_kept_mismatch": frac, "check_ok": bool(ok)}


def _flops(b: int, hq: int, d: int, length: int, skipped: float) -> float:
    """Q·Kᵀ over every visible pair plus P·V over the tiles not skipped."""
    pairs = length * (length + 1) / 2
    return 2 * b * hq * d * pairs * (1 + (1 - skipped))


def run_shape(qkv: synthetic.QKV, args, writer, env, rates, *, targets, flex: bool) -> None:
    q, k, v = qkv.query, qkv.key, qkv.value
    dtype = q.dtype
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    backend = _backend(args)
    opts = dict(warmup_ms=args.warmup_ms, rep_ms=harness.rep_ms(args), graph=not args.no_graph)
    sets = harness.input_copies((q, k, v), harness.rotation_count(qkv.nbytes))
    base = harness.attention_baselines(sets, causal=True, flex=flex, **opts)
    sdpa_ms, sdpa_backend = harness.best_sdpa(base["sdpa_all_ms"], preferred="flash")
    shape = {"B": b, "Hq": hq, "Hkv": hkv, "Lq": length, "Lk": length, "D": d}
    matmul = rates["matmul_tflops"]
    dense_flops = _flops(b, hq, d, length, 0.0)
    variants = [{"name": "dense", "theta": None, "k_dense": 0, "threshold": {"method": "dense (theta=None)"}}]
    for target in targets:
        top_k = max(1, round(target * length / 2))
        theta = synthetic.calibrate_theta(q, k, top_k, sigma=CALIBRATION_SIGMA)
        variants.append(
            {
                "name": f"calibrated target={target}",
                "theta": theta,
                "k_dense": top_k,
                "threshold": {
                    "method": "calibrated, k = target * L / 2",
                    "target": target,
                    "k": top_k,
                    "sigma": CALIBRATION_SIGMA,
                },
            }  # fmt: skip
        )
    dense_ms = None
    for variant in variants:
        try:
            theta, k_dense = variant["theta"], variant["k_dense"]
            out, stats = _ours(q, k, v, theta, k_dense, backend, stats=True)()
            kept = float(stats.kept.sum()) / max(1, int(stats.visible.sum()))
            skipped = None
            if stats.total_tiles:
                skipped = stats.skipped_tiles / stats.total_tiles
            timed_out = _ours(q, k, v, theta, k_dense, backend)()[0]
            check = _check(q, k, v, theta, k_dense, (out, timed_out), stats.kept, dtype)
            total_tiles = stats.total_tiles
            del out, stats, timed_out
            timing = dict(base["timing"])
            ms, timing["ours"] = harness.time_ms([_ours(*s, theta, k_dense, backend) for s in sets], **opts)
            peak = harness.peak_memory_mb(_ours(q, k, v, theta, k_dense, backend))
            if theta is None:
                dense_ms = ms
            flops = dense_flops if theta is None else _flops(b, hq, d, length, skipped or 0.0)
            record = harness.make_record(
                "prefill",
                env,
                rates,
                source=qkv.info["source"],
                inputs=qkv.info,
                variant=variant["name"],
                threshold=variant["threshold"],
                backend=backend,
                dtype=harness.DTYPE_NAMES[dtype],
                shape=shape,
                causal=True,
                ms=ms,
                sdpa_ms=sdpa_ms,
                sdpa_backend=sdpa_backend,
                sdpa_all_ms=base["sdpa_all_ms"],
                sdpa_errors=base["sdpa_errors"],
                sdpa_peak_mem_mb=base["sdpa_peak_mem_mb"],
                flex_ms=base["flex_ms"],
                flex_error=base["flex_error"],
                floor_ms=None if matmul is None else flops / (matmul * 1e12) * 1e3,
                floor_dense_ms=None if matmul is None else dense_flops / (matmul * 1e12) * 1e3,
                speedup_vs_sdpa=harness.ratio(sdpa_ms, ms),
                speedup_vs_flex=harness.ratio(base["flex_ms"], ms),
                speedup_vs_dense=harness.ratio(dense_ms, ms),
                goal={"speedup_vs_sdpa": GOAL_DENSE_RATIO if theta is None else GOAL_SPEEDUP},
                kept_element_fraction=kept,
                skipped_tile_fraction=skipped,
                total_tiles=total_tiles,
                dense_mode=theta is None,
                gbps=None,
                tflops_dense_equivalent=dense_flops / (ms * 1e-3) / 1e12,
                peak_mem_mb=peak,
                input_mb=qkv.nbytes / harness.MIB,
                autotune=os.environ.get("SPARSE_ATTENTION_AUTOTUNE", "1"),
                timing=timing,
                **check,
            )
            writer.add(record)
            if not record["check_ok"]:
                writer.failures.append(harness.summary_line(record))
            harness.log(harness.summary_line(record))
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the rest of the run
            line = f"prefill {shape} {variant['name']}: {type(exc).__name__}: {str(exc)[:300]}"
            harness.log(f"  FAILED {line}")
            writer.failures.append(line)
            harness.release()
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
