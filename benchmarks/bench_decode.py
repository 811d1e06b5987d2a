"""Decode benchmark: Top-θ split-K decode against SDPA (best backend), FlexAttention and the bandwidth floor.

Issue 7's decode goal: bf16, D=128, Hq=32, Hkv=8, cached keys 8k / 32k / 128k, batch 1 and 16. A decode step is
memory-bound: it must read all of K (to score it), the kept V rows and write the output, so the floor is
``(K + f_v · V + Q + O bytes) / measured copy bandwidth`` and the ideal speedup over a dense kernel ``2 / (1 + f_v)``
(DESIGN.md, "Performance yardsticks"). Goals: at least 1.3x the best SDPA backend near ``f_v = 0.3``, and at least
80% of the copy bandwidth on the bytes that must move.

Inputs come from ``synthetic.structured_qkv`` (and, with ``--source model`` or ``both``, from the shipped model). The
thresholds of the ``f_v`` sweep come from ``synthetic.theta_for_kept_v_fraction`` (one per-head quantile level,
bisected to the target kept V-row fraction); one more point uses thresholds calibrated the package's way
(``synthetic.calibrate_theta`` at k = ``CALIBRATED_K`` on 64 query rows just before the decode position), and one
runs dense (``theta=None`` through the same kernel). Every variant is checked against the float32 reference before
it is timed. One record per (shape, variant); see ``harness.py`` for the timing method and the record format.

Run: ``python benchmarks/bench_decode.py [--quick] [--out FILE]`` (``--help`` for the rest); ``--pairs 16x32768,1x8192``
times those (batch, cached keys) pairs in that order (benchmarks/first_run.sh does).
"""

from __future__ import annotations

import argparse
import os
import sys

import harness
import synthetic
import torch

from sparse_attention.ops import reference
from sparse_attention.ops.attention import run
from sparse_attention.ops.contract import prepare_call

HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128
LENGTHS = (8192, 32768, 131072)
BATCHES = (1, 16)
TARGETS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
QUICK_TARGETS = (0.1, 0.3, 1.0)
# SDPA backends timed: quick runs leave out math, which materialises the scores and is never the fastest at decode.
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
QUICK_SDPA_BACKENDS = ("flash", "efficient", "cudnn")
GOAL_TARGET = 0.3  # the f_v the speedup goal is stated at
GOAL_F_V_SLACK = 0.05  # a record within this of GOAL_TARGET is held to the goal
GOAL_MIN_KEYS = 32768  # ... from this many cached keys up
CALIBRATED_K = 256
CALIBRATED_K_MIN_RATIO = 8  # k is at most Lk / 8
CALIBRATION_QUERIES = 64  # query rows just before the decode position that the calibrated thresholds are fit on
GOAL_SPEEDUP = 1.3
GOAL_BANDWIDTH_FRACTION = 0.8
# Model source: its native heads and head dim, 8 text slots stacked over heads, one length.
MODEL_SLOTS = 8
MODEL_LENGTHS = (8192,)
# Quick mode times FlexAttention on this many shapes only (each new shape costs a compile).
QUICK_FLEX_SHAPES = 2
# Batch entries the reference checks (first and last): the reference upcasts K and V to float32.
CHECK_BATCH = (0, -1)
# Smoke shapes (CPU, float32): small enough for the Triton interpreter.
SMOKE = dict(heads_q=4, heads_kv=2, head_dim=64, lengths=(256,), batches=(1, 2), targets=(0.3, 1.0))


