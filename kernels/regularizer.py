"""Fused Triton forward and backward of the attention-condensation regularizer.

Computes, for query ``[B, Hq, Lq, D]`` and GQA key ``[B, Hkv, Lk, D]``, per query row i with more than ``k`` visible
keys the top-k mass ``m_i`` of its softmax and the loss ``-log m_i`` ("logmass") or ``1 - m_i`` ("mass"), summed over
those rows, plus the gradients with respect to query and key. The loss is the project's formulation (DESIGN.md, "The
condensation regularizer") of "Attention Condensation via Sparsity Induced Regularized Training" (arXiv 2503.01564,
whose body is withdrawn): ``-log m_i = LSE_all - LSE_topk`` with score gradient ``P - P̂``, and ``1 - m_i`` with
score gradient ``m_i · (P - P̂)``, where ``P̂`` is ``P`` restricted to the top-k and renormalised.

Neither pass writes the ``Lq × Lk`` score matrix:

- forward, one program per (query tile, batch, query head): streams the visible key tiles keeping the online row max
  and sum of exponentials, and a running top list: a ``[BLOCK_M, BLOCK_N]`` buffer of the largest scores seen so far,
  sorted descending. Each score tile is sorted ascending by a bitonic network; its elementwise max with the buffer
  holds the top ``BLOCK_N`` of their union and is bitonic, so one merge pass sorts it into the new buffer.
  ``BLOCK_N >= k``, so the k-th largest visible score (the threshold ``t_i``) and ``LSE_topk`` come out of the buffer
  at the end. Per row it writes five numbers: ``LSE_all``, ``LSE_topk``, ``t_i``, the tie weight and the visible count.
- backward, two kernels that recompute the scores tile by tile: one per query tile accumulates dQ over key tiles,
  one per key tile accumulates dK over the query tiles of every query head of its kv group. No atomics.

Memory is O(B · Hq · Lq) besides the inputs and gradients.

Ties: keys whose score equals ``t_i`` share the top-k slots left over by the keys above it, each with weight
``(k - #above) / #tied`` (the average over every way of breaking the tie, so the loss value is the exact top-k mass
and the gradient is symmetric). Counting the tied keys needs every key equal to ``t_i``, including those that fell off
the end of the buffer; the forward keeps, per row, the number of dropped scores equal to the buffer's current minimum.
The backward decides top-k membership by comparing its recomputed scores with ``t_i`` exactly, so the forward and
both backward kernels compute every score with the same code, the same tile shape and the same number of warps (fixed
in ``kernels/config.py``, never autotuned); on sm_90 all three lower the score product to the same wgmma. Should a
compiler ever round a recomputed score differently, only keys within an ulp of ``t_i`` could change sides, which gives
the gradient at a neighbouring input.

Supports float16, bfloat16 and float32 inputs (scores and statistics in float32; float32 dot products in full
precision), head dims up to ``config.MAX_HEAD_DIM`` (padded to a power of two), GQA, causal masking with any query
offset, and a boolean mask broadcastable to ``[B, Hq, Lq, Lk]`` (True = attend). Limits: ``1 <= k <=
config.REGULARIZER_MAX_K`` (the buffer lives in registers); ``BLOCK_N`` grows to the next power of two of k.
Runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import config
from .common import KERNEL_DTYPES, unsupported_device

KINDS = ("logmass", "mass")
# Minimum tile side of tl.dot on GPUs.
_MIN_DOT_SIDE = 16
# Floor for sums of exponentials before their log: only rows with no visible key reach it (they are not regularized).
FLOAT32_TINY: tl.constexpr = tl.constexpr(torch.finfo(torch.float32).tiny)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


# The combine functions tl.max and tl.min reduce with. Reducing with them directly compiles to the same code on a GPU,
# and keeps the interpreter on its numpy fast path: it recognises only these, and tl.max itself is a jitted function,
# whose every call costs milliseconds there. Our own equivalents stand in should Triton rename them.
_MAX_COMBINE = getattr(tl.standard, "_elementwise_max", _maximum)
_MIN_COMBINE = getattr(tl.standard, "_elementwise_min", _minimum)


@triton.jit
def _load_rows(base, offs_rows, offs_d, stride_row, stride_d, n_rows, head_dim):
    """Rows ``offs_rows`` of a ``[n_rows, head_dim]`` matrix, zero-padded: ``[len(offs_rows), BLOCK_D]``."""
    ptrs = base + offs_rows[:, None] * stride_row + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=(offs_rows[:, None] < n_rows) & (offs_d[None, :] < head_dim), other=0.0)


@triton.jit
def _visible_scores(
    q,
    k,
    offs_m,
    offs_n,
    mask_base,
    stride_mm,
    stride_mn,
    seqlen_q,
    seqlen_k,
    q_offset,
    scale,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Scores of a ``[BLOCK_M, BLOCK_N]`` tile with ``-inf`` where a key is not visible.

    Every kernel computes scores only here, so the forward and backward values are bit-identical.
    """
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]
    visible = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + q_offset)
    if HAS_MASK:
        allowed = tl.load(
            mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn, mask=visible, other=0
        )  # [BLOCK_M, BLOCK_N]
        visible = visible & (allowed != 0)
    return tl.where(visible, s, float("-inf")), visible


