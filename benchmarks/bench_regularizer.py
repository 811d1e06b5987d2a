"""Regularizer benchmark: the fused condensation regularizer (forward + backward) against the materialised reference
and against SDPA forward + backward at the same shape: time and peak memory, 1k-16k tokens.

The fused kernels never write the ``Lq x Lk`` probability matrix, so their memory is O(L) beside the inputs and
gradients, while the reference's grows as L². Floors: the fused forward + backward computes Q·Kᵀ three times (the
forward and each backward kernel recompute it) plus dS·K and dSᵀ·Q, ``10·B·Hq·D·P`` FLOPs over the ``P = L(L+1)/2``
causal pairs; SDPA's forward + backward does ``14·B·Hq·D·P`` (FlashAttention-2 counting); both over the measured bf16
matmul rate. The fused loss and gradients are checked against the reference at ``min(L, CHECK_LENGTH)`` tokens
before timing. One record per length; see ``harness.py`` for the timing method and the record format (the timing of
backward passes is eager: autograd is not captured in CUDA graphs).

Run: ``python benchmarks/bench_regularizer.py [--quick] [--out FILE]`` (``--help`` for the rest).
"""

from __future__ import annotations

import os
import sys

import harness
import synthetic
import torch

from sparse_attention.ops.regularizer import regularizer_terms

DTYPE = "bf16"
BATCH, HEADS_Q, HEADS_KV, HEAD_DIM = 1, 16, 16, 64
TOP_K = 64
LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (1024, 4096, 16384)
CHECK_LENGTH = 2048
# The reference keeps about this many float32 [B, Hq, L, L] tensors alive through its backward.
REFERENCE_TEMPORARIES = 8
FUSED_FLOPS_PER_PAIR_DIM = 10
SDPA_FLOPS_PER_PAIR_DIM = 14
SMOKE = dict(batch=1, heads_q=2, heads_kv=1, head_dim=32, lengths=(64,), top_k=8, check_length=64)


def parse_args(argv=None):
    parser = harness.common_parser(__doc__.splitlines()[0], "regularizer.json")
    parser.add_argument("--lengths", type=lambda t: tuple(int(x) for x in t.split(",") if x), default=None)
    parser.add_argument("--k", type=int, default=None, help=f"top-k size (default {TOP_K})")
    return parser.parse_args(argv)


def _backend(args) -> str:
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return args.backend
    return "reference"


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _regularizer_step(q, k, top_k: int, backend: str):
    def run():
        terms = regularizer_terms(q, k, top_k, backend=backend)
        terms.loss.backward()
        return terms

    return run


def _sdpa_step(q, k, v, grad_out, backend: str):
    forward = harness.sdpa_call(q, k, v, causal=True, backend=backend)

    def run():
        out = forward()
        out.backward(grad_out)
        return out

    return run


def _flex_step(q, k, v, grad_out):
    forward = harness.flex_call(q, k, v, causal=True)

    def run():
        out = forward()
        out.backward(grad_out)
        return out

    return run


def _check(q, k, top_k: int, backend: str, length: int, dtype) -> dict:
    """Fused against reference at ``length`` tokens: loss and both gradients."""
    results = {}
    for name in ("fused", "reference"):
        qc, kc = _leaf(q[:, :, :length]), _leaf(k[:, :, :length])
        terms = regularizer_terms(qc, kc, top_k, backend=backend if name == "fused" else "reference")
        terms.loss.backward()
        results[name] = (terms.loss.detach(), qc.grad, kc.grad, float(terms.mass_sum / terms.rows.clamp_min(1)))
    errs = [harness.rel_error(a, b) for a, b in zip(results["fused"][:3], results["reference"][:3], strict=True)]
    err = max(errs)
    return {
        "check_length": length,
        "check_rel_err": harness.json_number(err),
        "check_rel_err_loss_dq_dk": [harness.json_number(e) for e in errs],
        "check_ok": bool(err <= harness.REL_TOL[dtype]),
        "loss": float(results["reference"][0]),
        "topk_mass": results["reference"][3],
    }