def parse_args(argv=None):
    parser = harness.common_parser(__doc__.splitlines()[0], "decode.json")
    parser.add_argument("--lengths", type=_ints, default=None, help="cached keys, comma-separated")
    parser.add_argument("--batches", type=_ints, default=None, help="batch sizes, comma-separated")
    parser.add_argument(
        "--pairs", type=_pairs, default=None, help="(batch, cached keys) pairs in order, e.g. 16x32768,1x8192; "
        "replaces --lengths and --batches",
    )  # fmt: skip
    parser.add_argument("--no-calibrated", action="store_true", help="leave out the calibrated-threshold variant")
    parser.add_argument("--targets", type=_floats, default=None, help="kept V-row fractions to sweep")
    parser.add_argument("--source", choices=("synthetic", "model", "both"), default="both")
    parser.add_argument("--dtype", choices=tuple(harness.DTYPES), default="bf16")
    return parser.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _pairs(text: str) -> tuple[tuple[int, int], ...]:
    pairs = []
    for item in text.split(","):
        batch, sep, length = item.strip().partition("x")
        if not sep or not batch.isdigit() or not length.isdigit():
            raise argparse.ArgumentTypeError(f"--pairs takes BATCHxKEYS items, e.g. 16x32768; got {item!r}")
        pairs.append((int(batch), int(length)))
    return tuple(pairs)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _backend(args) -> str:
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return args.backend
    return "reference"  # smoke run on a CPU without the interpreter


def _ours(q, k, v, theta, backend: str, *, stats: bool = False):
    call = prepare_call(q, k, v, theta, return_stats=stats)
    return lambda: run(call, backend)


def _check(q, k, v, theta, outs, kept, dtype) -> dict:
    """Reference check on the first and last batch entries: the worst output error among ``outs`` (the statistics
    run and the timed run, which are different kernel specialisations) and, when the kernel's ``kept`` counts are
    given, their mismatch against the reference's (dense mode keeps every key by construction: no counts)."""
    idx = torch.tensor(sorted({i % q.shape[0] for i in CHECK_BATCH}), device=q.device)
    ref, ref_stats = reference.top_theta_attention(q[idx], k[idx], v[idx], theta, return_stats=True)
    checks = [harness.check_result(out[idx], ref, dtype) for out in outs]
    result = min(checks, key=lambda r: (r["check_ok"], -(r["check_rel_err"] or 0.0)))  # the worse one
    result["check_kept_mismatch"] = None
    if kept is not None:
        mismatch = (kept[idx].long() - ref_stats.kept.long()).abs().sum() / ref_stats.visible.long().sum().clamp_min(1)
        result["check_kept_mismatch"] = float(mismatch)
        result["check_ok"] = result["check_ok"] and float(mismatch) <= harness.KEPT_MISMATCH_TOL
    return result


def _bytes(q, k, v, f_v: float) -> float:
    """Bytes a decode step must move: all of K, the kept V rows, the query and the output."""
    elt = k.element_size()
    return k.numel() * elt + f_v * v.numel() * elt + 2 * q.numel() * q.element_size()


