"""Top-θ decode attention: split-K flash-decoding that reads only the V rows it keeps.

What it computes: Top-θ attention (Berestizshevsky, Andri, Cavigelli, "Top-Theta Attention: Sparsifying Transformers
by Compensated Thresholding", arXiv 2502.08363) for calls with few query rows (``Lq == 1`` in generation, a few rows
in speculative decoding), with the semantics of DESIGN.md and the decisions of the kernel spec: keep test "pre"
(``s > θ``) or "post" (``log p > log θ``, in log space), compensation ``sdc`` scaled by ``sdc_scale``, V-mean
compensation, sinks, softcap, cap, and the statistics (kept and visible counts, kept V rows per kv head).

How it runs (read the file bottom-up: jit helpers, kernels, launcher):

- One program per (key split, row block, kv head, batch), on a 1-D grid. The ``G·Lq`` query rows of a kv group (its
  ``G`` query heads times the ``Lq`` query rows) are packed into the rows of one program, so each K and V row is read
  once per group; groups wider than ``config.DECODE_MAX_BLOCK_M`` rows run as several row blocks.
- ``_decode_split_kernel`` walks its keys in ``BLOCK_N`` tiles: scores (one matrix-unit product per tile), the
  NaN-propagating online row max and denominators, each row's threshold ``theta[h, min(n_i, T) - 1]`` and
  ``k_dense``, then loads the tile's V rows with a row mask that is true only where some packed row keeps the key:
  a pruned V row causes no memory traffic. It writes per-split partials (max, visible and kept denominators, kept
  count, unnormalised output, and with ``vmc`` the visible V sum). K and V tiles are copied asynchronously
  (``cp.async``); with ``config.DECODE_NUM_STAGES = 4`` the copies of the next two tiles are in flight while a tile
  computes (the V copy of a tile can only start once its scores are known).
- ``_decode_combine_kernel`` merges the splits of each query row, adds the sink, applies ``sdc``/``vmc`` and writes
  the output and statistics.
- Extra passes over K (scores only, no V), all in ``_decode_score_pass_kernel``: placement "post" first needs each
  row's log-sum-exp (``PASS_LSE``); ``cap`` needs, for every tile, the number of threshold-kept keys of each row to
  its right (``PASS_COUNT`` walks each split right to left and stores, per tile, the count of the split's tiles to
  its right, and per split its total; the split kernel adds the totals of the splits to its right). The main loop
  thus carries no count from tile to tile, which would stop the compiler from pipelining its V loads. "post"
  therefore reads K twice, "pre" with a cap twice, "post" with a cap three times; a cap also writes and reads
  ``[B·Hq·Lq, Lk / BLOCK_N]`` int32 tile counts.
- The split count comes from the compiled split kernel: resident programs per SM from its registers, shared memory
  and warps (``resident_ctas_per_sm``), then the count that minimises a wave model (``choose_num_splits``). It depends
  on shapes and the device only, never on device data: the launcher makes no host sync and a decode step can be
  captured in a CUDA graph (warm each specialisation up before capturing: the first call compiles it).

Supports float16, bfloat16 and float32 (float32 products in full "ieee" precision); head dims 16..256, padded to the
next power of two, with a value head dim ``Dv`` of its own; grouped-query and multi-query attention; causal masking
with any ``q_offset``; ``key_padding`` (``mask, prefix, bounds`` computed once per step by the caller: ``n_i`` and the
walked key range in closed form, one mask byte per key per tile, no tile outside ``bounds`` is read); general boolean
masks as broadcast views (zero strides, never materialised); any split count, including splits that end up empty.

Limits (honest):

- A general ``attn_mask`` is first scanned by ``_decode_mask_kernel`` (once per distinct mask row, per call) for
  ``n_i`` and the key ranges, and its bytes are then loaded per (row, key) in the main loop: the slow path. Pass
  ``key_padding`` for HF padding masks.
- ``vmc=True`` needs the mean of all visible V rows, so every visible V row is loaded and the V-traffic saving is
  gone (``kept_v_rows`` still counts the kept rows, as the semantics define it).
- K rows inside a split's range are loaded even where no row sees them (the causal tail of ``Lq > 1`` calls, holes
  inside a key-padding range): their scores are masked out, and the K load stays independent of any data load so
  that it pipelines.
- ``return_stats`` zero-fills a ``[B, Hkv, Lk]`` byte array of kept-V-row flags and scans it in the combine kernel.
- The split count is computed from one compiled specialisation per set of compile-time flags (the first one met);
  pointer alignment or unit strides that compile differently share it. The decode kernels are never autotuned
  (``config.DECODE_NUM_WARPS`` / ``DECODE_NUM_STAGES``): the split count depends on the compiled kernel, and an
  autotuner's benchmarking cannot run inside a CUDA-graph capture.
- Both products run on ``mma.sync`` (Triton's MMAv2), not Hopper's wgmma: a program has 16 rows (``tl.dot``'s
  minimum; a kv group usually has 4-8) and wgmma needs 64 per warp group. Swapping the operands (the 64-key K tile
  as the 64-row operand) compiles to wgmma, but triton 3.6's pipeliner rejects it at 2 or more stages (it cannot
  predicate a wgmma whose result feeds the V load mask), and unpipelined it used more registers (123) with no async
  copies.
- The combine is a second launch. Fusing it into the split kernel (the last program of each kv group to finish
  merges, through an atomic counter) is predicted (not measured) to save 1-1.5 µs per call: 12-19 % at B = 1 with
  8k keys, 4-6 % at 32k, <= 2 % at B = 1 / 128k and at B = 16 (bf16, Hq 32, Hkv 8, D 128). Not done: the counters
  would need an in-graph reset, and the release/acquire ordering of the partials cannot be validated without a GPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import config
from .common import (
    LOG2E,
    SDC_CODES,
    SDC_EXACT,
    SDC_NONE,
    SDC_THRESHOLD,
    max_nan,
    maximum_nan,
    safe_shift,
    soft_cap,
    unsupported_reason,
)

# How a call masks its keys (MASK_KIND).
MASK_NONE = tl.constexpr(0)
MASK_KEY_PADDING = tl.constexpr(1)  # (mask [B, Lk], prefix [B, Lk + 1], bounds [B, 2]): closed forms per batch
MASK_GENERAL = tl.constexpr(2)  # boolean [B, Hq, Lq, Lk] view, scanned once per call

# What _decode_score_pass_kernel computes (PASS).
PASS_LSE = tl.constexpr(0)  # per split: max and denominator over the visible keys (placement "post")
PASS_COUNT = tl.constexpr(1)  # per split: threshold-kept keys of each pruned row (cap)

MIN_BLOCK = 16  # tl.dot needs at least 16 rows, columns and reduction depth
MAX_BLOCK_N = 128


class DecodeResult(NamedTuple):
    """``out [B, Hq, Lq, Dv]``; with ``return_stats`` int32 ``kept``/``visible [B, Hq, Lq]`` and ``kept_v_rows
    [B, Hkv]`` (device tensors), else None."""

    out: torch.Tensor
    kept: torch.Tensor | None
    visible: torch.Tensor | None
    kept_v_rows: torch.Tensor | None


# ----------------------------------------------------------------------------------------------------------------
# @triton.jit helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _program_ids(num_splits, num_row_blocks, num_heads_kv):
    """(split, row block, kv head, batch) of this program; the split varies fastest along the 1-D grid."""
    pid = tl.program_id(0)
    split = pid % num_splits
    rest = pid // num_splits
    row_block = rest % num_row_blocks
    rest = rest // num_row_blocks
    hkv = (rest % num_heads_kv).to(tl.int64)
    b = (rest // num_heads_kv).to(tl.int64)
    return split, row_block, hkv, b


@triton.jit
def _packed_rows(row_block, hkv, b, num_heads_q, GROUP: tl.constexpr, SEQLEN_Q: tl.constexpr,
                 BLOCK_M: tl.constexpr):  # fmt: skip
    """The packed rows of a row block of kv head ``hkv``: packed row ``r`` is query head ``hkv·G + r // Lq``, query
    row ``r % Lq``. Returns ``(row_ok, head, pos, row)``, ``row`` the flat index into ``[B, Hq, Lq]``."""
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = offs_m < GROUP * SEQLEN_Q
    head = hkv * GROUP + offs_m // SEQLEN_Q  # [BLOCK_M] int64
    pos = offs_m % SEQLEN_Q  # [BLOCK_M]
    row = (b * num_heads_q + head) * SEQLEN_Q + pos  # [BLOCK_M] int64
    return row_ok, head, pos, row


@triton.jit
def _visible_count(b, head, pos, row_ok, kp_prefix_ptr, mask_n_ptr, seqlen_k, q_offset, mask_rows, mask_head_step,
                   CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):  # fmt: skip
    """``n_i``, the visible keys of each row over the whole key axis: closed forms without a mask and with key
    padding (``prefix[b, j]`` = attended keys before j), the mask scan's count with a general mask."""
    if CAUSAL:
        causal_end = tl.minimum(tl.maximum(q_offset + pos + 1, 0), seqlen_k)  # keys [0, causal_end) are causal
    else:
        causal_end = pos * 0 + seqlen_k
    if MASK_KIND == MASK_KEY_PADDING:
        n = tl.load(kp_prefix_ptr + b * (seqlen_k + 1) + causal_end, mask=row_ok, other=0)
    elif MASK_KIND == MASK_GENERAL:
        n = tl.load(mask_n_ptr + b * mask_rows + head * mask_head_step + pos, mask=row_ok, other=0)
    else:
        n = tl.where(row_ok, causal_end, 0)
    return n