@triton.jit
def _merge_top(top, top_min, n_dropped, s, LOG_N: tl.constexpr, N_DIMS: tl.constexpr):
    """Merge score tile ``s`` into the descending top buffer ``top``; both ``[BLOCK_M, BLOCK_N = 2**LOG_N]``.

    ``n_dropped`` counts, per row, scores that fell off the buffer and equal its minimum ``top_min``.

    Bitonic sorting network on the tile viewed as the hypercube ``[2] * N_DIMS`` (the last LOG_N axes are the bits of
    the column index). A compare-exchange of the pairs whose column indices differ in bit j takes the min and the max
    over that axis, which reads the partner without a gather. Written out in one function: under the interpreter
    every call of a jitted helper costs milliseconds.
    """
    # Sort the tile ascending: stage t sorts runs of 2**t columns, descending where column bit t is set. Column bit j
    # is hypercube axis N_DIMS - 1 - j; the loops run over axes because constexprs cannot be reassigned in a loop.
    h = tl.reshape(s, [2] * N_DIMS)
    for stage in tl.static_range(1, LOG_N + 1):
        for axis in tl.static_range(N_DIMS - stage, N_DIMS):
            upper = tl.reshape(tl.arange(0, 2), [1] * axis + [2] + [1] * (N_DIMS - 1 - axis))
            if stage < LOG_N:
                upper = upper ^ tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - 1 - stage) + [2] + [1] * stage)
            h = tl.where(
                upper != 0,
                tl.reduce(h, axis, _MAX_COMBINE, keep_dims=True),
                tl.reduce(h, axis, _MIN_COMBINE, keep_dims=True),
            )
    # Descending buffer against ascending tile: the elementwise max holds the top BLOCK_N of their union and is bitonic,
    # so one merge pass (larger element first at every distance) sorts it descending.
    h = tl.maximum(tl.reshape(top, [2] * N_DIMS), h)
    for axis in tl.static_range(N_DIMS - LOG_N, N_DIMS):
        lower = tl.reshape(tl.arange(0, 2), [1] * axis + [2] + [1] * (N_DIMS - 1 - axis)) == 0
        h = tl.where(
            lower, tl.reduce(h, axis, _MAX_COMBINE, keep_dims=True), tl.reduce(h, axis, _MIN_COMBINE, keep_dims=True)
        )
    merged = tl.reshape(h, s.shape)  # [BLOCK_M, BLOCK_N]

    new_min = tl.min(merged, 1)
    at_min = new_min[:, None]
    in_union = tl.sum((top == at_min).to(tl.int32), 1) + tl.sum((s == at_min).to(tl.int32), 1)
    in_buffer = tl.sum((merged == at_min).to(tl.int32), 1)
    # Earlier drops are all <= the old minimum, so they only still tie when the minimum did not move.
    n_dropped = in_union - in_buffer + tl.where(new_min == top_min, n_dropped, 0)
    return merged, new_min, n_dropped


@triton.jit
def _score_grad(s, lse_all, lse_top, thresh, tie_w, gamma):
    """``d loss / d s`` of a ``[BLOCK_M, BLOCK_N]`` tile: ``gamma · (P - w · exp(s - LSE_topk))``.

    Rows that are not regularized arrive with ``lse_* = thresh = +inf`` and ``gamma = 0`` and give exact zeros.
    """
    weight = tl.where(s > thresh[:, None], 1.0, tl.where(s == thresh[:, None], tie_w[:, None], 0.0))
    p = tl.exp(s - lse_all[:, None])
    p_top = tl.exp(s - lse_top[:, None])
    return gamma[:, None] * (p - weight * p_top)


