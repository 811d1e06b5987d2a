"""Top-θ decode attention: split-K flash-decoding that reads only the V rows it keeps.

Computes Top-θ attention (Berestizshevsky, Andri, Cavigelli, "Top-Theta Attention: Sparsifying Transformers by
Compensated Thresholding", arXiv 2502.08363) for calls with few query rows: ``Lq == 1`` for plain generation, a
few rows for speculative decoding. The semantics are those of DESIGN.md and ``sparse_attention.reference``.

How it runs (the file holds helpers, then kernels, then the launcher; read it from the launcher up):

- Grid ``(key split, kv head x row block, batch)``. The ``G·Lq`` query rows of one kv group (its ``G`` query heads
  times the ``Lq`` query rows) are packed into one program, so every K and V row is read once per group.
- ``_decode_split_kernel`` scores its keys in ``BLOCK_N`` tiles, applies each row's threshold
  ``theta[h, min(n_i, T) - 1]`` (``n_i`` counts the visible keys of the whole row, over all splits) and ``k_dense``,
  and loads the V rows of a tile with a row mask that is true only where some row of the program keeps the key, so
  pruned V rows cause no memory traffic. It writes partial (max, visible denominator, kept denominator, kept count,
  unnormalised output, visible V sum).
- ``_decode_combine_kernel`` merges the splits of one row, applies ``sdc`` and ``vmc``, writes the output and the
  statistics (kept and visible counts, and ``kept_v_rows [B, Hkv]`` summed from per-key flags that the split
  kernel set for exactly the kept V rows it loaded).
- placement ``"post"`` (keep ``p > θ``) needs the full-row log-sum-exp before any keep decision: a first pass,
  ``_decode_lse_kernel``, scores K only and writes per-split (max, denominator); the split kernel merges those for
  its rows and keeps ``exp(s - m) / D_all > θ``. "post" therefore reads K twice.

Supports float16, bfloat16 and float32 (float32 dot products in full "ieee" precision); head dims 16..256 (others
padded to the next power of two); grouped-query and multi-query attention; causal masking with any ``q_offset``;
boolean masks given as broadcast views (zero strides are passed to the kernel, never materialised); per-batch key
ranges taken from the mask (HF left padding, static caches longer than their valid prefix), so keys outside a
batch's range are never read; any number of splits, including splits that end up empty.

Limits:

- With a mask, ``_decode_mask_kernel`` first scans each distinct mask row (once per batch and query row for HF's
  head-broadcast masks) for ``n_i`` and the range of visible keys; without a mask both are closed forms.
- ``vmc=True`` needs the mean of all visible V rows, so the split kernel then loads every visible V row and the
  V-traffic saving is gone (``kept_v_rows`` still counts the kept rows, as the semantics define it).
- More than ``config.DECODE_MAX_BLOCK_M`` packed rows (very wide groups, long speculative drafts) run as several
  row blocks, each reading K and the V rows it keeps.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import config
from .common import LOG2E, SDC_CALIBRATED, SDC_CODES, SDC_NONE, SDC_THRESHOLD, check_attention_inputs

NEG_INF = tl.constexpr(float("-inf"))

_MIN_BLOCK_M = 16  # tl.dot needs at least 16 rows
_MIN_BLOCK_N = 16
_MAX_BLOCK_N = 128


def _autotune_configs() -> list[triton.Config]:
    settings = config.DECODE_WARPS_STAGES if config.AUTOTUNE else config.DECODE_WARPS_STAGES[:1]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in settings]


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _program_queries(q_ptr, stride_qb, stride_qh, stride_qm, stride_qd, Hq, head_dim, num_row_blocks,
                     GROUP: tl.constexpr, LQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """The kv group ``hkv``, batch ``b`` and packed query rows of a (key split, kv group x row block, batch) program.

    Row ``r`` of kv group ``hkv`` is query head ``hkv·G + r // Lq``, query row ``r % Lq``; row block ``rb`` holds rows
    ``rb·BLOCK_M ...``. Returns ``(hkv, b, row_ok, head, qi, qrow, offs_d, d_ok, q)`` with ``qrow`` the rows' index
    in ``[B, Hq, Lq]`` and ``q`` their ``[BLOCK_M, HEAD_DIM]`` queries (zero-padded)."""
    hkv = (tl.program_id(1) // num_row_blocks).to(tl.int64)
    rb = tl.program_id(1) % num_row_blocks
    b = tl.program_id(2).to(tl.int64)
    offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = offs_m < GROUP * LQ
    head = hkv * GROUP + offs_m // LQ
    qi = offs_m % LQ
    qrow = (b * Hq + head) * LQ + qi  # [BLOCK_M]
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < head_dim
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, HEAD_DIM]
    return hkv, b, row_ok, head, qi, qrow, offs_d, d_ok, q


@triton.jit
def _visible_count(n_ptr, b, head, qi, row_ok, mask_rows, n_stride_h, q_offset, Lk,
                   CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):  # fmt: skip
    """``n_i``, the visible keys of the whole row: from ``_decode_mask_kernel`` with a mask (``n_stride_h`` is 0 when
    the mask is the same for every head), a closed form without one."""
    if HAS_MASK:
        n = tl.load(n_ptr + b * mask_rows + head * n_stride_h + qi, mask=row_ok, other=0)
    elif CAUSAL:
        n = tl.minimum(tl.maximum(q_offset + qi + 1, 0), Lk)
    else:
        n = qi * 0 + Lk
    return n


@triton.jit
def _table_lookup(table_ptr, head, n, row_ok, table_len):
    """``table[h, min(n, T) - 1]`` of a contiguous float32 ``[Hq, T]`` table (row length clamped to >= 1)."""
    idx = tl.minimum(tl.maximum(n, 1), table_len) - 1
    return tl.load(table_ptr + head * table_len + idx, mask=row_ok, other=0.0)


@triton.jit
def _split_keys(bounds_ptr, b, mask_rows, pid_s, num_splits, q_offset, Lk,
                LQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):  # fmt: skip
    """Key range ``[start, end)`` of split ``pid_s``: the batch's possibly visible keys cut into ``num_splits``
    pieces of whole tiles; trailing splits may be shorter or empty. With a mask, the batch's range is the union of
    its mask rows' ranges, so left padding and the unwritten tail of a static cache are never read."""
    if HAS_MASK:
        offs_r = tl.arange(0, BLOCK_R)  # [BLOCK_R]
        r_ok = offs_r < mask_rows
        row_bounds = bounds_ptr + (b * mask_rows + offs_r) * 2
        lo = tl.min(tl.load(row_bounds, mask=r_ok, other=Lk), axis=0)
        hi = tl.max(tl.load(row_bounds + 1, mask=r_ok, other=0), axis=0)
    else:
        lo = 0
        if CAUSAL:
            hi = tl.minimum(tl.maximum(q_offset + LQ, 0), Lk)
        else:
            hi = Lk
    length = tl.maximum(hi - lo, 0)
    per_split = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    start = lo + pid_s * per_split
    end = tl.minimum(start + per_split, lo + length)
    return start, end