@triton.jit
def _batch_key_range(b, kp_bounds_ptr, mask_bounds_ptr, seqlen_k, q_offset, mask_rows,
                     SEQLEN_Q: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                     BLOCK_R: tl.constexpr):  # fmt: skip
    """Keys ``[lo, hi)`` that some row of batch ``b`` may see: the key-padding bounds, or the union of the general
    mask's row ranges, cut by causality. Keys outside are never read."""
    lo = 0
    hi = seqlen_k
    if MASK_KIND == MASK_KEY_PADDING:
        lo = tl.load(kp_bounds_ptr + 2 * b)
        hi = tl.load(kp_bounds_ptr + 2 * b + 1)
    elif MASK_KIND == MASK_GENERAL:
        offs_r = tl.arange(0, BLOCK_R)  # [BLOCK_R] mask rows of the batch
        r_ok = offs_r < mask_rows
        row_bounds = mask_bounds_ptr + (b * mask_rows + offs_r) * 2
        lo = tl.min(tl.load(row_bounds, mask=r_ok, other=seqlen_k), axis=0)
        hi = tl.max(tl.load(row_bounds + 1, mask=r_ok, other=0), axis=0)
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum(q_offset + SEQLEN_Q, 0))  # the last row sees keys up to q_offset + Lq - 1
    return lo, tl.maximum(hi, lo)