def _variants(qkv: synthetic.QKV, q, targets, *, calibrate: bool) -> list[dict]:
    """Threshold variants: dense, calibrated (if asked), and the f_v sweep."""
    variants = [{"name": "dense", "theta": None, "threshold": {"method": "dense (theta=None)"}}]
    if calibrate:
        cal_q = qkv.query[:, :, :-1]
        offset = qkv.key.shape[2] - CALIBRATION_QUERIES - 1
        top_k = min(CALIBRATED_K, qkv.key.shape[2] // CALIBRATED_K_MIN_RATIO)  # smoke shapes are short
        theta = synthetic.calibrate_theta(cal_q, qkv.key, top_k, q_offset=offset)
        variants.append(
            {
                "name": f"calibrated k={top_k}",
                "theta": theta,
                "threshold": {"method": "calibrated", "k": top_k, "sigma": 0.1, "rows": cal_q.shape[2]},
            }
        )
    for target in targets:
        theta, achieved = synthetic.theta_for_kept_v_fraction(q, qkv.key, target)
        variants.append(
            {
                "name": f"f_v={target}",
                "theta": theta,
                "threshold": {"method": "per-head quantile bisected to a kept V-row fraction", "target_f_v": target},
            }
        )
    return variants


def _measure(q, k, v, theta, backend: str, dtype) -> dict:
    """Kept fractions and the reference check of one variant, before it is timed. Dense mode runs the kernel once
    (its specialisation without statistics, the one timed): it keeps every key by construction. A sparse variant
    runs with statistics (its kept V rows) and without (the specialisation timed); both outputs are checked."""
    b, hkv, lk = k.shape[0], k.shape[1], k.shape[2]
    if theta is None:
        out = _ours(q, k, v, None, backend)()[0]
        return {"f_v": 1.0, "kept": 1.0, **_check(q, k, v, None, (out,), None, dtype)}
    out, stats = _ours(q, k, v, theta, backend, stats=True)()
    f_v = float(stats.kept_v_rows.sum()) / (b * hkv * lk)
    kept = float(stats.kept.sum()) / max(1, int(stats.visible.sum()))
    timed_out = _ours(q, k, v, theta, backend)()[0]
    return {"f_v": f_v, "kept": kept, **_check(q, k, v, theta, (out, timed_out), stats.kept, dtype)}


def run_shape(qkv: synthetic.QKV, args, writer, env, rates, *, flex: bool, targets, calibrate: bool) -> None:
    q = qkv.query[:, :, -1:].contiguous()
    k, v = qkv.key, qkv.value
    dtype = q.dtype
    b, hq, _, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    backend = _backend(args)
    opts = dict(warmup_ms=args.warmup_ms, rep_ms=harness.rep_ms(args), graph=not args.no_graph)
    sets = harness.input_copies((q, k, v), harness.rotation_count(qkv.nbytes))
    backends = args.sdpa_backends or (QUICK_SDPA_BACKENDS if args.quick else SDPA_BACKENDS)
    base = harness.attention_baselines(sets, causal=False, flex=flex, backends=backends, **opts)
    sdpa_ms, sdpa_backend = harness.best_sdpa(base["sdpa_all_ms"])
    shape = {"B": b, "Hq": hq, "Hkv": hkv, "Lq": 1, "Lk": lk, "D": d}
    copy_gbps = rates["copy_gbps"]
    dense_ms = None
    for variant in _variants(qkv, q, targets, calibrate=calibrate):
        try:
            theta = variant["theta"]
            measured = _measure(q, k, v, theta, backend, dtype)
            f_v, kept = measured.pop("f_v"), measured.pop("kept")
            timing = dict(base["timing"])
            ms, timing["ours"] = harness.time_ms([_ours(*s, theta, backend) for s in sets], **opts)
            ms_eager = None  # launch overhead included: what an eager (not graph-captured) generate loop pays
            if timing["ours"] == "cuda_graph":
                ms_eager, _ = harness.time_ms([_ours(*s, theta, backend) for s in sets], **{**opts, "graph": False})
            peak = harness.peak_memory_mb(_ours(q, k, v, theta, backend))
            if theta is None:
                dense_ms = ms
            moved = _bytes(q, k, v, 1.0 if theta is None else f_v)
            gbps = moved / (ms * 1e-3) / 1e9
            floor_ms = None if copy_gbps is None else moved / (copy_gbps * 1e9) * 1e3
            record = harness.make_record(
                "decode",
                env,
                rates,
                source=qkv.info["source"],
                inputs=qkv.info,
                variant=variant["name"],
                threshold=variant["threshold"],
                backend=backend,
                dtype=harness.DTYPE_NAMES[dtype],
                shape=shape,
                ms=ms,
                ms_eager=ms_eager,
                sdpa_ms=sdpa_ms,
                sdpa_backend=sdpa_backend,
                sdpa_all_ms=base["sdpa_all_ms"],
                **harness.sdpa_fields(base["sdpa_all_ms"]),
                sdpa_errors=base["sdpa_errors"],
                sdpa_expanded_kv=base["sdpa_expanded_kv"],
                sdpa_peak_mem_mb=base["sdpa_peak_mem_mb"],
                flex_ms=base["flex_ms"],
                flex_error=base["flex_error"],
                floor_ms=floor_ms,
                floor_dense_ms=None if copy_gbps is None else _bytes(q, k, v, 1.0) / (copy_gbps * 1e9) * 1e3,
                speedup_vs_sdpa=harness.ratio(sdpa_ms, ms),
                speedup_vs_flex=harness.ratio(base["flex_ms"], ms),
                speedup_vs_dense=harness.ratio(dense_ms, ms),
                ideal_speedup_vs_dense=2 / (1 + f_v),
                kept_v_fraction=f_v,
                kept_element_fraction=kept,
                skipped_tile_fraction=None,
                dense_mode=theta is None,
                bytes_moved=moved,
                gbps=gbps,
                bandwidth_fraction=harness.ratio(gbps, copy_gbps),
                goal={
                    "speedup_vs_sdpa": GOAL_SPEEDUP,
                    "bandwidth_fraction": GOAL_BANDWIDTH_FRACTION,
                    "applies": theta is not None and lk >= GOAL_MIN_KEYS and abs(f_v - GOAL_TARGET) <= GOAL_F_V_SLACK,
                },
                peak_mem_mb=peak,
                input_mb=qkv.nbytes / harness.MIB,
                timing=timing,
                **measured,
            )
            writer.add(record)
            if not record["check_ok"]:
                writer.failures.append(harness.summary_line(record))
            harness.log(harness.summary_line(record))
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the rest of the run
            line = f"decode {shape} {variant['name']}: {type(exc).__name__}: {str(exc)[:300]}"
            harness.log(f"  FAILED {line}")
            writer.failures.append(line)
            harness.release()
    harness.release()


def _run_job(source, lk, bsz, args, writer, env, rates, device, dtype, heads, *, targets, flex) -> None:
    hq, hkv, d = heads
    if source == "synthetic":
        structure = synthetic.StructureConfig(**args.structure)
        qkv = synthetic.structured_qkv(
            bsz, hq, hkv, lk, d, num_queries=CALIBRATION_QUERIES + 1, dtype=dtype, device=device, seed=args.seed,
            config=structure,
        )  # fmt: skip
    else:
        try:
            qkv = synthetic.captured_qkv(lk, 1 if args.smoke else MODEL_SLOTS, dtype=dtype, device=device)
        except synthetic.ModelUnavailable as exc:
            harness.log(f"  skipped: {exc}")
            return
    calibrate = source == "synthetic" and not args.no_calibrated
    run_shape(qkv, args, writer, env, rates, flex=flex, targets=targets, calibrate=calibrate)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = harness.device_for(args)
    writer = harness.ResultWriter(args.out)
    env, rates = harness.environment(), harness.machine_rates()
    deadline = harness.Deadline(args.time_budget)
    synthetic.StructureConfig(**args.structure)  # an unknown --structure key fails here, not in every shape
    dtype = harness.DTYPES[args.dtype]
    if args.smoke:
        hq, hkv, d = SMOKE["heads_q"], SMOKE["heads_kv"], SMOKE["head_dim"]
        lengths, batches, targets = SMOKE["lengths"], SMOKE["batches"], SMOKE["targets"]
        dtype = torch.float32 if device.type == "cpu" else dtype
    else:
        hq, hkv, d = HEADS_Q, HEADS_KV, HEAD_DIM
        lengths, batches = LENGTHS, BATCHES
        targets = QUICK_TARGETS if args.quick else TARGETS
    lengths, batches, targets = args.lengths or lengths, args.batches or batches, args.targets or targets
    pairs = args.pairs or tuple((bsz, lk) for lk in lengths for bsz in batches)
    lengths = tuple(lk for _, lk in pairs)
    flex_left = QUICK_FLEX_SHAPES if args.quick else len(pairs) + len(MODEL_LENGTHS)
    if args.no_flex:
        flex_left = 0
    jobs = []
    if args.source in ("synthetic", "both"):
        jobs += [("synthetic", lk, bsz) for bsz, lk in pairs]
    if args.source in ("model", "both"):
        jobs += [("model", lk, 1) for lk in ((min(lengths),) if args.smoke else MODEL_LENGTHS)]
    for source, lk, bsz in jobs:
        if deadline.expired():
            harness.log(f"time budget spent: skipping decode {source} Lk={lk} B={bsz} and later shapes")
            break
        label = f"decode {source} Lk={lk} B={bsz}"
        harness.log(label)
        flex = flex_left > 0
        flex_left -= 1
        harness.guarded(writer, label, _run_job, source, lk, bsz, args, writer, env, rates, device, dtype,
                        (hq, hkv, d), targets=targets, flex=flex)  # fmt: skip
    harness.log(f"wrote {len(writer.records)} decode records to {writer.path}")
    for line in writer.failures:
        harness.log(f"FAILED: {line}")
    return 1 if writer.failures else 0


if __name__ == "__main__":
    sys.exit(main())