@triton.jit
def _score_tile(q, k_base, mask_base, last_key, row_ok, start_n, end, offs_d, d_ok, scale,
                stride_kn, stride_kd, stride_mn,
                BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Float32 scores of one key tile and which of them each row sees. K rows no row sees are not loaded."""
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    vis = row_ok[:, None] & (offs_n < end)[None, :]  # [BLOCK_M, BLOCK_N]
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= last_key[:, None])
    if HAS_MASK:
        allowed = tl.load(mask_base[:, None] + offs_n[None, :] * stride_mn, mask=vis, other=0)  # [BLOCK_M, BLOCK_N]
        vis = vis & (allowed != 0)
    col_vis = tl.max(vis.to(tl.int32), axis=0) > 0  # [BLOCK_N]
    k = tl.load(
        k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=col_vis[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_N, HEAD_DIM]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]
    return offs_n, s, vis, col_vis


@triton.jit
def _merge_lse(part_m_ptr, part_l_ptr, qrow, row_ok, num_splits, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge per-split (max, denominator) partials of rows ``qrow`` into the row max and the full denominator."""
    m_row = tl.full([BLOCK_M], NEG_INF, tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        ok = row_ok[:, None] & (offs_s < num_splits)[None, :]  # [BLOCK_M, BLOCK_S]
        part_m = tl.load(part_m_ptr + qrow[:, None] * num_splits + offs_s[None, :], mask=ok, other=NEG_INF)
        m_row = tl.maximum(m_row, tl.max(part_m, axis=1))
    m_safe = tl.where(m_row == NEG_INF, 0.0, m_row)
    l_row = tl.zeros([BLOCK_M], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (offs_s < num_splits)[None, :]
        offs = qrow[:, None] * num_splits + offs_s[None, :]  # [BLOCK_M, BLOCK_S]
        part_m = tl.load(part_m_ptr + offs, mask=ok, other=NEG_INF)
        part_l = tl.load(part_l_ptr + offs, mask=ok, other=0.0)
        l_row += tl.sum(part_l * tl.exp2((part_m - m_safe[:, None]) * LOG2E), axis=1)
    return m_row, l_row


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _decode_mask_kernel(
    mask_ptr, n_ptr, bounds_ptr,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Lk, mask_rows, q_offset,
    LQ: tl.constexpr, BLOCK_K: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    """One mask row (batch, compact head, query row): its visible count ``n`` and the range ``[first, last + 1)`` of
    its visible keys (``[Lk, 0)`` when it sees none). Runs before the split kernels, which need ``n`` for the
    threshold and the ranges to skip keys no row sees."""
    row = tl.program_id(0)  # compact head · Lq + query row
    b = tl.program_id(1).to(tl.int64)
    qi = row % LQ
    base = mask_ptr + b * stride_mb + (row // LQ) * stride_mh + qi * stride_mm
    end = Lk
    if CAUSAL:
        end = tl.minimum(tl.maximum(q_offset + qi + 1, 0), Lk)
    count = tl.zeros([BLOCK_K], tl.int32)
    first = tl.full([BLOCK_K], Lk, tl.int32)
    last = tl.zeros([BLOCK_K], tl.int32)
    for k0 in range(0, end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        vis = tl.load(base + offs_k * stride_mn, mask=offs_k < end, other=0) != 0
        count += vis.to(tl.int32)
        first = tl.minimum(first, tl.where(vis, offs_k, Lk))
        last = tl.maximum(last, tl.where(vis, offs_k + 1, 0))
    out = b * mask_rows + row
    tl.store(n_ptr + out, tl.sum(count, axis=0))
    tl.store(bounds_ptr + 2 * out, tl.min(first, axis=0))
    tl.store(bounds_ptr + 2 * out + 1, tl.max(last, axis=0))


@triton.autotune(configs=_autotune_configs(), key=["HEAD_DIM", "BLOCK_M", "BLOCK_N"])
@triton.jit
def _decode_lse_kernel(
    q_ptr, k_ptr, mask_ptr, bounds_ptr, lse_m_ptr, lse_l_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, Lk, head_dim, num_splits, num_row_blocks, mask_rows, q_offset, scale,
    GROUP: tl.constexpr, LQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Placement "post", first pass: per split, the max and the denominator over the visible keys (reads K only)."""
    pid_s = tl.program_id(0)
    hkv, b, row_ok, head, qi, qrow, offs_d, d_ok, q = _program_queries(
        q_ptr, stride_qb, stride_qh, stride_qm, stride_qd, Hq, head_dim, num_row_blocks, GROUP, LQ, HEAD_DIM, BLOCK_M
    )
    k_base = k_ptr + b * stride_kb + hkv * stride_kh
    mask_base = mask_ptr + b * stride_mb + head * stride_mh + qi * stride_mm  # [BLOCK_M]
    last_key = q_offset + qi
    start, end = _split_keys(bounds_ptr, b, mask_rows, pid_s, num_splits, q_offset, Lk,
                             LQ, BLOCK_N, BLOCK_R, CAUSAL, HAS_MASK)  # fmt: skip

    m_i = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        _, s, vis, _ = _score_tile(q, k_base, mask_base, last_key, row_ok, start_n, end, offs_d, d_ok, scale,
                                   stride_kn, stride_kd, stride_mn,
                                   BLOCK_N, CAUSAL, HAS_MASK, DOT_PRECISION)  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(tl.where(vis, s, NEG_INF), axis=1))
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        e = tl.where(vis, tl.exp2((s - m_safe[:, None]) * LOG2E), 0.0)  # [BLOCK_M, BLOCK_N]
        l_i = l_i * tl.exp2((m_i - m_safe) * LOG2E) + tl.sum(e, axis=1)
        m_i = m_new
    part = qrow * num_splits + pid_s
    tl.store(lse_m_ptr + part, m_i, mask=row_ok)
    tl.store(lse_l_ptr + part, l_i, mask=row_ok)


@triton.autotune(configs=_autotune_configs(), key=["HEAD_DIM", "BLOCK_M", "BLOCK_N"])
@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, n_ptr, bounds_ptr, theta_ptr, lse_m_ptr, lse_l_ptr,
    part_m_ptr, part_all_ptr, part_kept_ptr, part_count_ptr, part_acc_ptr, part_vsum_ptr, flags_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, Hkv, Lk, head_dim, num_splits, num_row_blocks, mask_rows, n_stride_h, theta_len, k_dense, q_offset, scale,
    GROUP: tl.constexpr, LQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_THETA: tl.constexpr,
    POST: tl.constexpr, VMC: tl.constexpr, STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One key split of one kv group: scores, thresholds, kept-row V loads, partial results per packed row."""
    pid_s = tl.program_id(0)
    hkv, b, row_ok, head, qi, qrow, offs_d, d_ok, q = _program_queries(
        q_ptr, stride_qb, stride_qh, stride_qm, stride_qd, Hq, head_dim, num_row_blocks, GROUP, LQ, HEAD_DIM, BLOCK_M
    )
    k_base = k_ptr + b * stride_kb + hkv * stride_kh
    v_base = v_ptr + b * stride_vb + hkv * stride_vh
    mask_base = mask_ptr + b * stride_mb + head * stride_mh + qi * stride_mm  # [BLOCK_M]
    last_key = q_offset + qi
    start, end = _split_keys(bounds_ptr, b, mask_rows, pid_s, num_splits, q_offset, Lk,
                             LQ, BLOCK_N, BLOCK_R, CAUSAL, HAS_MASK)  # fmt: skip

    if HAS_THETA:
        n = _visible_count(n_ptr, b, head, qi, row_ok, mask_rows, n_stride_h, q_offset, Lk, CAUSAL, HAS_MASK)
        th = _table_lookup(theta_ptr, head, n, row_ok, theta_len)  # [BLOCK_M]
        dense_row = n <= k_dense
        if POST:
            m_row, l_row = _merge_lse(lse_m_ptr, lse_l_ptr, qrow, row_ok, num_splits, BLOCK_M, BLOCK_S)
            l_row = tl.where(l_row > 0, l_row, 1.0)

    m_i = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_all = tl.zeros([BLOCK_M], tl.float32)
    l_kept = tl.zeros([BLOCK_M], tl.float32)
    kept = tl.zeros([BLOCK_M], tl.int32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    vsum = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n, s, vis, col_vis = _score_tile(q, k_base, mask_base, last_key, row_ok, start_n, end, offs_d, d_ok,
                                              scale, stride_kn, stride_kd, stride_mn, BLOCK_N, CAUSAL, HAS_MASK,
                                              DOT_PRECISION)  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(tl.where(vis, s, NEG_INF), axis=1))
        # A row with nothing visible yet keeps max -inf; exponentiate against 0 so that no -inf - -inf NaN appears.
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.exp2((m_i - m_safe) * LOG2E)  # [BLOCK_M]
        e = tl.where(vis, tl.exp2((s - m_safe[:, None]) * LOG2E), 0.0)  # [BLOCK_M, BLOCK_N]
        if HAS_THETA:
            if POST:
                above = tl.exp2((s - m_row[:, None]) * LOG2E) / l_row[:, None] > th[:, None]
            else:
                above = s > th[:, None]
            keep = vis & (above | dense_row[:, None])  # [BLOCK_M, BLOCK_N]
        else:
            keep = vis
        e_kept = tl.where(keep, e, 0.0)  # [BLOCK_M, BLOCK_N]
        l_all = l_all * alpha + tl.sum(e, axis=1)
        l_kept = l_kept * alpha + tl.sum(e_kept, axis=1)
        kept += tl.sum(keep.to(tl.int32), axis=1)
        col_kept = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_N]
        if VMC:
            col_load = col_vis
        else:
            col_load = col_kept
        # The row mask is what makes pruning save memory traffic: a V row no packed row keeps is never read.
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=col_load[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, HEAD_DIM]
        acc = acc * alpha[:, None] + tl.dot(e_kept.to(v.dtype), v, input_precision=DOT_PRECISION)
        if VMC:
            vsum += tl.dot(vis.to(v.dtype), v, input_precision=DOT_PRECISION)
        if STATS:
            tl.store(flags_ptr + (b * Hkv + hkv) * Lk + offs_n, tl.full([BLOCK_N], 1, tl.int8), mask=col_kept)
        m_i = m_new

    part = qrow * num_splits + pid_s  # [BLOCK_M]
    tl.store(part_m_ptr + part, m_i, mask=row_ok)
    tl.store(part_all_ptr + part, l_all, mask=row_ok)
    tl.store(part_kept_ptr + part, l_kept, mask=row_ok)
    tl.store(part_count_ptr + part, kept, mask=row_ok)
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
    if VMC:
        tl.store(part_vsum_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], vsum, mask=row_ok[:, None])


@triton.jit
def _decode_combine_kernel(
    part_m_ptr, part_all_ptr, part_kept_ptr, part_count_ptr, part_acc_ptr, part_vsum_ptr, flags_ptr,
    n_ptr, theta_ptr, table_ptr, out_ptr, kept_ptr, visible_ptr, kv_rows_ptr,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, Lk, head_dim, num_splits, mask_rows, n_stride_h, theta_len, table_len, k_dense, q_offset,
    GROUP: tl.constexpr, LQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_THETA: tl.constexpr, SDC: tl.constexpr,
    POST: tl.constexpr, VMC: tl.constexpr, STATS: tl.constexpr,
):  # fmt: skip
    """Merge the splits of one query row, apply sdc and vmc, write the output and the statistics."""
    pid_row = tl.program_id(0)  # head · Lq + query row
    b = tl.program_id(1).to(tl.int64)
    head = pid_row // LQ
    qi = pid_row % LQ
    qrow = b * Hq * LQ + pid_row
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < head_dim
    n = _visible_count(n_ptr, b, head, qi, True, mask_rows, n_stride_h, q_offset, Lk, CAUSAL, HAS_MASK)

    m_row = tl.full([BLOCK_S], NEG_INF, tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        m_row = tl.maximum(m_row, tl.load(part_m_ptr + qrow * num_splits + offs_s, mask=offs_s < num_splits,
                                          other=NEG_INF))  # fmt: skip
    m = tl.max(m_row, axis=0)
    m_safe = tl.where(m == NEG_INF, 0.0, m)

    l_all = tl.zeros([BLOCK_S], tl.float32)
    l_kept = tl.zeros([BLOCK_S], tl.float32)
    kept = tl.zeros([BLOCK_S], tl.int32)
    acc = tl.zeros([BLOCK_S, HEAD_DIM], tl.float32)
    vsum = tl.zeros([BLOCK_S, HEAD_DIM], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < num_splits
        part = qrow * num_splits + offs_s  # [BLOCK_S]
        weight = tl.exp2((tl.load(part_m_ptr + part, mask=s_ok, other=NEG_INF) - m_safe) * LOG2E)  # [BLOCK_S]
        l_all += weight * tl.load(part_all_ptr + part, mask=s_ok, other=0.0)
        l_kept += weight * tl.load(part_kept_ptr + part, mask=s_ok, other=0.0)
        kept += tl.load(part_count_ptr + part, mask=s_ok, other=0)
        tile = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        acc += weight[:, None] * tile  # [BLOCK_S, HEAD_DIM]
        if VMC:
            vsum += tl.load(part_vsum_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    d_all = tl.sum(l_all, axis=0)
    d_kept = tl.sum(l_kept, axis=0)
    kept_n = tl.sum(kept, axis=0)

    denom = d_all
    if HAS_THETA:
        if not POST:
            if SDC == SDC_NONE:
                denom = d_kept
            elif SDC == SDC_THRESHOLD:
                th = _table_lookup(theta_ptr, head, n, True, theta_len)
                dropped = (n - kept_n).to(tl.float32)
                denom = d_kept + tl.where(dropped > 0, dropped * tl.exp(th - m_safe), 0.0)
            elif SDC == SDC_CALIBRATED:
                denom = d_kept + _table_lookup(table_ptr, head, n, True, table_len)
        # Rows that are never pruned (n <= k_dense) keep the dense softmax whatever the compensation mode.
        denom = tl.where(n > k_dense, denom, d_all)
    denom = tl.where(denom > 0, denom, 1.0)
    o = tl.sum(acc, axis=0) / denom  # [HEAD_DIM]
    if VMC:
        v_mean = tl.sum(vsum, axis=0) / tl.maximum(n, 1).to(tl.float32)
        o += (1.0 - d_kept / denom) * v_mean
    tl.store(
        out_ptr + b * stride_ob + head * stride_oh + qi * stride_om + offs_d * stride_od,
        o.to(out_ptr.dtype.element_ty),
        mask=d_ok,
    )
    if STATS:
        tl.store(kept_ptr + qrow, kept_n)
        tl.store(visible_ptr + qrow, n)
        # The first row of each kv group also totals the group's kept-V-row flags.
        if pid_row % (GROUP * LQ) == 0:
            group_row = b * (Hq // GROUP) + head // GROUP
            total = tl.zeros([BLOCK_K], tl.int32)
            for k0 in range(0, Lk, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                total += tl.load(flags_ptr + group_row * Lk + offs_k, mask=offs_k < Lk, other=0).to(tl.int32)
            tl.store(kv_rows_ptr + group_row, tl.sum(total, axis=0))


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(device: torch.device, programs: int, keys: int) -> int:
    """Splits per (batch, kv group, row block): enough programs to fill the GPU, none shorter than
    ``config.DECODE_MIN_KEYS_PER_SPLIT`` keys, at most ``config.DECODE_MAX_SPLITS``."""
    sms = (
        _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "cuda"
        else 1
    )
    by_length = triton.cdiv(max(keys, 1), config.DECODE_MIN_KEYS_PER_SPLIT)
    by_occupancy = triton.cdiv(config.DECODE_PROGRAMS_PER_SM * sms, max(programs, 1))
    return max(1, min(by_length, by_occupancy, config.DECODE_MAX_SPLITS))


def _compact(mask: torch.Tensor) -> torch.Tensor:
    """The mask without its broadcast dimensions (size 1 wherever the stride is 0)."""
    for dim in range(mask.dim()):
        if mask.stride(dim) == 0 and mask.shape[dim] > 1:
            mask = mask.narrow(dim, 0, 1)
    return mask


def _check(query, key, value, theta, sdc_table, attn_mask, k_dense, scale, q_offset, placement, sdc, out, num_splits,
           block_n) -> None:  # fmt: skip
    check_attention_inputs(
        "decode", query, key, value, theta, sdc_table, attn_mask,
        k_dense=k_dense, scale=scale, q_offset=q_offset, placement=placement, sdc=sdc, out=out,
    )  # fmt: skip
    for name, value_ in (("num_splits", num_splits), ("block_n", block_n)):
        if value_ is not None and (isinstance(value_, bool) or not isinstance(value_, int) or value_ < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value_!r}")
    if block_n is not None and (block_n & (block_n - 1) or not _MIN_BLOCK_N <= block_n <= _MAX_BLOCK_N):
        raise ValueError(f"block_n must be a power of two in {_MIN_BLOCK_N}..{_MAX_BLOCK_N}, got {block_n}")


def top_theta_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    theta: torch.Tensor | None,
    sdc_table: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    *,
    k_dense: int,
    scale: float,
    causal: bool,
    q_offset: int,
    placement: str,
    sdc: str,
    vmc: bool,
    return_stats: bool,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
):
    """Top-θ attention for a few query rows with split-K flash-decoding (arguments as normalised by
    :func:`sparse_attention.validation.prepare_call`).

    Args:
        query: ``[B, Hq, Lq, D]``, float16, bfloat16 or float32, CUDA (or CPU under ``TRITON_INTERPRET=1``).
        key, value: ``[B, Hkv, Lk, D]`` in the query's dtype, ``Hq`` a multiple of ``Hkv``; any strides.
        theta: ``None`` (dense) or float32 ``[Hq, T]``; row i of head h uses ``theta[h, min(n_i, T) - 1]``.
        sdc_table: float32 ``[Hq, T]`` with ``sdc="calibrated"`` (and a theta), else ``None``.
        attn_mask: ``None`` or boolean, broadcastable to ``[B, Hq, Lq, Lk]`` (True = attend); broadcast views are
            read through their zero strides.
        k_dense: rows with ``n_i <= k_dense`` are never pruned. scale: score scale. causal, q_offset: row i sees key
            j only when ``j <= q_offset + i`` (with ``causal``). placement: ``"pre"`` or ``"post"``.
        sdc: ``"exact"``, ``"none"``, ``"threshold"`` or ``"calibrated"``. vmc: add the V-mean compensation.
        return_stats: also return the kept/visible counts and ``kept_v_rows``.
        out: optional ``[B, Hq, Lq, D]`` tensor in the query dtype to write the output into (any strides).
        num_splits: key splits per (batch, kv group); default from the key length and the SM count.
        block_n: keys per tile (power of two, 16..128); default from the head dim and dtype.

    Returns:
        ``(out, kept, visible, kept_v_rows)``: out ``[B, Hq, Lq, D]`` in the query dtype; with ``return_stats``
        kept and visible int32 ``[B, Hq, Lq]`` and kept_v_rows int32 ``[B, Hkv]`` (keys kept by any head and any
        query row of the kv group: the V rows the kernel loaded when ``vmc`` is off), otherwise three ``None``.

    Raises:
        TypeError: non-tensors, unsupported or mismatched dtypes, tables not float32 ``[Hq, T]``, a non-bool mask.
        ValueError: bad ranks, shapes, devices, head dims, choices, ``k_dense``, ``scale``, ``q_offset``, ``out``,
            ``num_splits`` or ``block_n``, CPU tensors without the interpreter, or a mask that does not broadcast.
    """
    _check(query, key, value, theta, sdc_table, attn_mask, k_dense, scale, q_offset, placement, sdc, out, num_splits,
           block_n)  # fmt: skip
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    group = hq // hkv
    device = query.device
    if attn_mask is not None:
        attn_mask = attn_mask.expand(b, hq, lq, lk)
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    kept = visible = kv_rows = None
    if return_stats:
        kept = torch.empty(b, hq, lq, dtype=torch.int32, device=device)
        visible = torch.empty(b, hq, lq, dtype=torch.int32, device=device)
        kv_rows = torch.empty(b, hkv, dtype=torch.int32, device=device)
    if b * hq * lq == 0 or lk == 0:
        out.zero_()
        for t in (kept, visible, kv_rows):
            if t is not None:
                t.zero_()
        return out, kept, visible, kv_rows

    has_theta = theta is not None
    post = has_theta and placement == "post"
    head_dim = triton.next_power_of_2(d)
    rows = group * lq
    block_m = max(_MIN_BLOCK_M, triton.next_power_of_2(min(rows, config.DECODE_MAX_BLOCK_M)))
    row_blocks = triton.cdiv(rows, block_m)
    if block_n is None:
        block_n = config.DECODE_TILE_BYTES // (head_dim * query.element_size())
        block_n = min(_MAX_BLOCK_N, max(_MIN_BLOCK_N, triton.next_power_of_2(block_n)))
    if num_splits is None:
        keys = lk
        if attn_mask is None and causal:
            keys = min(max(q_offset + lq, 0), lk)
        num_splits = _num_splits(device, b * hkv * row_blocks, keys)
    block_s = min(triton.next_power_of_2(num_splits), config.DECODE_COMBINE_BLOCK_S)
    # Full float32 products for float32 inputs (the default would be tf32); other dtypes keep Triton's default.
    dot_precision = "ieee" if query.dtype == torch.float32 else None

    if attn_mask is not None:
        # n and the key ranges are computed once per distinct mask row: a mask shared by all heads (HF's
        # [B, 1, Lq, Lk]) is read once per batch and query row, not once per head.
        mask_arg = _compact(attn_mask).view(torch.uint8)  # a bool tensor is read as bytes
        mask_strides = attn_mask.stride()
        mask_heads = mask_arg.shape[1]
        mask_rows = mask_heads * lq
        n_stride_h = lq if mask_heads > 1 else 0
        n_rows = torch.empty(b, mask_rows, dtype=torch.int32, device=device)
        bounds = torch.empty(b, mask_rows, 2, dtype=torch.int32, device=device)
        _decode_mask_kernel[(mask_rows, b)](
            mask_arg, n_rows, bounds, *mask_strides, lk, mask_rows, q_offset,
            LQ=lq, BLOCK_K=config.DECODE_SCAN_BLOCK_K, CAUSAL=causal,
        )  # fmt: skip
    else:
        n_rows = bounds = mask_arg = query  # placeholders: never read when HAS_MASK is off
        mask_strides = (0, 0, 0, 0)
        mask_rows, n_stride_h = 1, 0
    block_r = triton.next_power_of_2(mask_rows)
    theta_arg = theta.contiguous() if has_theta else query
    table_arg = sdc_table.contiguous() if sdc_table is not None else query
    theta_len = theta.shape[1] if has_theta else 1
    table_len = sdc_table.shape[1] if sdc_table is not None else 1

    parts = b * hq * lq * num_splits
    f32 = dict(dtype=torch.float32, device=device)
    part_m, part_all, part_kept = (torch.empty(parts, **f32) for _ in range(3))
    part_count = torch.empty(parts, dtype=torch.int32, device=device)
    part_acc = torch.empty(parts, head_dim, **f32)
    part_vsum = torch.empty(parts, head_dim, **f32) if vmc else part_acc
    flags = torch.zeros(b, hkv, lk, dtype=torch.int8, device=device) if return_stats else part_count
    lse_m, lse_l = (torch.empty(parts, **f32) for _ in range(2)) if post else (part_m, part_all)

    grid = (num_splits, hkv * row_blocks, b)
    q_strides, k_strides, v_strides = query.stride(), key.stride(), value.stride()
    common = dict(GROUP=group, LQ=lq, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
                  HAS_MASK=attn_mask is not None, BLOCK_R=block_r, DOT_PRECISION=dot_precision)  # fmt: skip
    if post:
        _decode_lse_kernel[grid](
            query, key, mask_arg, bounds, lse_m, lse_l, *q_strides, *k_strides, *mask_strides,
            hq, lk, d, num_splits, row_blocks, mask_rows, q_offset, scale, **common,
        )  # fmt: skip
    _decode_split_kernel[grid](
        query, key, value, mask_arg, n_rows, bounds, theta_arg, lse_m, lse_l,
        part_m, part_all, part_kept, part_count, part_acc, part_vsum, flags,
        *q_strides, *k_strides, *v_strides, *mask_strides,
        hq, hkv, lk, d, num_splits, row_blocks, mask_rows, n_stride_h, theta_len, k_dense, q_offset, scale,
        BLOCK_S=block_s, HAS_THETA=has_theta, POST=post, VMC=vmc, STATS=return_stats, **common,
    )  # fmt: skip
    _decode_combine_kernel[(hq * lq, b)](
        part_m, part_all, part_kept, part_count, part_acc, part_vsum, flags,
        n_rows, theta_arg, table_arg, out, kept if return_stats else part_count,
        visible if return_stats else part_count, kv_rows if return_stats else part_count,
        *out.stride(), hq, lk, d, num_splits, mask_rows, n_stride_h, theta_len, table_len, k_dense, q_offset,
        GROUP=group, LQ=lq, HEAD_DIM=head_dim, BLOCK_S=block_s, BLOCK_K=config.DECODE_SCAN_BLOCK_K,
        CAUSAL=causal, HAS_MASK=attn_mask is not None, HAS_THETA=has_theta, SDC=SDC_CODES[sdc], POST=post,
        VMC=vmc, STATS=return_stats,
    )  # fmt: skip
    return out, kept, visible, kv_rows