@triton.jit
def _query_tile(
    Q, K, Mask, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_mb, stride_mh,
    num_heads, groups, seqlen_q, seqlen_k, head_dim, q_offset,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    """The query tile of a (query tile, batch x query head) program of the forward or the dQ kernel: ``(pid_bh, off_b,
    off_h, offs_m, offs_d, q, k_base, mask_base, hi)``, ``hi`` the end of the keys its rows can see. Both kernels walk
    the key tiles from 0, so they score every key on the same tile."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_hk = off_h // groups
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, seqlen_q, head_dim)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    mask_base = Mask + off_b * stride_mb + off_h * stride_mh
    hi = seqlen_k
    if CAUSAL:
        hi = tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M + q_offset)
    return pid_bh, off_b, off_h, offs_m, offs_d, q, k_base, mask_base, hi


@triton.jit
def _row_stats(LseAll, LseTop, Thresh, TieW, Gamma, rows, in_range):
    """The forward's statistics and the row weight of ``rows`` for a backward kernel. Rows past the end read as
    unregularized ones (``+inf`` statistics, zero weight), so ``_score_grad`` gives them exact zeros."""
    lse_all = tl.load(LseAll + rows, mask=in_range, other=float("inf"))
    lse_top = tl.load(LseTop + rows, mask=in_range, other=float("inf"))
    thresh = tl.load(Thresh + rows, mask=in_range, other=float("inf"))
    tie_w = tl.load(TieW + rows, mask=in_range, other=0.0)
    gamma = tl.load(Gamma + rows, mask=in_range, other=0.0)
    return lse_all, lse_top, thresh, tie_w, gamma


@triton.jit
def _regularizer_fwd_kernel(
    Q,
    K,
    Mask,
    LseAll,
    LseTop,
    Thresh,
    TieW,
    NVisible,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    num_heads,
    groups,
    seqlen_q,
    seqlen_k,
    head_dim,
    q_offset,
    top_k,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LOG_N: tl.constexpr,
    N_DIMS: tl.constexpr,
):
    pid_bh, off_b, off_h, offs_m, offs_d, q, k_base, mask_base, hi = _query_tile(
        Q, K, Mask, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_mb, stride_mh,
        num_heads, groups, seqlen_q, seqlen_k, head_dim, q_offset, BLOCK_M, BLOCK_D, CAUSAL,
    )  # fmt: skip
    offs_j = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    n_visible = tl.zeros([BLOCK_M], tl.int32)
    top = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
    top_min = tl.full([BLOCK_M], float("-inf"), tl.float32)
    n_dropped = tl.zeros([BLOCK_M], tl.int32)

    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_j
        k = _load_rows(k_base, offs_n, offs_d, stride_kn, stride_kd, seqlen_k, head_dim)
        s, visible = _visible_scores(
            q, k, offs_m, offs_n, mask_base, stride_mm, stride_mn, seqlen_q, seqlen_k, q_offset, scale,
            CAUSAL, HAS_MASK, DOT_PRECISION,
        )  # fmt: skip
        n_visible += tl.sum(visible.to(tl.int32), 1)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
        top, top_min, n_dropped = _merge_top(top, top_min, n_dropped, s, LOG_N, N_DIMS)

    is_top = offs_j[None, :] < top_k  # [1, BLOCK_N]
    thresh = tl.sum(tl.where(offs_j[None, :] == top_k - 1, top, 0.0), 1)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse_all = m_safe + tl.log(tl.maximum(l_i, FLOAT32_TINY))
    z_top = tl.sum(tl.where(is_top, tl.exp(top - m_safe[:, None]), 0.0), 1)
    lse_top = m_safe + tl.log(tl.maximum(z_top, FLOAT32_TINY))
    n_above = tl.sum((top > thresh[:, None]).to(tl.int32), 1)
    n_tied = tl.sum((top == thresh[:, None]).to(tl.int32), 1) + tl.where(top_min == thresh, n_dropped, 0)
    tie_w = (top_k - n_above).to(tl.float32) / tl.maximum(n_tied, 1).to(tl.float32)

    rows = pid_bh * seqlen_q + offs_m
    in_range = offs_m < seqlen_q
    tl.store(LseAll + rows, lse_all, mask=in_range)
    tl.store(LseTop + rows, lse_top, mask=in_range)
    tl.store(Thresh + rows, thresh, mask=in_range)
    tl.store(TieW + rows, tie_w, mask=in_range)
    tl.store(NVisible + rows, n_visible, mask=in_range)


@triton.jit
def _regularizer_bwd_dq_kernel(
    Q,
    K,
    Mask,
    LseAll,
    LseTop,
    Thresh,
    TieW,
    Gamma,
    DQ,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    num_heads,
    groups,
    seqlen_q,
    seqlen_k,
    head_dim,
    q_offset,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh, off_b, off_h, offs_m, offs_d, q, k_base, mask_base, hi = _query_tile(
        Q, K, Mask, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_mb, stride_mh,
        num_heads, groups, seqlen_q, seqlen_k, head_dim, q_offset, BLOCK_M, BLOCK_D, CAUSAL,
    )  # fmt: skip
    offs_j = tl.arange(0, BLOCK_N)
    in_range = offs_m < seqlen_q
    lse_all, lse_top, thresh, tie_w, gamma = _row_stats(
        LseAll, LseTop, Thresh, TieW, Gamma, pid_bh * seqlen_q + offs_m, in_range
    )

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_j
        k = _load_rows(k_base, offs_n, offs_d, stride_kn, stride_kd, seqlen_k, head_dim)
        s, _ = _visible_scores(
            q, k, offs_m, offs_n, mask_base, stride_mm, stride_mn, seqlen_q, seqlen_k, q_offset, scale,
            CAUSAL, HAS_MASK, DOT_PRECISION,
        )  # fmt: skip
        ds = _score_grad(s, lse_all, lse_top, thresh, tie_w, gamma)  # [BLOCK_M, BLOCK_N]
        acc += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (acc * scale).to(DQ.dtype.element_ty), mask=in_range[:, None] & (offs_d[None, :] < head_dim))


@triton.jit
def _regularizer_bwd_dk_kernel(
    Q,
    K,
    Mask,
    LseAll,
    LseTop,
    Thresh,
    TieW,
    Gamma,
    DK,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    num_heads,
    num_kv_heads,
    groups,
    seqlen_q,
    seqlen_k,
    head_dim,
    q_offset,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    off_b = pid_bhk // num_kv_heads
    off_hk = pid_bhk % num_kv_heads
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    k = _load_rows(K + off_b * stride_kb + off_hk * stride_kh, offs_n, offs_d, stride_kn, stride_kd, seqlen_k, head_dim)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Query tiles start at multiples of BLOCK_M, as in the forward, so every score is recomputed on the same tile.
    lo = 0
    if CAUSAL:
        lo = (tl.maximum(start_n - q_offset, 0) // BLOCK_M) * BLOCK_M
    for g in range(0, groups):
        off_h = off_hk * groups + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        mask_base = Mask + off_b * stride_mb + off_h * stride_mh
        row_base = (off_b * num_heads + off_h) * seqlen_q
        for start_m in range(lo, seqlen_q, BLOCK_M):
            offs_m = start_m + offs_i
            q = _load_rows(q_base, offs_m, offs_d, stride_qm, stride_qd, seqlen_q, head_dim)
            lse_all, lse_top, thresh, tie_w, gamma = _row_stats(
                LseAll, LseTop, Thresh, TieW, Gamma, row_base + offs_m, offs_m < seqlen_q
            )
            s, _ = _visible_scores(
                q, k, offs_m, offs_n, mask_base, stride_mm, stride_mn, seqlen_q, seqlen_k, q_offset, scale,
                CAUSAL, HAS_MASK, DOT_PRECISION,
            )  # fmt: skip
            ds = _score_grad(s, lse_all, lse_top, thresh, tie_w, gamma)  # [BLOCK_M, BLOCK_N]
            acc += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    dk_ptrs = (
        DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    )
    tl.store(
        dk_ptrs, (acc * scale).to(DK.dtype.element_ty), mask=(offs_n[:, None] < seqlen_k) & (offs_d[None, :] < head_dim)
    )


def unsupported_reason(query: torch.Tensor, k: int) -> str | None:
    """Why the fused kernels cannot run a regularizer call on ``query`` with this ``k`` (``None`` when they can)."""
    reason = unsupported_device(query.device, "fused regularizer")
    if reason is not None:
        return reason
    if query.dtype not in KERNEL_DTYPES:
        return f"query dtype {query.dtype} is not supported by the fused regularizer (use float16, bfloat16 or float32)"
    if query.shape[-1] > config.MAX_HEAD_DIM:
        return f"head dim {query.shape[-1]} exceeds the fused regularizer's maximum {config.MAX_HEAD_DIM}"
    if k > config.REGULARIZER_MAX_K:
        return f"k = {k} exceeds the fused regularizer's maximum {config.REGULARIZER_MAX_K}"
    return None


def _tiles(k: int, head_dim: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D, num_warps)``: one shape for the forward and both backward kernels."""
    block_m = max(_MIN_DOT_SIDE, config.REGULARIZER_BLOCK_M)
    block_n = max(_MIN_DOT_SIDE, config.REGULARIZER_BLOCK_N, triton.next_power_of_2(k))
    block_d = max(_MIN_DOT_SIDE, triton.next_power_of_2(head_dim))
    # The sorting network keeps several [BLOCK_M, BLOCK_N] temporaries live: 4 warps spill at 64 x 64 on sm_90.
    num_warps = 8 if block_m * block_n >= 64 * 64 else 4
    return block_m, block_n, block_d, num_warps


def _check(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    reason = unsupported_reason(query, k)
    if reason is not None:
        raise ValueError(reason)
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query and key must be [B, H, L, D]; got {tuple(query.shape)} and {tuple(key.shape)}")
    b, hq, lq, d = query.shape
    if key.dtype != query.dtype or key.device != query.device:
        raise ValueError("query and key must share dtype and device")
    if key.shape[0] != b or key.shape[3] != d or key.shape[1] == 0 or hq % key.shape[1]:
        raise ValueError(f"key {tuple(key.shape)} does not match query {tuple(query.shape)} (batch, heads, head dim)")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (b, hq, lq, key.shape[2])):
        raise ValueError(f"attn_mask must be a boolean [B, Hq, Lq, Lk] view, got {mask.dtype} {tuple(mask.shape)}")


def _mask_args(query: torch.Tensor, mask: torch.Tensor | None):
    if mask is None:
        # Never read (HAS_MASK is off); any pointer will do.
        return query, (0, 0, 0, 0)
    # bool and uint8 share a size; the view keeps the (possibly zero) broadcast strides.
    return mask.view(torch.uint8), mask.stride()


def regularizer_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None,
    k: int,
    scale: float,
    causal: bool,
    q_offset: int,
) -> tuple[torch.Tensor, ...]:
    """Per-row statistics of the regularizer, each ``[B, Hq, Lq]``.

    Args:
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, Lk, D]`` (same dtype and device, ``Hq`` a multiple of ``Hkv``).
        attn_mask: ``None`` or a boolean ``[B, Hq, Lq, Lk]`` view (broadcast strides allowed), True = attend.
        k: top-k size, ``1 <= k <= config.REGULARIZER_MAX_K``.
        scale, causal, q_offset: as in DESIGN.md (row i sees key j when ``j <= q_offset + i`` if causal).

    Returns:
        ``(lse_all, lse_top, thresh, tie_w, n_visible)``: float32 log-sum-exp of all visible scores and of the top-k,
        the k-th largest visible score, the top-k weight of a key tied with it, and the int32 visible count.
        Only rows with ``n_visible > k`` are meaningful.

    Raises:
        ValueError: an input the kernels do not support (see :func:`unsupported_reason`) or inconsistent shapes.
    """
    _check(query, key, attn_mask, k)
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    block_m, block_n, block_d, num_warps = _tiles(k, d)
    stats = [torch.empty(b, hq, lq, dtype=torch.float32, device=query.device) for _ in range(4)]
    n_visible = torch.empty(b, hq, lq, dtype=torch.int32, device=query.device)
    mask_t, mask_strides = _mask_args(query, attn_mask)
    grid = (triton.cdiv(lq, block_m), b * hq)
    _regularizer_fwd_kernel[grid](
        query, key, mask_t, *stats, n_visible,
        *query.stride(), *key.stride(), *mask_strides,
        hq, hq // hkv, lq, lk, d, q_offset, k, scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, CAUSAL=causal, HAS_MASK=attn_mask is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        LOG_N=block_n.bit_length() - 1, N_DIMS=(block_m * block_n).bit_length() - 1, num_warps=num_warps,
    )  # fmt: skip
    return (*stats, n_visible)