def run_length(args, writer, env, rates, *, length: int, dims: dict, top_k: int, flex: bool, device) -> None:
    dtype = harness.DTYPES[DTYPE] if device.type == "cuda" else torch.float32
    b, hq, hkv, d = dims["batch"], dims["heads_q"], dims["heads_kv"], dims["head_dim"]
    qkv = synthetic.structured_qkv(
        b, hq, hkv, length, d, dtype=dtype, device=device, seed=args.seed,
        config=synthetic.StructureConfig(**args.structure),
    )  # fmt: skip
    backend = _backend(args)
    check = _check(qkv.query, qkv.key, top_k, backend, min(length, dims["check_length"]), dtype)
    count = harness.rotation_count(qkv.nbytes)
    sets = [tuple(_leaf(t) for t in (qkv.query, qkv.key, qkv.value)) for _ in range(count)]
    grads = [t for s in sets for t in s]
    grad_out = torch.randn_like(qkv.query)
    opts = dict(warmup_ms=args.warmup_ms, rep_ms=harness.rep_ms(args), graph=False, grad_to_none=grads)
    timing, errors = {}, {}

    ms = harness.try_time("ours", lambda: [_regularizer_step(q, k, top_k, backend) for q, k, _ in sets], timing,
                          errors, **opts)  # fmt: skip
    peak = None if ms is None else harness.peak_memory_mb(_regularizer_step(*sets[0][:2], top_k, backend))
    ref_ms = ref_peak = None
    ref_bytes = REFERENCE_TEMPORARIES * 4 * b * hq * length * length
    if ref_bytes < harness.MATERIALIZE_MEMORY_SHARE * harness.free_bytes():
        ref_ms = harness.try_time("reference", lambda: [_regularizer_step(q, k, top_k, "reference")
                                                         for q, k, _ in sets[:1]], timing, errors, **opts)  # fmt: skip
        if ref_ms is not None:
            ref_peak = harness.peak_memory_mb(_regularizer_step(*sets[0][:2], top_k, "reference"))
    else:
        errors["reference"] = "skipped: its [B, Hq, L, L] temporaries do not fit in memory"
    harness.release()
    sdpa_all, sdpa_peaks = {}, {}
    for name in args.sdpa_backends or ("flash", "efficient", "cudnn"):
        step_ms = harness.try_time(f"sdpa_{name}", lambda n=name: [_sdpa_step(*s, grad_out, n) for s in sets],
                                   timing, errors, **opts)  # fmt: skip
        if step_ms is not None:
            sdpa_all[name] = step_ms
            sdpa_peaks[name] = harness.peak_memory_mb(_sdpa_step(*sets[0], grad_out, name))
        harness.release()
    sdpa_ms, sdpa_backend = harness.best_sdpa(sdpa_all)
    flex_ms = None
    if flex:
        flex_ms = harness.try_time("flex", lambda: [_flex_step(*s, grad_out) for s in sets], timing, errors, **opts)
    else:
        errors["flex"] = "skipped (--quick or --no-flex: compiling its backward is slow)"
    harness.release()
    pairs = length * (length + 1) / 2
    matmul = rates["matmul_tflops"]
    floor = None if matmul is None else FUSED_FLOPS_PER_PAIR_DIM * b * hq * d * pairs / (matmul * 1e12) * 1e3
    sdpa_floor = None if matmul is None else SDPA_FLOPS_PER_PAIR_DIM * b * hq * d * pairs / (matmul * 1e12) * 1e3
    record = harness.make_record(
        "regularizer",
        env,
        rates,
        source="synthetic",
        inputs=qkv.info,
        variant=f"fused fwd+bwd k={top_k}",
        backend=backend,
        kind_of_loss="logmass",
        top_k=top_k,
        dtype=harness.DTYPE_NAMES[dtype],
        shape={"B": b, "Hq": hq, "Hkv": hkv, "Lq": length, "Lk": length, "D": d, "k": top_k},
        causal=True,
        ms=ms,
        ref_ms=ref_ms,
        speedup_vs_reference=harness.ratio(ref_ms, ms),
        sdpa_ms=sdpa_ms,
        sdpa_backend=sdpa_backend,
        sdpa_all_ms=sdpa_all,
        **harness.sdpa_fields(sdpa_all),
        flex_ms=flex_ms,
        errors=errors,
        floor_ms=floor,
        sdpa_floor_ms=sdpa_floor,
        speedup_vs_sdpa=harness.ratio(sdpa_ms, ms),
        kept_element_fraction=None,
        skipped_tile_fraction=None,
        dense_mode=False,
        gbps=None,
        peak_mem_mb=peak,
        ref_peak_mem_mb=ref_peak,
        sdpa_peak_mem_mb=sdpa_peaks,
        input_mb=(qkv.query.numel() + qkv.key.numel()) * qkv.query.element_size() / harness.MIB,
        timing=timing,
        **check,
    )
    writer.add(record)
    if not record["check_ok"] or ms is None:
        writer.failures.append(harness.summary_line(record) + (f" ours failed: {errors.get('ours')}" if ms is None
                                                               else ""))  # fmt: skip
    harness.log(harness.summary_line(record) + f" ref={ref_ms} peak={peak} ref_peak={ref_peak}")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = harness.device_for(args)
    writer = harness.ResultWriter(args.out)
    env, rates = harness.environment(), harness.machine_rates()
    deadline = harness.Deadline(args.time_budget)
    synthetic.StructureConfig(**args.structure)  # an unknown --structure key fails here, not in every shape
    if args.smoke:
        dims = dict(SMOKE)
        lengths, top_k = dims.pop("lengths"), dims.pop("top_k")
    else:
        dims = dict(batch=BATCH, heads_q=HEADS_Q, heads_kv=HEADS_KV, head_dim=HEAD_DIM, check_length=CHECK_LENGTH)
        lengths, top_k = (QUICK_LENGTHS if args.quick else LENGTHS), TOP_K
    lengths, top_k = args.lengths or lengths, args.k or top_k
    for length in lengths:
        if deadline.expired():
            harness.log(f"time budget spent: skipping regularizer L={length} and longer")
            break
        harness.log(f"regularizer L={length} k={top_k}")
        flex = not (args.quick or args.no_flex)
        harness.guarded(writer, f"regularizer L={length}", run_length, args, writer, env, rates, length=length,
                        dims=dims, top_k=top_k, flex=flex, device=device)  # fmt: skip
    harness.log(f"wrote {len(writer.records)} regularizer records to {writer.path}")
    for line in writer.failures:
        harness.log(f"FAILED: {line}")
    return 1 if writer.failures else 0


if __name__ == "__main__":
    sys.exit(main())
