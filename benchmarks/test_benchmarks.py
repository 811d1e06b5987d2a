"""pytest-benchmark entry of the harness: ``pytest benchmarks/ --benchmark-only`` on a CUDA machine.

One small shape per kernel (decode, prefill sparse and dense, the regularizer's forward + backward), each checked
against the float32 reference, with its peak memory checked to be O(L) (``torch.cuda.max_memory_allocated``) before
pytest-benchmark times it. The do_bench median, the best SDPA time and the kept fractions go into ``extra_info``. The
issue's speed goals are reported (``extra_info``, and by the ``bench_*.py`` scripts), not asserted: timings on a shared
machine are not pass/fail material. Skipped without CUDA.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))  # harness and synthetic are sibling scripts, not a package

import harness  # noqa: E402
import synthetic  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROUNDS, WARMUP_ROUNDS = 20, 3
# Peak memory beyond the inputs may be at most this multiple of the input bytes plus a fixed slack (workspaces,
# split-K partials). Any [B, H, L, L] temporary breaks it by orders of magnitude at these lengths.
MEMORY_FACTOR = 1.0
MEMORY_SLACK_MB = 64.0
# The regularizer's backward allocates the gradients (as large as its inputs) besides its O(L) statistics.
REGULARIZER_MEMORY_FACTOR = 2.0
# Doubling L may at most multiply the prefill's extra memory by this (2 for O(L), 4 for O(L²)).
MEMORY_GROWTH_LIMIT = 2.5
DECODE = dict(batch=1, heads_q=32, heads_kv=8, head_dim=128, length=8192, target_f_v=0.3)
PREFILL = dict(heads_q=32, heads_kv=8, head_dim=128, length=4096, kept_target=0.1)
REGULARIZER = dict(heads=16, head_dim=64, length=2048, k=64)


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


def _check_memory(peak_mb: float, input_bytes: int, factor: float = MEMORY_FACTOR) -> None:
    assert peak_mb <= factor * input_bytes / harness.MIB + MEMORY_SLACK_MB, (
        f"peak memory {peak_mb:.1f} MiB beyond the inputs is not O(L) (inputs {input_bytes / harness.MIB:.1f} MiB)"
    )


def test_decode(benchmark):
    from sparse_attention import top_theta_attention
    from sparse_attention.ops import reference

    c = DECODE
    qkv = synthetic.structured_qkv(
        c["batch"], c["heads_q"], c["heads_kv"], c["length"], c["head_dim"], num_queries=1, device="cuda"
    )
    q, k, v = qkv.query, qkv.key, qkv.value
    theta, f_v = synthetic.theta_for_kept_v_fraction(q, k, c["target_f_v"])
    out, stats = top_theta_attention(q, k, v, theta, backend="triton", return_stats=True)
    ref = reference.top_theta_attention(q, k, v, theta)
    assert harness.rel_error(out, ref) <= harness.REL_TOL[q.dtype]
    kept_v = float(stats.kept_v_rows.sum()) / (k.shape[0] * k.shape[1] * k.shape[2])
    assert abs(kept_v - f_v) < 0.01

    def fn():
        return top_theta_attention(q, k, v, theta, backend="triton")

    _check_memory(harness.peak_memory_mb(fn), qkv.nbytes)
    ms, _ = harness.time_ms([fn])
    sdpa_ms, _ = harness.time_ms([harness.sdpa_call(q, k, v, causal=False, backend="flash")])
    benchmark.extra_info.update(do_bench_ms=ms, sdpa_flash_ms=sdpa_ms, kept_v_fraction=kept_v,
                                speedup_vs_sdpa_flash=sdpa_ms / ms)  # fmt: skip
    benchmark.pedantic(_synced(fn), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_prefill(benchmark, dense):
    from sparse_attention import top_theta_attention
    from sparse_attention.ops import reference

    c = PREFILL
    qkv = synthetic.structured_qkv(1, c["heads_q"], c["heads_kv"], c["length"], c["head_dim"], device="cuda")
    q, k, v = qkv.query, qkv.key, qkv.value
    top_k = round(c["kept_target"] * c["length"] / 2)
    theta = None if dense else synthetic.calibrate_theta(q, k, top_k)
    k_dense = 0 if dense else top_k
    out, stats = top_theta_attention(q, k, v, theta, k_dense=k_dense, backend="triton", return_stats=True)
    rows = slice(c["length"] - 128, c["length"])
    ref = reference.top_theta_attention(q[:, :, rows], k, v, theta, k_dense=k_dense)
    assert harness.rel_error(out[:, :, rows], ref) <= harness.REL_TOL[q.dtype]

    def fn():
        return top_theta_attention(q, k, v, theta, k_dense=k_dense, backend="triton")

    _check_memory(harness.peak_memory_mb(fn), qkv.nbytes)
    ms, _ = harness.time_ms([fn])
    sdpa_ms, _ = harness.time_ms([harness.sdpa_call(q, k, v, causal=True, backend="flash")])
    benchmark.extra_info.update(
        do_bench_ms=ms, sdpa_flash_ms=sdpa_ms, speedup_vs_sdpa_flash=sdpa_ms / ms,
        kept_element_fraction=stats.kept_fraction,
        skipped_tile_fraction=harness.ratio(harness.number(stats.skipped_tiles), harness.number(stats.total_tiles)),
    )  # fmt: skip
    benchmark.pedantic(_synced(fn), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)


def test_prefill_memory_grows_linearly(benchmark):
    from sparse_attention import top_theta_attention

    c = PREFILL
    peaks = []
    for length in (c["length"], 2 * c["length"]):
        qkv = synthetic.structured_qkv(1, c["heads_q"], c["heads_kv"], length, c["head_dim"], device="cuda")

        def fn(qkv=qkv):
            return top_theta_attention(qkv.query, qkv.key, qkv.value, backend="triton")

        fn()  # compile outside the measurement
        peaks.append(harness.peak_memory_mb(fn))
    assert peaks[1] <= MEMORY_GROWTH_LIMIT * peaks[0] + 1.0, f"extra memory {peaks[0]:.1f} -> {peaks[1]:.1f} MiB"
    benchmark.extra_info.update(peak_mb=peaks)
    benchmark.pedantic(_synced(fn), rounds=ROUNDS // 4, warmup_rounds=1)


def test_regularizer(benchmark):
    from sparse_attention.ops.regularizer import topk_regularizer

    c = REGULARIZER
    qkv = synthetic.structured_qkv(1, c["heads"], c["heads"], c["length"], c["head_dim"], device="cuda")
    q = qkv.query.detach().requires_grad_(True)
    key = qkv.key.detach().requires_grad_(True)
    grads = {}
    for backend in ("triton", "reference"):
        q.grad = key.grad = None
        loss = topk_regularizer(q, key, c["k"], backend=backend)
        loss.backward()
        grads[backend] = (loss.detach(), q.grad, key.grad)
    for fused, ref in zip(grads["triton"], grads["reference"], strict=True):
        assert harness.rel_error(fused, ref) <= harness.REL_TOL[q.dtype]

    def fn():
        q.grad = key.grad = None
        topk_regularizer(q, key, c["k"], backend="triton").backward()

    input_bytes = 2 * q.numel() * q.element_size()
    _check_memory(harness.peak_memory_mb(fn), input_bytes, REGULARIZER_MEMORY_FACTOR)
    ms, _ = harness.time_ms([fn], graph=False, grad_to_none=[q, key])
    benchmark.extra_info.update(do_bench_ms=ms)
    benchmark.pedantic(_synced(fn), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