def regularizer_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None,
    k: int,
    scale: float,
    causal: bool,
    q_offset: int,
    lse_all: torch.Tensor,
    lse_top: torch.Tensor,
    thresh: torch.Tensor,
    tie_w: torch.Tensor,
    gamma: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dQ, dK)`` for score gradients ``gamma_i · (P - w · exp(s - LSE_topk))``, in the input dtype.

    The statistics are those of :func:`regularizer_forward` on the same inputs, float32 ``[B, Hq, Lq]``; rows that
    must contribute nothing carry ``lse_all = lse_top = thresh = +inf`` and ``gamma = 0``. ``k`` only selects the
    tile shape, which must be the forward's.
    """
    _check(query, key, attn_mask, k)
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    block_m, block_n, block_d, num_warps = _tiles(k, d)
    stats = [t.contiguous() for t in (lse_all, lse_top, thresh, tie_w, gamma)]
    mask_t, mask_strides = _mask_args(query, attn_mask)
    dq = torch.empty_like(query)
    dk = torch.empty_like(key)
    flags = dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, CAUSAL=causal, HAS_MASK=attn_mask is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=num_warps,
    )  # fmt: skip
    _regularizer_bwd_dq_kernel[(triton.cdiv(lq, block_m), b * hq)](
        query, key, mask_t, *stats, dq,
        *query.stride(), *key.stride(), *mask_strides, *dq.stride(),
        hq, hq // hkv, lq, lk, d, q_offset, scale, **flags,
    )  # fmt: skip
    _regularizer_bwd_dk_kernel[(triton.cdiv(lk, block_n), b * hkv)](
        query, key, mask_t, *stats, dk,
        *query.stride(), *key.stride(), *mask_strides, *dk.stride(),
        hq, hkv, hq // hkv, lq, lk, d, q_offset, scale, **flags,
    )  # fmt: skip
    return dq, dk


class TopkRegularizerFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(query, key, attn_mask, k, scale, causal, q_offset, kind)``.

    Returns ``(loss_sum, mass_sum, rows)``, float32 scalars: the sum over regularized rows (``n_i > k``) of the
    per-row loss (differentiable with respect to query and key), the sum of their top-k masses and their count
    (neither differentiable). Arguments as :func:`regularizer_forward`; ``kind`` is ``"logmass"`` or ``"mass"``.
    """

    @staticmethod
    def forward(ctx, query, key, attn_mask, k, scale, causal, q_offset, kind):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        lse_all, lse_top, thresh, tie_w, n_visible = regularizer_forward(
            query, key, attn_mask, k, scale, causal, q_offset
        )
        regularized = n_visible > k
        log_mass = (lse_top - lse_all).clamp_max(0.0)
        mass = torch.exp(log_mass)
        per_row = -log_mass if kind == "logmass" else 1.0 - mass
        zero = torch.zeros((), dtype=torch.float32, device=query.device)
        loss_sum = torch.where(regularized, per_row, zero).sum()
        mass_sum = torch.where(regularized, mass, zero).sum()
        rows = regularized.sum().to(torch.float32)
        inf = torch.full((), float("inf"), dtype=torch.float32, device=query.device)
        ctx.save_for_backward(
            query, key, attn_mask,
            torch.where(regularized, lse_all, inf), torch.where(regularized, lse_top, inf),
            torch.where(regularized, thresh, inf), torch.where(regularized, tie_w, zero),
            # The "mass" score gradient is the "logmass" one times m_i; unregularized rows get zero.
            regularized.float() if kind == "logmass" else torch.where(regularized, mass, zero),
        )  # fmt: skip
        ctx.args = (k, scale, causal, q_offset)
        ctx.mark_non_differentiable(mass_sum, rows)
        return loss_sum, mass_sum, rows

    @staticmethod
    def backward(ctx, grad_loss, grad_mass, grad_rows):
        query, key, attn_mask, lse_all, lse_top, thresh, tie_w, row_weight = ctx.saved_tensors
        k, scale, causal, q_offset = ctx.args
        gamma = row_weight * grad_loss.float()
        dq, dk = regularizer_backward(
            query, key, attn_mask, k, scale, causal, q_offset, lse_all, lse_top, thresh, tie_w, gamma
        )
        return dq, dk, None, None, None, None, None, None