@triton.jit
def _split_range(lo, hi, split, num_splits, BLOCK_N: tl.constexpr):
    """Keys ``[start, end)`` of split ``split``: the batch range's tiles dealt out evenly (split sizes differ by at
    most one tile; splits are empty when there are fewer tiles than splits)."""
    num_tiles = tl.cdiv(hi - lo, BLOCK_N)
    start = lo + (split * num_tiles // num_splits) * BLOCK_N
    end = tl.minimum(lo + ((split + 1) * num_tiles // num_splits) * BLOCK_N, hi)
    return start, end


@triton.jit
def _table_lookup(table_ptr, head, n, row_ok, table_len):
    """``table[h, min(n, T) - 1]`` of a contiguous float32 ``[Hq, T]`` table (row length clamped to >= 1)."""
    idx = tl.minimum(tl.maximum(n, 1), table_len) - 1
    return tl.load(table_ptr + head * table_len + idx, mask=row_ok, other=0.0)


@triton.jit
def _sink_units(sinks_ptr, head, row_ok, sm_scale, HAS_SINKS: tl.constexpr, SOFTCAP: tl.constexpr):
    """Each row's sink logit in the units of the kernel's scores (raw ``q·k`` products, or capped scores with
    softcap); -inf without sinks."""
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=float("-inf"))
        if not SOFTCAP:
            sink = sink / sm_scale
    else:
        sink = tl.full(head.shape, float("-inf"), tl.float32)
    return sink


@triton.jit
def _tile_visible(offs_n, end, row_ok, last_key, kp_mask_row, stride_pn, mask_rows_ptr, stride_mn,
                  CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):  # fmt: skip
    """Which keys ``offs_n`` of a tile each row sees: in the split, causal, allowed by the key-padding bytes (one per
    key) or by the general mask (one per row and key)."""
    in_split = offs_n < end  # [BLOCK_N]
    if MASK_KIND == MASK_KEY_PADDING:
        in_split = in_split & (tl.load(kp_mask_row + offs_n * stride_pn, mask=in_split, other=0) != 0)
    vis = row_ok[:, None] & in_split[None, :]  # [BLOCK_M, BLOCK_N]
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= last_key[:, None])
    if MASK_KIND == MASK_GENERAL:
        allowed = tl.load(mask_rows_ptr[:, None] + offs_n[None, :] * stride_mn, mask=vis, other=0)  # [BLOCK_M, BLOCK_N]
        vis = vis & (allowed != 0)
    return vis


@triton.jit
def _tile_scores(q, k_head_ptr, offs_n, end, offs_d, stride_kn, stride_kd, sm_scale, softcap,
                 D: tl.constexpr, SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """Scores of one key tile in the kernel's units: raw ``q·k`` products (the scale is folded into the exponent, so
    that ``exp(s - m)`` is one rounded product of an exact difference: decision 6), or softcapped scores."""
    k = tl.load(
        k_head_ptr + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=(offs_n < end)[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )  # [BLOCK_N, HEAD_DIM]
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if SOFTCAP:
        qk = soft_cap(qk * sm_scale, softcap)
    return qk


@triton.jit
def _keep_above(qk, vis, pruned, th_cmp, m_row, sm_scale, qk_scale, POST: tl.constexpr, SOFTCAP: tl.constexpr):
    """The threshold keep test of visible keys; rows that are not pruned keep every visible key. "pre": ``s > θ``
    (``th_cmp`` is θ). "post": ``(s - m) - log D_all > log θ`` in log2 units (``th_cmp`` is
    ``log2 θ + log2 D_all``, -inf for θ <= 0)."""
    if POST:
        above = (qk - m_row[:, None]) * qk_scale > th_cmp[:, None]  # [BLOCK_M, BLOCK_N]
    elif SOFTCAP:
        above = qk > th_cmp[:, None]
    else:
        above = qk * sm_scale > th_cmp[:, None]
    return vis & (above | ~pruned[:, None])


@triton.jit
def _merge_lse(lse_m_ptr, lse_l_ptr, row, row_ok, sink, num_splits, qk_scale, BLOCK_M: tl.constexpr,
               BLOCK_S: tl.constexpr):  # fmt: skip
    """Row max (with the sink) and full denominator ``D_all`` from the per-split partials of ``PASS_LSE``."""
    m_row = sink  # [BLOCK_M]
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        ok = row_ok[:, None] & (offs_s < num_splits)[None, :]  # [BLOCK_M, BLOCK_S]
        part_m = tl.load(lse_m_ptr + row[:, None] * num_splits + offs_s[None, :], mask=ok, other=float("-inf"))
        m_row = maximum_nan(m_row, max_nan(part_m, 1))
    shift = safe_shift(m_row)
    l_row = tl.exp2((sink - shift) * qk_scale)  # [BLOCK_M], 0 without a sink
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (offs_s < num_splits)[None, :]
        offs = row[:, None] * num_splits + offs_s[None, :]  # [BLOCK_M, BLOCK_S]
        part_m = tl.load(lse_m_ptr + offs, mask=ok, other=float("-inf"))
        part_l = tl.load(lse_l_ptr + offs, mask=ok, other=0.0)
        l_row += tl.sum(part_l * tl.exp2((part_m - shift[:, None]) * qk_scale), axis=1)
    return m_row, l_row


@triton.jit
def _post_bound(th, l_row):
    """``log2 θ + log2 D_all``, the bound of the "post" keep test in log2 units; -inf (keep all) for θ <= 0."""
    return tl.where(th > 0, tl.log2(th), float("-inf")) + tl.log2(l_row)


@triton.jit
def _right_count(cap_count_ptr, row, row_ok, split, num_splits, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """Threshold-kept keys of each row in the splits after ``split`` (from ``PASS_COUNT``)."""
    right = tl.zeros([BLOCK_M], tl.int32)
    for s0 in range(split + 1, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        ok = row_ok[:, None] & (offs_s < num_splits)[None, :]  # [BLOCK_M, BLOCK_S]
        right += tl.sum(tl.load(cap_count_ptr + row[:, None] * num_splits + offs_s[None, :], mask=ok, other=0), 1)
    return right


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seqlen_k", "q_offset"])
def _decode_mask_kernel(
    mask_ptr, mask_n_ptr, mask_bounds_ptr,
    stride_mb, stride_mh, stride_mm, stride_mn,
    seqlen_k, q_offset, mask_rows,
    SEQLEN_Q: tl.constexpr, BLOCK_K: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    """General masks only: one program per distinct mask row (batch, compact head, query row) counts its visible keys
    and finds their range ``[first, last + 1)`` (``[Lk, 0)`` when it sees none)."""
    pid = tl.program_id(0)  # batch · mask_rows + compact head · Lq + query row
    b = (pid // mask_rows).to(tl.int64)
    mrow = pid % mask_rows
    pos = mrow % SEQLEN_Q
    base = mask_ptr + b * stride_mb + (mrow // SEQLEN_Q).to(tl.int64) * stride_mh + pos * stride_mm
    end = seqlen_k
    if CAUSAL:
        end = tl.minimum(tl.maximum(q_offset + pos + 1, 0), seqlen_k)
    count = tl.zeros([BLOCK_K], tl.int32)
    first = tl.full([BLOCK_K], seqlen_k, tl.int32)
    last = tl.zeros([BLOCK_K], tl.int32)
    for k0 in range(0, end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        vis = tl.load(base + offs_k * stride_mn, mask=offs_k < end, other=0) != 0
        count += vis.to(tl.int32)
        first = tl.minimum(first, tl.where(vis, offs_k, seqlen_k))
        last = tl.maximum(last, tl.where(vis, offs_k + 1, 0))
    out = b * mask_rows + mrow
    tl.store(mask_n_ptr + out, tl.sum(count, axis=0))
    tl.store(mask_bounds_ptr + 2 * out, tl.min(first, axis=0))
    tl.store(mask_bounds_ptr + 2 * out + 1, tl.max(last, axis=0))


@triton.jit(do_not_specialize=["seqlen_k", "q_offset", "num_splits"])
def _decode_score_pass_kernel(
    q_ptr, k_ptr, theta_ptr, sinks_ptr,
    kp_mask_ptr, kp_prefix_ptr, kp_bounds_ptr, mask_ptr, mask_n_ptr, mask_bounds_ptr,
    lse_m_ptr, lse_l_ptr, cap_count_ptr, cap_tile_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_pb, stride_pn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    num_heads_q, num_heads_kv, seqlen_k, q_offset, num_splits, num_row_blocks, mask_rows, mask_head_step,
    theta_len, max_tiles, k_dense, sm_scale, qk_scale, softcap,
    PASS: tl.constexpr, GROUP: tl.constexpr, SEQLEN_Q: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, POST: tl.constexpr, HAS_SINKS: tl.constexpr,
    SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """A pass over K only (no V), per split and packed row. ``PASS_LSE``: max and denominator over the visible keys
    into ``lse_m``/``lse_l``. ``PASS_COUNT`` (after the LSE pass for "post", whose keep test needs the full row): the
    threshold-kept keys of pruned rows, per split into ``cap_count`` and, per tile, those of the split's tiles to its
    right into ``cap_tile``."""
    split, row_block, hkv, b = _program_ids(num_splits, num_row_blocks, num_heads_kv)
    row_ok, head, pos, row = _packed_rows(row_block, hkv, b, num_heads_q, GROUP=GROUP, SEQLEN_Q=SEQLEN_Q,
                                          BLOCK_M=BLOCK_M)  # fmt: skip
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + pos[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )  # [BLOCK_M, HEAD_DIM]
    k_head_ptr = k_ptr + b * stride_kb + hkv * stride_kh
    kp_mask_row = kp_mask_ptr + b * stride_pb
    mask_rows_ptr = mask_ptr + b * stride_mb + head * stride_mh + pos * stride_mm  # [BLOCK_M]
    last_key = q_offset + pos  # [BLOCK_M]
    lo, hi = _batch_key_range(b, kp_bounds_ptr, mask_bounds_ptr, seqlen_k, q_offset, mask_rows, SEQLEN_Q=SEQLEN_Q,
                              CAUSAL=CAUSAL, MASK_KIND=MASK_KIND, BLOCK_R=BLOCK_R)  # fmt: skip
    start, end = _split_range(lo, hi, split, num_splits, BLOCK_N=BLOCK_N)

    if PASS == PASS_COUNT:
        n = _visible_count(b, head, pos, row_ok, kp_prefix_ptr, mask_n_ptr, seqlen_k, q_offset, mask_rows,
                           mask_head_step, CAUSAL=CAUSAL, MASK_KIND=MASK_KIND)  # fmt: skip
        pruned = row_ok & (n > k_dense)
        th_cmp = _table_lookup(theta_ptr, head, n, row_ok, theta_len)  # [BLOCK_M]
        m_row = th_cmp
        if POST:
            sink = _sink_units(sinks_ptr, head, row_ok, sm_scale, HAS_SINKS=HAS_SINKS, SOFTCAP=SOFTCAP)
            m_row, l_row = _merge_lse(lse_m_ptr, lse_l_ptr, row, row_ok, sink, num_splits, qk_scale,
                                      BLOCK_M=BLOCK_M, BLOCK_S=BLOCK_S)  # fmt: skip
            th_cmp = _post_bound(th_cmp, l_row)
        count = tl.zeros([BLOCK_M], tl.int32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    num_tiles = tl.cdiv(end - start, BLOCK_N)
    for t in range(0, num_tiles):
        if PASS == PASS_COUNT:
            start_n = start + (num_tiles - 1 - t) * BLOCK_N  # right to left: count holds the tiles to the right
        else:
            start_n = start + t * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        vis = _tile_visible(offs_n, end, row_ok, last_key, kp_mask_row, stride_pn, mask_rows_ptr, stride_mn,
                            CAUSAL=CAUSAL, MASK_KIND=MASK_KIND)  # fmt: skip
        qk = _tile_scores(q, k_head_ptr, offs_n, end, offs_d, stride_kn, stride_kd, sm_scale, softcap, D=D,
                          SOFTCAP=SOFTCAP, INPUT_PRECISION=INPUT_PRECISION)  # fmt: skip
        if PASS == PASS_LSE:
            m_new = maximum_nan(m_i, max_nan(tl.where(vis, qk, float("-inf")), 1))
            shift = safe_shift(m_new)
            p = tl.where(vis, tl.exp2((qk - shift[:, None]) * qk_scale), 0.0)  # [BLOCK_M, BLOCK_N]
            l_i = l_i * tl.exp2((m_i - shift) * qk_scale) + tl.sum(p, axis=1)
            m_i = m_new
        else:
            keep = _keep_above(qk, vis, pruned, th_cmp, m_row, sm_scale, qk_scale, POST=POST, SOFTCAP=SOFTCAP)
            tl.store(cap_tile_ptr + row * max_tiles + (start_n - lo) // BLOCK_N, count, mask=row_ok)
            count += tl.sum((keep & pruned[:, None]).to(tl.int32), axis=1)
    part = row * num_splits + split  # [BLOCK_M]
    if PASS == PASS_LSE:
        tl.store(lse_m_ptr + part, m_i, mask=row_ok)
        tl.store(lse_l_ptr + part, l_i, mask=row_ok)
    else:
        tl.store(cap_count_ptr + part, count, mask=row_ok)


@triton.jit(do_not_specialize=["seqlen_k", "q_offset", "num_splits"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, theta_ptr, sinks_ptr,
    kp_mask_ptr, kp_prefix_ptr, kp_bounds_ptr, mask_ptr, mask_n_ptr, mask_bounds_ptr,
    lse_m_ptr, lse_l_ptr, cap_count_ptr, cap_tile_ptr,
    part_m_ptr, part_l_ptr, part_lk_ptr, part_n_ptr, part_acc_ptr, part_vsum_ptr, kv_flags_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    num_heads_q, num_heads_kv, seqlen_k, q_offset, num_splits, num_row_blocks, mask_rows, mask_head_step,
    theta_len, max_tiles, k_dense, cap, sm_scale, qk_scale, softcap,
    GROUP: tl.constexpr, SEQLEN_Q: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_THETA: tl.constexpr,
    POST: tl.constexpr, CAP: tl.constexpr, HAS_SINKS: tl.constexpr, VMC: tl.constexpr, SOFTCAP: tl.constexpr,
    STATS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One key split of one row block of a kv group: scores, online max and denominators, keep test, kept-row V
    loads and the P·V product; writes per-split partials of each packed row."""
    split, row_block, hkv, b = _program_ids(num_splits, num_row_blocks, num_heads_kv)
    row_ok, head, pos, row = _packed_rows(row_block, hkv, b, num_heads_q, GROUP=GROUP, SEQLEN_Q=SEQLEN_Q,
                                          BLOCK_M=BLOCK_M)  # fmt: skip
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + pos[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )  # [BLOCK_M, HEAD_DIM]
    k_head_ptr = k_ptr + b * stride_kb + hkv * stride_kh
    v_head_ptr = v_ptr + b * stride_vb + hkv * stride_vh
    kp_mask_row = kp_mask_ptr + b * stride_pb
    mask_rows_ptr = mask_ptr + b * stride_mb + head * stride_mh + pos * stride_mm  # [BLOCK_M]
    last_key = q_offset + pos  # [BLOCK_M]
    lo, hi = _batch_key_range(b, kp_bounds_ptr, mask_bounds_ptr, seqlen_k, q_offset, mask_rows, SEQLEN_Q=SEQLEN_Q,
                              CAUSAL=CAUSAL, MASK_KIND=MASK_KIND, BLOCK_R=BLOCK_R)  # fmt: skip
    start, end = _split_range(lo, hi, split, num_splits, BLOCK_N=BLOCK_N)

    if HAS_THETA:
        n = _visible_count(b, head, pos, row_ok, kp_prefix_ptr, mask_n_ptr, seqlen_k, q_offset, mask_rows,
                           mask_head_step, CAUSAL=CAUSAL, MASK_KIND=MASK_KIND)  # fmt: skip
        pruned = row_ok & (n > k_dense)  # [BLOCK_M]; rows with n <= k_dense keep every visible key
        th_cmp = _table_lookup(theta_ptr, head, n, row_ok, theta_len)  # [BLOCK_M]
        m_row = th_cmp
        if POST:
            sink = _sink_units(sinks_ptr, head, row_ok, sm_scale, HAS_SINKS=HAS_SINKS, SOFTCAP=SOFTCAP)
            m_row, l_row = _merge_lse(lse_m_ptr, lse_l_ptr, row, row_ok, sink, num_splits, qk_scale,
                                      BLOCK_M=BLOCK_M, BLOCK_S=BLOCK_S)  # fmt: skip
            th_cmp = _post_bound(th_cmp, l_row)
        if CAP:
            right = _right_count(cap_count_ptr, row, row_ok, split, num_splits, BLOCK_M=BLOCK_M, BLOCK_S=BLOCK_S)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # visible denominator D_all, relative to m_i
    l_kept = tl.zeros([BLOCK_M], tl.float32)  # kept denominator D_kept, relative to m_i
    n_kept = tl.zeros([BLOCK_M], tl.int32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], tl.float32)
    if VMC:
        v_sum = tl.zeros([BLOCK_M, HEAD_DIM_V], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        vis = _tile_visible(offs_n, end, row_ok, last_key, kp_mask_row, stride_pn, mask_rows_ptr, stride_mn,
                            CAUSAL=CAUSAL, MASK_KIND=MASK_KIND)  # fmt: skip
        qk = _tile_scores(q, k_head_ptr, offs_n, end, offs_d, stride_kn, stride_kd, sm_scale, softcap, D=D,
                          SOFTCAP=SOFTCAP, INPUT_PRECISION=INPUT_PRECISION)  # fmt: skip
        m_new = maximum_nan(m_i, max_nan(tl.where(vis, qk, float("-inf")), 1))  # [BLOCK_M]
        shift = safe_shift(m_new)
        alpha = tl.exp2((m_i - shift) * qk_scale)  # [BLOCK_M]
        p = tl.where(vis, tl.exp2((qk - shift[:, None]) * qk_scale), 0.0)  # [BLOCK_M, BLOCK_N]
        if HAS_THETA:
            keep = _keep_above(qk, vis, pruned, th_cmp, m_row, sm_scale, qk_scale, POST=POST, SOFTCAP=SOFTCAP)
            if CAP:
                by_threshold = (keep & pruned[:, None]).to(tl.int32)  # [BLOCK_M, BLOCK_N]
                tile_right = tl.load(cap_tile_ptr + row * max_tiles + (start_n - lo) // BLOCK_N, mask=row_ok, other=0)
                # Threshold-kept keys at or right of each key; only the cap most recent stay kept.
                rank = (right + tile_right)[:, None] + tl.cumsum(by_threshold, axis=1, reverse=True)
                keep = keep & ((rank <= cap) | ~pruned[:, None])
            p_kept = tl.where(keep, p, 0.0)  # [BLOCK_M, BLOCK_N]
        else:
            keep = vis
            p_kept = p
        l_i = l_i * alpha + tl.sum(p, axis=1)
        l_kept = l_kept * alpha + tl.sum(p_kept, axis=1)
        n_kept += tl.sum(keep.to(tl.int32), axis=1)
        col_kept = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_N] keys some packed row keeps
        if VMC:
            col_load = tl.max(vis.to(tl.int32), axis=0) > 0
        else:
            col_load = col_kept
        # The row mask is what makes pruning save memory traffic: a V row no packed row keeps is never read.
        v = tl.load(
            v_head_ptr + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=col_load[:, None] & (offs_dv < DV)[None, :],
            other=0.0,
        )  # [BLOCK_N, HEAD_DIM_V]
        acc = acc * alpha[:, None] + tl.dot(p_kept.to(v.dtype), v, input_precision=INPUT_PRECISION)
        if VMC:
            v_sum += tl.dot(vis.to(v.dtype), v, input_precision=INPUT_PRECISION)  # [BLOCK_M, HEAD_DIM_V]
        if STATS:
            flags = tl.full([BLOCK_N], 1, tl.int8)
            tl.store(kv_flags_ptr + (b * num_heads_kv + hkv) * seqlen_k + offs_n, flags, mask=col_kept)
        m_i = m_new

    part = row * num_splits + split  # [BLOCK_M]
    tl.store(part_m_ptr + part, m_i, mask=row_ok)
    tl.store(part_l_ptr + part, l_i, mask=row_ok)
    tl.store(part_lk_ptr + part, l_kept, mask=row_ok)
    tl.store(part_n_ptr + part, n_kept, mask=row_ok)
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_V + offs_dv[None, :], acc, mask=row_ok[:, None])
    if VMC:
        tl.store(part_vsum_ptr + part[:, None] * HEAD_DIM_V + offs_dv[None, :], v_sum, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["seqlen_k", "q_offset", "num_splits"])
def _decode_combine_kernel(
    part_m_ptr, part_l_ptr, part_lk_ptr, part_n_ptr, part_acc_ptr, part_vsum_ptr, kv_flags_ptr,
    theta_ptr, sdc_table_ptr, sinks_ptr, kp_prefix_ptr, mask_n_ptr,
    out_ptr, kept_ptr, visible_ptr, kv_rows_ptr,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads_q, seqlen_k, q_offset, num_splits, mask_rows, mask_head_step, theta_len, table_len, k_dense,
    sm_scale, qk_scale, sdc_scale,
    GROUP: tl.constexpr, SEQLEN_Q: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_THETA: tl.constexpr, SDC: tl.constexpr, POST: tl.constexpr, HAS_SINKS: tl.constexpr, VMC: tl.constexpr,
    SOFTCAP: tl.constexpr, STATS: tl.constexpr,
):  # fmt: skip
    """Merge the splits of one query row, add the sink, apply sdc and vmc, write the output and the statistics."""
    row = tl.program_id(0).to(tl.int64)  # (batch · Hq + head) · Lq + query row
    pos = row % SEQLEN_Q
    head = (row // SEQLEN_Q) % num_heads_q
    b = row // (SEQLEN_Q * num_heads_q)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    n = _visible_count(b, head, pos, True, kp_prefix_ptr, mask_n_ptr, seqlen_k, q_offset, mask_rows, mask_head_step,
                       CAUSAL=CAUSAL, MASK_KIND=MASK_KIND)  # fmt: skip

    m_s = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        part_m = tl.load(part_m_ptr + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
        m_s = maximum_nan(m_s, part_m)
    sink = _sink_units(sinks_ptr, head, True, sm_scale, HAS_SINKS=HAS_SINKS, SOFTCAP=SOFTCAP)
    m = maximum_nan(max_nan(m_s, 0), sink)
    shift = safe_shift(m)

    l_s = tl.zeros([BLOCK_S], tl.float32)
    lk_s = tl.zeros([BLOCK_S], tl.float32)
    n_s = tl.zeros([BLOCK_S], tl.int32)
    acc = tl.zeros([HEAD_DIM_V], tl.float32)
    if VMC:
        v_sum = tl.zeros([HEAD_DIM_V], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        s_ok = offs_s < num_splits
        part = row * num_splits + offs_s  # [BLOCK_S]
        weight = tl.exp2((tl.load(part_m_ptr + part, mask=s_ok, other=float("-inf")) - shift) * qk_scale)
        l_s += weight * tl.load(part_l_ptr + part, mask=s_ok, other=0.0)
        lk_s += weight * tl.load(part_lk_ptr + part, mask=s_ok, other=0.0)
        n_s += tl.load(part_n_ptr + part, mask=s_ok, other=0)
        tile = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM_V + offs_dv[None, :], mask=s_ok[:, None], other=0.0)
        acc += tl.sum(weight[:, None] * tile, axis=0)  # [HEAD_DIM_V]
        if VMC:
            tile = tl.load(part_vsum_ptr + part[:, None] * HEAD_DIM_V + offs_dv[None, :], mask=s_ok[:, None],
                           other=0.0)  # fmt: skip
            v_sum += tl.sum(tile, axis=0)
    e_sink = tl.exp2((sink - shift) * qk_scale)  # 0 without a sink
    d_all = tl.sum(l_s, axis=0) + e_sink
    d_kept = tl.sum(lk_s, axis=0) + e_sink
    kept = tl.sum(n_s, axis=0)

    denom = d_all
    if HAS_THETA:
        if not POST:
            if SDC == SDC_NONE:
                denom = d_kept
            elif SDC == SDC_EXACT:
                denom = d_kept + sdc_scale * (d_all - d_kept)
            elif SDC == SDC_THRESHOLD:
                th = _table_lookup(theta_ptr, head, n, True, theta_len)
                if SOFTCAP:
                    m_score = shift
                else:
                    m_score = shift * sm_scale
                dropped = (n - kept).to(tl.float32)
                # Exactly 0 when nothing is dropped, so θ = +inf never multiplies an infinity by 0.
                miss = tl.where(dropped > 0, dropped * tl.exp2((th - m_score) * LOG2E), 0.0)
                denom = d_kept + sdc_scale * miss
            else:
                denom = d_kept + sdc_scale * _table_lookup(sdc_table_ptr, head, n, True, table_len)
        # Rows that are never pruned (n <= k_dense) keep the dense softmax whatever the compensation mode.
        denom = tl.where(n > k_dense, denom, d_all)
    # Only an empty denominator (a row with nothing visible, or nothing kept with sdc "none") becomes 1; an infinite
    # one gives 0 and NaN stays NaN.
    denom = tl.where(denom == 0, 1.0, denom)
    o = acc / denom  # [HEAD_DIM_V]
    if VMC:
        v_mean = v_sum / tl.maximum(n, 1).to(tl.float32)
        o += (1.0 - d_kept / denom) * v_mean
    # A NaN in one column (from a V row the row keeps) makes the whole row NaN, as a NaN score does (decision 5).
    o = tl.where(tl.max((o != o).to(tl.int32), axis=0) > 0, float("nan"), o)
    tl.store(
        out_ptr + b * stride_ob + head * stride_oh + pos * stride_om + offs_dv * stride_od,
        o.to(out_ptr.dtype.element_ty),
        mask=offs_dv < DV,
    )
    if STATS:
        tl.store(kept_ptr + row, kept)
        tl.store(visible_ptr + row, n)
        # The first row of each kv group also totals the group's kept-V-row flags.
        if (head % GROUP == 0) & (pos == 0):
            group_row = b * (num_heads_q // GROUP) + head // GROUP
            total = tl.zeros([BLOCK_K], tl.int32)
            for k0 in range(0, seqlen_k, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
                total += tl.load(kv_flags_ptr + group_row * seqlen_k + offs_k, mask=offs_k < seqlen_k, other=0).to(
                    tl.int32
                )
            tl.store(kv_rows_ptr + group_row, tl.sum(total, axis=0))


# ----------------------------------------------------------------------------------------------------------------
# Split count: resident programs per SM of the compiled kernel, and a wave model
# ----------------------------------------------------------------------------------------------------------------


class DeviceLimits(NamedTuple):
    """What bounds the resident programs (CTAs) per SM. H100/H200 (sm_90): 132 SMs, 65536 registers,
    233472 bytes (228 KiB) of shared memory, 2048 threads and 32 CTAs per SM."""

    sm_count: int
    regs_per_sm: int
    smem_per_sm: int
    threads_per_sm: int
    max_ctas_per_sm: int


REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
REG_PARTITIONS = 4  # an SM's register file is split among 4 schedulers; a warp's registers come from one of them
MAX_REGS_PER_THREAD = 255
SMEM_ALLOC_UNIT = 128  # bytes
SMEM_RESERVED_PER_CTA = 1024  # bytes the driver reserves in every CTA's shared memory (sm_80 and later)
WARP_SIZE = 32


def resident_ctas_per_sm(n_regs: int, shared: int, num_warps: int, limits: DeviceLimits) -> int:
    """Programs of a compiled kernel that fit on one SM at once (the CUDA occupancy calculator's rules): the minimum
    of the register, shared-memory, thread and CTA limits. ``n_regs`` per thread and ``shared`` bytes per program
    are the compiled kernel's (``kernel.n_regs``, ``kernel.metadata.shared``). A pure function of its arguments."""
    threads = num_warps * WARP_SIZE
    by_threads = limits.threads_per_sm // threads
    if n_regs > MAX_REGS_PER_THREAD:
        return 0
    regs_per_warp = triton.cdiv(max(n_regs, 1) * WARP_SIZE, REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    warps_by_regs = (limits.regs_per_sm // REG_PARTITIONS // regs_per_warp) * REG_PARTITIONS
    by_regs = warps_by_regs // num_warps
    smem = triton.cdiv(shared + SMEM_RESERVED_PER_CTA, SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
    by_smem = limits.smem_per_sm // smem
    return max(0, min(by_threads, by_regs, by_smem, limits.max_ctas_per_sm))


@functools.lru_cache(maxsize=4096)
def choose_num_splits(programs: int, num_tiles: int, slots: int, max_splits: int, overhead_tiles: float,
                      tolerance: float = 0.0) -> int:  # fmt: skip
    """Key splits per (batch, kv head, row block) from a wave model of the split kernel's time (a prediction, not a
    measurement): ``cost(s) = waves(s) · (ceil(tiles / s) + overhead)``, where ``waves(s) = ceil(programs · s /
    slots)`` (``slots`` = resident programs per SM times SMs: the programs of one wave run concurrently, and a wave
    lasts as long as its longest split) and ``overhead`` is a split's fixed cost (query load, pipeline fill, partial
    stores) in tiles. Returns the fewest splits whose cost is within ``tolerance`` (relative) of the best: more
    splits cost combine work and partial traffic that the model leaves out."""
    slots = max(slots, 1)
    costs = [
        triton.cdiv(programs * s, slots) * (triton.cdiv(num_tiles, s) + overhead_tiles)
        for s in range(1, max(1, min(max_splits, num_tiles)) + 1)
    ]
    best = min(costs)
    return next(s for s, cost in enumerate(costs, start=1) if cost <= best * (1 + tolerance))


@functools.cache
def _device_limits(device_index: int) -> DeviceLimits:
    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    torch_props = torch.cuda.get_device_properties(device_index)
    capability = (torch_props.major, torch_props.minor)
    return DeviceLimits(
        sm_count=props["multiprocessor_count"],
        regs_per_sm=props["max_num_regs"],
        smem_per_sm=props["max_shared_mem"] + SMEM_RESERVED_PER_CTA,  # per-block opt-in maximum + the reserve
        threads_per_sm=getattr(torch_props, "max_threads_per_multi_processor", 2048),
        max_ctas_per_sm=config.DECODE_MAX_CTAS_PER_SM.get(capability, config.DECODE_MAX_CTAS_PER_SM_DEFAULT),
    )


_RESOURCES: dict[tuple, tuple[int, int, int]] = {}


def _compiled_resources(kernel, key: tuple, args: list, kwargs: dict) -> tuple[int, int, int] | None:
    """``(n_regs, shared, num_warps)`` of the compiled kernel for this specialisation, compiled ahead of its first
    launch with ``warmup`` (no launch, no device data read) and cached by the compile-time flags in ``key``; None
    when a compilation hook took the compile over."""
    if key not in _RESOURCES:
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        if hasattr(compiled, "result"):  # asynchronous compile mode
            compiled = compiled.result()
        if compiled is None:
            return None
        compiled._init_handles()  # loads the binary: n_regs is known from here on
        _RESOURCES[key] = (compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps)
    return _RESOURCES[key]


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------


def _compact(mask: torch.Tensor) -> torch.Tensor:
    """The mask without its broadcast dimensions (size 1 wherever the stride is 0)."""
    for dim in range(mask.dim()):
        if mask.stride(dim) == 0 and mask.shape[dim] > 1:
            mask = mask.narrow(dim, 0, 1)
    return mask


def _check_tuning(num_splits, block_n) -> None:
    for name, value in (("num_splits", num_splits), ("block_n", block_n)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if block_n is not None and (block_n & (block_n - 1) or not MIN_BLOCK <= block_n <= MAX_BLOCK_N):
        raise ValueError(f"block_n must be a power of two in {MIN_BLOCK}..{MAX_BLOCK_N}, got {block_n}")


def top_theta_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    theta: torch.Tensor | None = None,
    sdc_table: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    key_padding: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    k_dense: int = 0,
    sm_scale: float,
    softcap: float = 0.0,
    causal: bool = True,
    q_offset: int,
    placement: str = "pre",
    sdc: str = "exact",
    sdc_scale: float = 1.0,
    cap: int = 0,
    vmc: bool = False,
    return_stats: bool = False,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> DecodeResult:
    """Top-θ attention for a few query rows with split-K flash-decoding.

    Arguments are normalised as the kernel spec says (validated once by ``sparse_attention.ops.contract``); this
    launcher checks only what the kernels cannot run (``common.unsupported_reason``) and its own two tuning knobs.
    It makes no host sync.

    Args:
        query: ``[B, Hq, Lq, D]``; key ``[B, Hkv, Lk, D]``; value ``[B, Hkv, Lk, Dv]``; one dtype (float16, bfloat16,
            float32), one device, any strides, ``Hq`` a multiple of ``Hkv``.
        theta: None (dense) or float32 ``[Hq, T]`` (row i of head h uses ``theta[h, min(n_i, T) - 1]``; ±inf allowed).
        sdc_table: float32 ``[Hq, T']`` with ``sdc="calibrated"``. sinks: None or float32 ``[Hq]``.
        attn_mask: None or a boolean view of shape ``[B, Hq, Lq, Lk]`` (zero strides allowed). key_padding: None or
            ``(mask [B, Lk] bool, prefix [B, Lk + 1] int32, bounds [B, 2] int32)``; never both.
        k_dense, sm_scale, softcap, causal, q_offset, placement, sdc, sdc_scale, cap, vmc: as in the spec.
        return_stats: also return kept/visible counts and ``kept_v_rows``. out: optional ``[B, Hq, Lq, Dv]`` buffer.
        num_splits: key splits per (batch, kv head, row block); default from the compiled kernel's occupancy.
        block_n: keys per tile (power of two, 16..128); default ``config.DECODE_TILE_BYTES`` worth of K.

    Returns:
        ``DecodeResult(out, kept, visible, kept_v_rows)``.

    Raises:
        ValueError: what ``unsupported_reason`` refuses (device, dtype, head dims, bfloat16 under the interpreter), or
            bad ``num_splits``/``block_n``.
    """
    reason = unsupported_reason("decode", query, key, value)
    if reason is not None:
        raise ValueError(reason)
    _check_tuning(num_splits, block_n)
    batch, num_heads_q, seqlen_q, d = query.shape
    num_heads_kv, seqlen_k, dv = key.shape[1], key.shape[2], value.shape[3]
    group = num_heads_q // num_heads_kv
    device = query.device
    if out is None:
        out = torch.empty(batch, num_heads_q, seqlen_q, dv, dtype=query.dtype, device=device)
    kept = visible = kv_rows = None
    if return_stats:
        kept = torch.empty(batch, num_heads_q, seqlen_q, dtype=torch.int32, device=device)
        visible = torch.empty(batch, num_heads_q, seqlen_q, dtype=torch.int32, device=device)
        kv_rows = torch.empty(batch, num_heads_kv, dtype=torch.int32, device=device)
    if batch * num_heads_q * seqlen_q == 0 or seqlen_k == 0:
        for t in (out, kept, visible, kv_rows):
            if t is not None:
                t.zero_()
        return DecodeResult(out, kept, visible, kv_rows)

    has_theta = theta is not None
    post = has_theta and placement == "post"
    use_cap = has_theta and cap > 0
    # D_kept + 0 · D_miss is D_kept, also where D_miss is infinite (0 · inf = 0 by the table convention).
    sdc_code = SDC_CODES["none"] if has_theta and not post and sdc_scale == 0 else SDC_CODES[sdc]
    head_dim = triton.next_power_of_2(d)
    head_dim_v = triton.next_power_of_2(dv)
    rows = group * seqlen_q
    block_m = max(MIN_BLOCK, triton.next_power_of_2(min(rows, config.DECODE_MAX_BLOCK_M)))
    row_blocks = triton.cdiv(rows, block_m)
    if block_n is None:
        block_n = config.DECODE_TILE_BYTES // (head_dim * query.element_size())
        block_n = min(MAX_BLOCK_N, max(MIN_BLOCK, triton.next_power_of_2(block_n)))
    num_warps, num_stages = config.DECODE_NUM_WARPS, config.DECODE_NUM_STAGES
    # Full float32 products for float32 inputs (the default would be tf32); other dtypes keep Triton's default.
    input_precision = "ieee" if query.dtype == torch.float32 else None
    # exp(s - m) = exp2((qk - m_qk) · qk_scale) with one rounded constant (decision 6).
    qk_scale = (1.0 if softcap > 0 else sm_scale) * LOG2E.value

    placeholder = query  # for pointers a compiled-out path never reads
    kp_mask = kp_prefix = kp_bounds = placeholder
    kp_strides = (0, 0)
    mask_arg = mask_n = mask_bounds = placeholder
    mask_strides = (0, 0, 0, 0)
    mask_rows, mask_head_step = 1, 0
    if key_padding is not None:
        mask_kind = MASK_KEY_PADDING.value
        kp_mask = key_padding[0].view(torch.uint8)  # a bool tensor is read as bytes
        kp_strides = kp_mask.stride()
        kp_prefix, kp_bounds = key_padding[1].contiguous(), key_padding[2].contiguous()
    elif attn_mask is not None:
        mask_kind = MASK_GENERAL.value
        # n and the key ranges are computed once per distinct mask row: a mask shared by all heads (HF's
        # [B, 1, Lq, Lk]) is scanned once per batch and query row, not once per head.
        compact = _compact(attn_mask)
        mask_arg = compact.view(torch.uint8)
        mask_strides = attn_mask.stride()
        mask_heads = compact.shape[1]
        mask_rows = mask_heads * seqlen_q
        mask_head_step = seqlen_q if mask_heads > 1 else 0
        mask_n = torch.empty(batch, mask_rows, dtype=torch.int32, device=device)
        mask_bounds = torch.empty(batch, mask_rows, 2, dtype=torch.int32, device=device)
        _decode_mask_kernel[(batch * mask_rows,)](
            mask_arg, mask_n, mask_bounds, *compact.stride(), seqlen_k, q_offset, mask_rows,
            SEQLEN_Q=seqlen_q, BLOCK_K=config.DECODE_SCAN_BLOCK_K, CAUSAL=causal,
        )  # fmt: skip
    else:
        mask_kind = MASK_NONE.value
    theta_arg = theta if has_theta else placeholder
    table_arg = sdc_table if sdc_table is not None else placeholder
    sinks_arg = sinks if sinks is not None else placeholder
    theta_len = theta.shape[1] if has_theta else 1
    table_len = sdc_table.shape[1] if sdc_table is not None else 1

    flags = dict(GROUP=group, SEQLEN_Q=seqlen_q, HEAD_DIM=head_dim, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
                 BLOCK_S=config.DECODE_MERGE_BLOCK_S, BLOCK_R=triton.next_power_of_2(mask_rows), CAUSAL=causal,
                 MASK_KIND=mask_kind, POST=post, HAS_SINKS=sinks is not None, SOFTCAP=softcap > 0,
                 INPUT_PRECISION=input_precision, num_warps=num_warps, num_stages=num_stages)  # fmt: skip
    split_flags = dict(flags, HEAD_DIM_V=head_dim_v, DV=dv, HAS_THETA=has_theta, CAP=use_cap, VMC=vmc,
                       STATS=return_stats)  # fmt: skip
    masks = (kp_mask, kp_prefix, kp_bounds, mask_arg, mask_n, mask_bounds)
    max_tiles = triton.cdiv(seqlen_k, block_n)  # tiles of the longest possible key range
    mask_strides = (*kp_strides, *mask_strides)

    def buffers(splits: int, probe: bool) -> dict[str, object]:
        """The per-split buffers of ``splits`` splits; with ``probe`` their dtypes only (what ``warmup`` needs to
        compile the same specialisation), and the same placeholder where a path is compiled out."""
        parts = batch * num_heads_q * seqlen_q * splits
        shapes = dict(lse_m=((parts,), torch.float32, post), lse_l=((parts,), torch.float32, post),
                      cap_count=((parts,), torch.int32, use_cap),
                      cap_tile=((batch * num_heads_q * seqlen_q, max_tiles), torch.int32, use_cap),
                      part_m=((parts,), torch.float32, True),
                      part_l=((parts,), torch.float32, True), part_lk=((parts,), torch.float32, True),
                      part_n=((parts,), torch.int32, True), part_acc=((parts, head_dim_v), torch.float32, True),
                      part_vsum=((parts, head_dim_v), torch.float32, vmc))  # fmt: skip
        made = {}
        for name, (shape, dtype, needed) in shapes.items():
            made[name] = (dtype if probe else torch.empty(shape, dtype=dtype, device=device)) if needed else placeholder
        flags_shape = (batch, num_heads_kv, seqlen_k)
        made["kv_flags"] = placeholder
        if return_stats:
            made["kv_flags"] = torch.int8 if probe else torch.zeros(flags_shape, dtype=torch.int8, device=device)
        return made

    def split_args(splits: int, buf: dict) -> list:
        return [
            query, key, value, theta_arg, sinks_arg, *masks, buf["lse_m"], buf["lse_l"], buf["cap_count"],
            buf["cap_tile"], buf["part_m"], buf["part_l"], buf["part_lk"], buf["part_n"], buf["part_acc"],
            buf["part_vsum"], buf["kv_flags"], *query.stride(), *key.stride(), *value.stride(), *mask_strides,
            num_heads_q, num_heads_kv, seqlen_k, q_offset, splits, row_blocks, mask_rows, mask_head_step,
            theta_len, max_tiles, k_dense, cap, sm_scale, qk_scale, softcap,
        ]  # fmt: skip

    if num_splits is None:
        keys = min(max(q_offset + seqlen_q, 0), seqlen_k) if causal else seqlen_k
        programs = batch * num_heads_kv * row_blocks
        if device.type == "cuda":
            # seqlen_k, q_offset and num_splits are not specialised on, so this one compile serves every step.
            key_flags = (device.index, query.dtype, tuple(sorted(split_flags.items())))
            probe = split_args(1, buffers(1, probe=True))
            resources = _compiled_resources(_decode_split_kernel, key_flags, probe, split_flags)
            limits = _device_limits(device.index if device.index is not None else torch.cuda.current_device())
            resident = 1 if resources is None else max(1, resident_ctas_per_sm(*resources, limits))
            slots = resident * limits.sm_count
        else:
            slots = config.DECODE_INTERPRET_SLOTS
        num_splits = choose_num_splits(programs, triton.cdiv(max(keys, 1), block_n), slots, config.DECODE_MAX_SPLITS,
                                       config.DECODE_SPLIT_OVERHEAD_TILES, config.DECODE_SPLIT_TOLERANCE)  # fmt: skip
    grid = (num_splits * row_blocks * num_heads_kv * batch,)
    buf = buffers(num_splits, probe=False)

    for pass_kind, needed in ((PASS_LSE.value, post), (PASS_COUNT.value, use_cap)):
        if needed:
            _decode_score_pass_kernel[grid](
                query, key, theta_arg, sinks_arg, *masks, buf["lse_m"], buf["lse_l"], buf["cap_count"],
                buf["cap_tile"], *query.stride(), *key.stride(), *mask_strides,
                num_heads_q, num_heads_kv, seqlen_k, q_offset, num_splits, row_blocks, mask_rows, mask_head_step,
                theta_len, max_tiles, k_dense, sm_scale, qk_scale, softcap,
                PASS=pass_kind, **flags,
            )  # fmt: skip
    _decode_split_kernel[grid](*split_args(num_splits, buf), **split_flags)
    stat_args = (kept, visible, kv_rows) if return_stats else (buf["part_n"],) * 3
    _decode_combine_kernel[(batch * num_heads_q * seqlen_q,)](
        buf["part_m"], buf["part_l"], buf["part_lk"], buf["part_n"], buf["part_acc"], buf["part_vsum"],
        buf["kv_flags"], theta_arg, table_arg, sinks_arg, kp_prefix, mask_n, out, *stat_args, *out.stride(),
        num_heads_q, seqlen_k, q_offset, num_splits, mask_rows, mask_head_step, theta_len, table_len, k_dense,
        sm_scale, qk_scale, sdc_scale,
        GROUP=group, SEQLEN_Q=seqlen_q, HEAD_DIM_V=head_dim_v, DV=dv,
        BLOCK_S=min(triton.next_power_of_2(num_splits), max(1, config.DECODE_COMBINE_TILE // head_dim_v)),
        BLOCK_K=config.DECODE_SCAN_BLOCK_K, CAUSAL=causal, MASK_KIND=mask_kind, HAS_THETA=has_theta, SDC=sdc_code,
        POST=post, HAS_SINKS=sinks is not None, SOFTCAP=softcap > 0, VMC=vmc, STATS=return_stats,
        num_warps=config.DECODE_COMBINE_WARPS,
    )  # fmt: skip
    return DecodeResult(out, kept, visible, kv_rows)
