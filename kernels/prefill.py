"""Top-θ prefill attention: a FlashAttention-2 style tiled forward with thresholded, compensated softmax.

What it computes: Top-θ attention (Berestizshevsky, Andri, Cavigelli, "Top-Theta Attention: Sparsifying Transformers
by Compensated Thresholding", arXiv 2502.08363) with the semantics of DESIGN.md and the kernel spec, for query
``[B, Hq, Lq, D]``, key ``[B, Hkv, Lk, D]`` and value ``[B, Hkv, Lk, Dv]``. One program owns ``BLOCK_M`` query rows of
one (batch, query head) and walks the K/V tiles that some of its rows can see, keeping an online row max and two
running denominators (all visible keys, kept keys) in float32. A score is kept when it beats its row's threshold
``theta[h, min(n_i, T) - 1]`` (placement "pre") or when its probability does (placement "post", after a
log-sum-exp pass); compensation (``sdc``, scaled by ``sdc_scale``) and V-mean compensation (``vmc``) are applied in the
epilogue.

How it runs (read the file bottom-up: the launcher, the kernel, then the helpers it calls):

- Scores stay in kernel units ``x``: the raw product ``q·k`` (the score is ``sm_scale·x``), or the capped score with
  ``softcap``. The row max ``m_i`` is a running max of ``x`` and every exponential is ``exp2((x - m_i) · qk_scale)``
  with one rounded constant ``qk_scale = sm_scale · log2(e)`` (one multiply per score), so that the error does not
  grow with the score magnitude (spec decision 6). The keep test runs on the same exponent: with ``θ_x`` the
  threshold in kernel units, ``x > θ_x <=> (x - m_i)·qk_scale > (θ_x - m_i)·qk_scale``; "post" compares it with
  ``log2(θ·D_all)``, so θ <= 0 keeps every visible key, also those whose probability underflows (issue D6).
- Dense mode (``theta=None``) is its own compile-time path: no keep test, no reduction, no branch in the main loop.
- Sparse mode has three main-loop strategies (``variant``). Triton's software pipeliner makes async copies only of
  loads that feed a dot at the top level of the loop, so a P·V product skipped by a branch cannot take a pipelined V
  load with it, and predicating the V copy on the tile's own liveness aborts the Triton 3.6 pipeliner.
  ``"pipelined"`` (default) keeps the FlashAttention loop and multiplies pruned scores as zeros: K and V by async
  copies, both products on wgmma at sm_90a, no per-tile barrier, and no work skipped. ``"skip_dot"`` prefetches the
  next tile's V into registers (Triton 3.6 turns that into an async copy one iteration ahead; 3.9 keeps a plain
  load) and skips the P·V product of a tile in which nothing is kept, at the price of one CTA-wide reduction per
  tile and a V copy through registers. ``"skip_load"`` loads V and runs P·V only for live tiles (a dead tile's V rows
  are never read), with the V load's latency exposed. Which wins depends on the share of dead tiles; a cost model (a
  prediction, not a measurement: 128x64 tiles, D=128, H100 rates) puts "skip_dot" ahead of "pipelined" only above
  about 40% dead tiles, more than the 1-33% measured on structured inputs on CPU (benchmarks/NOTES.md), hence the
  default. A GPU run times all three.
- ``cap`` walks the tiles right to left and counts the kept keys from the right (a reverse in-tile cumsum plus a
  running count), so only the ``cap`` most recent kept keys of a row stay kept.
- Sinks start every row as a kept virtual key (``m_i`` = the sink, ``l_i`` = its weight).
- NaN in, NaN out: the row maxima skip NaN (``tl.max``, on the GPU and in the interpreter alike), but ``l_i`` sums
  the exponential of every visible score, so a NaN score always reaches it; the epilogue makes a row NaN in every
  column (and its kept count -1, as in the float64 oracle) when ``l_i`` or any output column is NaN.

Supports: float16, bfloat16 and float32 inputs with any strides; head dims 16..256 for q/k and for v independently
(others than powers of two are padded); any lengths, including ``Lk == 0``; GQA by index (kv head ``h // G``); causal
with any ``q_offset`` (rows before the first key are empty); ``key_padding`` (per-batch prefix counts and bounds:
``n_i`` in closed form, tiles outside the bounds never walked, the ``[BLOCK_N]`` mask bits of a tile read only when the
mask has holes inside the bounds); a general boolean ``attn_mask`` given as a broadcast view (read through its strides,
never materialised); softcap; sinks; placement "pre" and "post"; the four ``sdc`` modes with ``sdc_scale``; ``cap``;
``vmc``; ±inf thresholds; per-row and per-tile statistics as device tensors. The launcher makes no host
synchronisation and no allocation beyond the outputs (and the V prefix sum of ``vmc``).

Limits: work is skipped per ``BLOCK_M x BLOCK_N`` tile, and only by the skip variants (the default multiplies pruned
scores as zeros: see above); Q·Kᵀ and the exponentials stay dense, and placement "post" computes Q·Kᵀ twice; query
heads of one kv group run in separate programs (K/V are re-read per head, from L2); a general mask costs a counting
pass over the mask bits and, with ``vmc``, a pass over V after the main loop (a per-row mask with ``vmc`` spills up to
136 bytes at 128x64 tiles and D=128); the V mean of ``vmc`` otherwise comes
from a float32 prefix sum of V that the launcher computes per call (a float32 copy of V); ``cap`` still walks every
visible tile (no early exit once every row has its ``cap`` keys). float32 inputs run their dots as "tf32x3" (three
tf32 products on the tensor cores: the low x low term is dropped, a relative error of about 2^-22 per product against
2^-24 for IEEE float32; the float32 tolerance this meets is written in tests/kernels/test_prefill.py), on smaller
tiles than 16-bit inputs (see ``config_fits``), spilling 0.3-1 KB of registers at D=128 (none at D <= 64); float32 with
a head dim above 128 is refused (``unsupported_reason``: the reference runs it).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import config
from .common import LOG2E, SDC_CODES, SDC_EXACT, SDC_NONE, SDC_THRESHOLD, safe_shift, soft_cap, unsupported_reason

# How visibility beyond causality is given.
MASK_NONE = tl.constexpr(0)  # causal / length limits only
MASK_KEYS = tl.constexpr(1)  # key_padding: per-batch key bits, prefix counts and bounds
MASK_FULL = tl.constexpr(2)  # a general [B, Hq, Lq, Lk] boolean view: per-tile [BLOCK_M, BLOCK_N] loads
MASK_SHARED = tl.constexpr(3)  # a general mask equal for every query row (zero row stride): per-tile [BLOCK_N] loads

# Main-loop strategies of sparse mode (the ``variant`` argument), kept so that a GPU run can time them. Triton's
# software pipeliner turns only loads that feed a dot at the top level of the loop into async copies, so a P·V product
# skipped by a branch takes its V load out of the pipeline (see the header).
PIPELINED = tl.constexpr(0)  # V by async copies, P·V (with the pruned P zeroed) in every tile: no per-tile branch
SKIP_DOT = tl.constexpr(1)  # the next tile's V prefetched into registers, P·V skipped where nothing is kept
SKIP_LOAD = tl.constexpr(2)  # V load and P·V both inside the branch: a dead tile's V rows are never read
VARIANTS = {"pipelined": PIPELINED.value, "skip_dot": SKIP_DOT.value, "skip_load": SKIP_LOAD.value}
DEFAULT_VARIANT = config.PREFILL_VARIANT  # SPARSE_ATTENTION_PREFILL_VARIANT, checked at launch

NO_CAP = tl.constexpr(2**30)  # the cap of rows that are never pruned


class PrefillResult(NamedTuple):
    """What :func:`top_theta_prefill` returns; every statistic is an int32 device tensor, or None without
    ``return_stats``."""

    out: torch.Tensor  # [B, Hq, Lq, Dv], the query dtype
    kept: torch.Tensor | None  # [B, Hq, Lq]: kept keys per row after cap (-1 where the row is NaN)
    visible: torch.Tensor | None  # [B, Hq, Lq]: visible keys per row (n_i)
    skipped_tiles: torch.Tensor | None  # 0-d: walked K/V tiles with nothing kept (skipped by the skip variants)
    total_tiles: torch.Tensor | None  # 0-d: walked K/V tiles of the main pass


# ---- @triton.jit helpers ----------------------------------------------------------------------------------------


@triton.jit
def _mask_bits(
    mask_ptr, start_n, seqlen_q, seqlen_k, stride_mm, stride_mn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SHARED_ROWS: tl.constexpr,
):  # fmt: skip
    """A general mask's ``[BLOCK_M, BLOCK_N]`` bits for the keys from ``start_n`` (False outside the lengths);
    ``mask_ptr`` points at the program's first row, and ``seqlen_q`` counts the valid rows from there. With
    SHARED_ROWS (a zero row stride) one ``[BLOCK_N]`` row serves every query row."""
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    cols = tl.arange(0, BLOCK_N)
    tile_ptr = mask_ptr + tl.cast(start_n, tl.int64) * stride_mn
    if SHARED_ROWS:
        bits = tl.load(tile_ptr + cols * stride_mn, mask=offs_n < seqlen_k, other=0)  # [BLOCK_N]
        return tl.broadcast_to((bits != 0)[None, :], (BLOCK_M, BLOCK_N))
    else:
        rows = tl.arange(0, BLOCK_M)
        in_bounds = (rows < seqlen_q)[:, None] & (offs_n < seqlen_k)[None, :]
        bits = tl.load(tile_ptr + rows[:, None] * stride_mm + cols[None, :] * stride_mn, mask=in_bounds, other=0)
        return bits != 0  # [BLOCK_M, BLOCK_N]


@triton.jit
def _visible(
    offs_n, row_end, key_lo, key_hi, seqlen_q, seqlen_k, mask_ptr, pad_ptr, bits_hi, stride_mm, stride_mn,
    stride_pn, start_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIAG: tl.constexpr, CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr,
):  # fmt: skip
    """Visibility of the keys ``offs_n`` ``[BLOCK_N]`` to the program's rows, ``[BLOCK_M, BLOCK_N]``. ``DIAG`` tiles
    may cross the causal diagonal or the end of the walked key range; the others lie inside both."""
    key_ok = tl.full([BLOCK_N], True, tl.int1)
    if DIAG:
        key_ok = key_ok & (offs_n < key_hi)
    if MASK_MODE == MASK_KEYS:
        # Padding keys before key_lo share the first tile; holes inside [key_lo, key_hi) need the mask bits, which
        # are not read at all when the prefix counts show there are none (then bits_hi = 0: a predicated-off load).
        bits = tl.load(pad_ptr + offs_n * stride_pn, mask=offs_n < bits_hi, other=1)  # [BLOCK_N]
        key_ok = key_ok & (offs_n >= key_lo) & (bits != 0)
    vis = tl.broadcast_to(key_ok[None, :], (BLOCK_M, BLOCK_N))  # [BLOCK_M, BLOCK_N]
    if DIAG and CAUSAL:
        vis = vis & (offs_n[None, :] < row_end[:, None])
    if MASK_MODE >= MASK_FULL:
        vis = vis & _mask_bits(
            mask_ptr, start_n, seqlen_q, seqlen_k, stride_mm, stride_mn,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SHARED_ROWS=MASK_MODE == MASK_SHARED,
        )  # fmt: skip
    return vis


@triton.jit
def _scores(
    q, k_ptr, start_n, offs_d, row_end, key_lo, key_hi, seqlen_q, seqlen_k, head_dim, sm_scale, softcap,
    mask_ptr, pad_ptr, bits_hi, stride_kn, stride_kd, stride_mm, stride_mn, stride_pn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, DIAG: tl.constexpr, CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Scores of the K tile starting at ``start_n`` in kernel units (``q·k``, or the capped score with SOFTCAP), -inf
    where not visible, and the visibility."""
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    k_ptrs = (
        k_ptr + tl.cast(start_n, tl.int64) * stride_kn
        + tl.arange(0, BLOCK_N)[:, None] * stride_kn + offs_d[None, :] * stride_kd
    )  # fmt: skip
    if DIAG:
        k_ok = (offs_n < seqlen_k)[:, None]
        if not EVEN_D:
            k_ok = k_ok & (offs_d < head_dim)[None, :]
        k = tl.load(k_ptrs, mask=k_ok, other=0.0)  # [BLOCK_N, HEAD_DIM]
    elif EVEN_D:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=(offs_d < head_dim)[None, :], other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if SOFTCAP:
        x = soft_cap(qk * sm_scale, softcap)
    else:
        x = qk
    if DIAG or MASK_MODE != MASK_NONE:
        vis = _visible(
            offs_n, row_end, key_lo, key_hi, seqlen_q, seqlen_k, mask_ptr, pad_ptr, bits_hi, stride_mm, stride_mn,
            stride_pn, start_n,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DIAG=DIAG, CAUSAL=CAUSAL, MASK_MODE=MASK_MODE,
        )  # fmt: skip
        x = tl.where(vis, x, float("-inf"))
    else:
        vis = tl.full([BLOCK_M, BLOCK_N], True, tl.int1)  # every key of the tile is visible to every row
    return x, vis


@triton.jit
def _value_tile(
    v_ptr, start_n, offs_dv, key_end, head_dim_v, stride_vn, stride_vd,
    BLOCK_N: tl.constexpr, EVEN_DV: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """The ``[BLOCK_N, HEAD_DIM_V]`` V tile of the keys from ``start_n``, zero past the head dim and, when MASKED,
    outside keys ``[0, key_end)`` (which are not read: ``key_end = 0`` predicates the whole load off)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    v_ptrs = (
        v_ptr + tl.cast(start_n, tl.int64) * stride_vn
        + tl.arange(0, BLOCK_N)[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    )  # fmt: skip
    if MASKED:
        v_ok = ((offs_n >= 0) & (offs_n < key_end))[:, None]
        if not EVEN_DV:
            v_ok = v_ok & (offs_dv < head_dim_v)[None, :]
        v = tl.load(v_ptrs, mask=v_ok, other=0.0)  # [BLOCK_N, HEAD_DIM_V]
    elif EVEN_DV:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=(offs_dv < head_dim_v)[None, :], other=0.0)
    return v


@triton.jit
def _row_lengths(
    prefix_ptr, mask_ptr, row_end, key_hi, seqlen_q, seqlen_k, stride_cn, stride_mm, stride_mn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr,
):  # fmt: skip
    """``n_i``, the visible keys of each row ``[BLOCK_M]``: a closed form, the key_padding prefix counts, or one pass
    over the bits of a general mask (keys ``[0, key_hi)``, no K or V)."""
    if CAUSAL:
        key_end = tl.minimum(tl.maximum(row_end, 0), seqlen_k)  # [BLOCK_M]: keys before key_end are causally visible
    else:
        key_end = tl.zeros([BLOCK_M], dtype=tl.int32) + seqlen_k
    if MASK_MODE == MASK_NONE:
        n = key_end
    elif MASK_MODE == MASK_KEYS:
        n = tl.load(prefix_ptr + key_end * stride_cn)
    else:
        n = tl.zeros([BLOCK_M], dtype=tl.int32)
        for start_n in range(0, key_hi, BLOCK_N):
            vis = _mask_bits(
                mask_ptr, start_n, seqlen_q, seqlen_k, stride_mm, stride_mn,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SHARED_ROWS=MASK_MODE == MASK_SHARED,
            )  # fmt: skip
            if CAUSAL:
                vis = vis & ((start_n + tl.arange(0, BLOCK_N))[None, :] < row_end[:, None])
            n += tl.sum(vis.to(tl.int32), 1)
    return n


@triton.jit
def _table_entry(table_ptr, n, table_len):
    """``table[min(n_i, T) - 1]`` of one head's row of a ``[Hq, T]`` table, per row ``[BLOCK_M]`` (rows without
    visible keys read entry 0)."""
    return tl.load(table_ptr + tl.minimum(tl.maximum(n, 1), table_len) - 1)


@triton.jit
def _visible_v_sum(
    v_ptr, mask_ptr, row_end, key_hi, seqlen_q, seqlen_k, offs_dv, head_dim_v, stride_vn, stride_vd, stride_mm,
    stride_mn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM_V: tl.constexpr, EVEN_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``Σ_{j visible} v_j`` per row ``[BLOCK_M, HEAD_DIM_V]`` under a general mask, where no prefix sum of V can give
    it: a pass over the mask bits and V after the main loop (run there so that its accumulator is not live at the
    same time as the main loop's)."""
    v_sum = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    for start_n in range(0, key_hi, BLOCK_N):
        vis = _mask_bits(
            mask_ptr, start_n, seqlen_q, seqlen_k, stride_mm, stride_mn,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SHARED_ROWS=MASK_MODE == MASK_SHARED,
        )  # fmt: skip
        if CAUSAL:
            vis = vis & ((start_n + tl.arange(0, BLOCK_N))[None, :] < row_end[:, None])
        v = _value_tile(
            v_ptr, start_n, offs_dv, seqlen_k, head_dim_v, stride_vn, stride_vd,
            BLOCK_N=BLOCK_N, EVEN_DV=EVEN_DV, MASKED=True,
        )  # fmt: skip
        v_sum = tl.dot(vis.to(v.dtype), v, v_sum, input_precision=DOT_PRECISION)
    return v_sum


@triton.jit
def _lse_inner(
    m_i, l_i, q, k_ptr, tile_start, num_tiles, offs_d, row_end, key_lo, key_hi, seqlen_q, seqlen_k, head_dim,
    sm_scale, softcap, qk_scale, mask_ptr, pad_ptr, bits_hi, stride_kn, stride_kd, stride_mm, stride_mn, stride_pn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, DIAG: tl.constexpr, CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """First pass of placement "post": the row max (kernel units) and the full denominator over ``num_tiles``
    tiles from ``tile_start``."""
    for it in range(num_tiles):
        start_n = tl.multiple_of(tile_start + it * BLOCK_N, BLOCK_N)
        x, vis = _scores(
            q, k_ptr, start_n, offs_d, row_end, key_lo, key_hi, seqlen_q, seqlen_k, head_dim, sm_scale,
            softcap, mask_ptr, pad_ptr, bits_hi, stride_kn, stride_kd, stride_mm, stride_mn, stride_pn,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, DIAG=DIAG, CAUSAL=CAUSAL, MASK_MODE=MASK_MODE,
            SOFTCAP=SOFTCAP, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(x, 1))  # [BLOCK_M]
        m_shift = safe_shift(m_new)
        p = tl.math.exp2((x - m_shift[:, None]) * qk_scale)  # [BLOCK_M, BLOCK_N]
        l_i = l_i * tl.math.exp2((m_i - m_shift) * qk_scale) + tl.sum(p, 1)
        m_i = m_new
    return m_i, l_i


@triton.jit
def _attn_inner(
    acc, l_i, l_kept, m_i, kept, skipped,
    q, k_ptr, v_ptr, tile_start, num_tiles, offs_d, offs_dv, row_end, key_lo, key_hi, seqlen_q, seqlen_k,
    head_dim, head_dim_v, row_cut, cap_row, sm_scale, softcap, qk_scale, mask_ptr, pad_ptr, bits_hi,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_pn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DIAG: tl.constexpr,
    REVERSE: tl.constexpr, CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, SOFTCAP: tl.constexpr,
    SPARSE: tl.constexpr, POST: tl.constexpr, CAP: tl.constexpr, COUNT_KEPT: tl.constexpr,
    COUNT_TILES: tl.constexpr, VARIANT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The main pass over ``num_tiles`` K/V tiles from ``tile_start`` (leftwards with REVERSE).

    Without SPARSE this is the FlashAttention-2 loop. With SPARSE, key j of row i is kept when its exponent
    ``z_ij = (x_ij - m_i)·qk_scale`` beats the row's cut: ``(row_cut_i - m_i)·qk_scale`` for "pre" (``row_cut`` the
    threshold in kernel units, -inf for rows never pruned, +inf for rows past the end), ``row_cut_i = log2(θ·D_all)``
    for "post" (``m_i`` and ``l_i`` final from the log-sum-exp pass). With CAP only the ``cap_row`` kept keys furthest
    right stay kept. ``l_kept`` sums the kept weights (the sink included from the start), ``kept`` counts kept keys,
    ``skipped`` the tiles with none (when counted).
    """
    STEP: tl.constexpr = -BLOCK_N if REVERSE else BLOCK_N
    # Where the V tile is loaded: in the pipeline (the dot that reads it is unconditional), one iteration ahead into
    # registers (its latency hides behind a whole tile; the compiler would sink a load placed early in the same
    # iteration down to its use), or only inside the live-tile branch.
    V_PIPELINED: tl.constexpr = (not SPARSE) or VARIANT == PIPELINED
    V_PREFETCH: tl.constexpr = SPARSE and VARIANT == SKIP_DOT
    NEED_LIVE: tl.constexpr = SPARSE and (VARIANT != PIPELINED or COUNT_TILES)
    if POST:
        m_shift = safe_shift(m_i)
    if V_PREFETCH:
        v_next = _value_tile(
            v_ptr, tile_start, offs_dv, tl.where(num_tiles > 0, seqlen_k, 0), head_dim_v, stride_vn, stride_vd,
            BLOCK_N=BLOCK_N, EVEN_DV=EVEN_DV, MASKED=True,
        )  # fmt: skip
    for it in range(num_tiles):
        start_n = tl.multiple_of(tile_start + it * STEP, BLOCK_N)
        if V_PREFETCH:
            v = v_next
            v_next = _value_tile(
                v_ptr, start_n + STEP, offs_dv, tl.where(it + 1 < num_tiles, seqlen_k, 0), head_dim_v, stride_vn,
                stride_vd,
                BLOCK_N=BLOCK_N, EVEN_DV=EVEN_DV, MASKED=True,
            )  # fmt: skip
        x, vis = _scores(
            q, k_ptr, start_n, offs_d, row_end, key_lo, key_hi, seqlen_q, seqlen_k, head_dim, sm_scale,
            softcap, mask_ptr, pad_ptr, bits_hi, stride_kn, stride_kd, stride_mm, stride_mn, stride_pn,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, DIAG=DIAG, CAUSAL=CAUSAL, MASK_MODE=MASK_MODE,
            SOFTCAP=SOFTCAP, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip
        if POST:
            z = (x - m_shift[:, None]) * qk_scale  # [BLOCK_M, BLOCK_N]: log2 of exp(s - m), m final
        else:
            m_new = tl.maximum(m_i, tl.max(x, 1))  # [BLOCK_M]
            m_shift = safe_shift(m_new)
            alpha = tl.math.exp2((m_i - m_shift) * qk_scale)  # [BLOCK_M]
            z = (x - m_shift[:, None]) * qk_scale  # [BLOCK_M, BLOCK_N], -inf where not visible
            acc = acc * alpha[:, None]
            m_i = m_new
        if SPARSE:
            # The keep test on z, which x maps to monotonically: x > cut <=> z > (cut - m)·qk_scale ("pre"), so that
            # neither x nor the keep mask has to live next to P.
            if POST:
                z_cut = row_cut
            else:
                z_cut = (row_cut - m_shift) * qk_scale
            keep = z > z_cut[:, None]  # [BLOCK_M, BLOCK_N]
            if CAP:
                # Kept keys at or right of each key: this tile's (reverse cumsum) plus those of the tiles walked.
                rank = tl.cumsum(keep.to(tl.int32), 1, reverse=True) + kept[:, None]  # [BLOCK_M, BLOCK_N]
                keep = keep & (rank <= cap_row[:, None])
            if COUNT_KEPT or NEED_LIVE:
                tile_kept = tl.sum(keep.to(tl.int32), 1)  # [BLOCK_M]
            if COUNT_KEPT:
                kept += tile_kept
            if NEED_LIVE:
                live = tl.max(tile_kept, 0) > 0  # one CTA-wide reduction per tile
                skipped += 1 - live.to(tl.int32)
        p = tl.math.exp2(z)  # [BLOCK_M, BLOCK_N], 0 where not visible
        if not POST:
            l_i = l_i * alpha + tl.sum(p, 1)
            if SPARSE:
                l_kept = l_kept * alpha
        if SPARSE:
            p = tl.where(keep, p, 0.0)
            l_kept += tl.sum(p, 1)
        if V_PIPELINED:
            v = _value_tile(
                v_ptr, start_n, offs_dv, seqlen_k, head_dim_v, stride_vn, stride_vd,
                BLOCK_N=BLOCK_N, EVEN_DV=EVEN_DV, MASKED=DIAG,
            )  # fmt: skip
        if V_PIPELINED:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        elif V_PREFETCH:
            if live:
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        else:
            if live:
                v = _value_tile(
                    v_ptr, start_n, offs_dv, seqlen_k, head_dim_v, stride_vn, stride_vd,
                    BLOCK_N=BLOCK_N, EVEN_DV=EVEN_DV, MASKED=DIAG,
                )  # fmt: skip
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, l_kept, m_i, kept, skipped


# ---- the kernel ---------------------------------------------------------------------------------------------------


@triton.jit(
    do_not_specialize=[
        "num_heads", "groups", "seqlen_q", "seqlen_k", "q_offset", "k_dense", "cap", "theta_len", "sdc_len",
        "head_dim", "head_dim_v", "LQ_BUCKET", "LK_BUCKET",
    ]
)  # fmt: skip
def _top_theta_prefill_kernel(
    Q, K, V, Out, Theta, SdcTable, Sinks, Mask, PadMask, PadPrefix, PadBounds, VPrefix, Kept, Visible, TileStats,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn, stride_cb, stride_cn, stride_bb, stride_bn,
    stride_sb, stride_sh, stride_sn,
    sm_scale, qk_scale, softcap, sdc_scale,
    num_heads, groups, seqlen_q, seqlen_k, q_offset, k_dense, cap, theta_len, sdc_len, head_dim, head_dim_v,
    LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, HAS_THETA: tl.constexpr, POST: tl.constexpr, SDC: tl.constexpr,
    SDC_SCALED: tl.constexpr, VMC: tl.constexpr, CAP: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, RETURN_STATS: tl.constexpr, VARIANT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # LQ_BUCKET and LK_BUCKET are only the autotuning key (lengths rounded up to powers of two).
    # One program per (row block, batch x query head), row blocks fastest so that the programs running together share
    # K/V in L2; the heaviest causal row block of each head first, so that the tail of the grid is short.
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid_m = num_m - 1 - tl.program_id(0) % num_m
    pid_bh = tl.program_id(0) // num_m
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = pid_bh % num_heads
    off_kvh = (off_h // groups).to(tl.int64)
    start_m = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows  # [BLOCK_M]
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_ok = offs_m < seqlen_q
    rows_left = seqlen_q - start_m  # valid rows from the program's first row
    q_ptrs = (
        Q + off_b * stride_qb + off_h.to(tl.int64) * stride_qh + start_m.to(tl.int64) * stride_qm
        + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    )  # fmt: skip
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)  # [BLOCK_M, HEAD_DIM]
    k_ptr = K + off_b * stride_kb + off_kvh * stride_kh
    v_ptr = V + off_b * stride_vb + off_kvh * stride_vh
    mask_ptr = Mask + off_b * stride_mb + off_h.to(tl.int64) * stride_mh + start_m.to(tl.int64) * stride_mm
    pad_ptr = PadMask + off_b * stride_pb

    # Keys walked by this program: [key_lo, key_hi), cut by the padding bounds and the causal limit of its last row.
    row_end = q_offset + offs_m + 1  # [BLOCK_M]: row i sees keys j < row_end_i when causal
    key_lo = 0
    key_hi = seqlen_k
    bits_hi = 0  # keys below bits_hi need their padding bits read
    if MASK_MODE == MASK_KEYS:
        key_lo = tl.load(PadBounds + off_b * stride_bb)
        key_hi = tl.load(PadBounds + off_b * stride_bb + stride_bn)
    if CAUSAL:
        key_hi = tl.minimum(key_hi, q_offset + tl.minimum(start_m + BLOCK_M, seqlen_q))
    key_hi = tl.maximum(key_hi, key_lo)
    if MASK_MODE == MASK_KEYS:
        attended = tl.load(PadPrefix + off_b * stride_cb + key_hi * stride_cn)
        attended -= tl.load(PadPrefix + off_b * stride_cb + key_lo * stride_cn)
        bits_hi = tl.where(attended != key_hi - key_lo, key_hi, 0)
    tile_lo = (key_lo // BLOCK_N) * BLOCK_N
    # Tiles [tile_lo, mid) are seen whole by every row (up to padding bits); [mid, key_hi) need the diagonal masks.
    if CAUSAL:
        full_end = tl.minimum(q_offset + start_m + 1, key_hi)
    else:
        full_end = key_hi
    num_full = tl.maximum(full_end - tile_lo, 0) // BLOCK_N
    mid = tile_lo + num_full * BLOCK_N
    num_diag = tl.cdiv(key_hi - mid, BLOCK_N)

    # n_i, the number of visible keys of each row, is needed before the walk: the threshold depends on it.
    prefix_ptr = PadPrefix + off_b * stride_cb
    NEED_N: tl.constexpr = HAS_THETA or RETURN_STATS or MASK_MODE < MASK_FULL
    if NEED_N:
        n = _row_lengths(
            prefix_ptr, mask_ptr, row_end, key_hi, rows_left, seqlen_k, stride_cn, stride_mm, stride_mn,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=CAUSAL, MASK_MODE=MASK_MODE,
        )  # fmt: skip
    else:
        n = tl.zeros([BLOCK_M], dtype=tl.int32)

    # Kernel units: x = q·k (the score is sm_scale·x), or with SOFTCAP the capped score itself.
    if SOFTCAP:
        score_scale = 1.0
    else:
        score_scale = sm_scale
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of x, the sink included
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum of exp(s - m) over the visible keys and the sink
    if HAS_SINKS:
        sink = tl.load(Sinks + off_h)
        sink_x = sink / score_scale
        # The sink starts every row as a kept virtual key at sink_x; its weight exp(sink - sink_x·score_scale) undoes
        # the rounding of sink_x (one FMA), so that its exponent is as exact as the scores'.
        sink_w = tl.math.exp2(tl.fma(sink_x, -score_scale, sink) * LOG2E)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink_x
        l_i += sink_w

    SPARSE: tl.constexpr = HAS_THETA
    POST_PASS: tl.constexpr = HAS_THETA and POST
    row_cut = tl.zeros([BLOCK_M], dtype=tl.float32)
    cap_row = tl.zeros([BLOCK_M], dtype=tl.int32)
    if SPARSE:
        theta = _table_entry(Theta + off_h * theta_len, n, theta_len)  # [BLOCK_M]
        prunable = n > k_dense
        if POST_PASS:
            m_i, l_i = _lse_inner(
                m_i, l_i, q, k_ptr, tile_lo, num_full, offs_d, row_end, key_lo, key_hi, rows_left, seqlen_k,
                head_dim, sm_scale, softcap, qk_scale, mask_ptr, pad_ptr, bits_hi, stride_kn, stride_kd, stride_mm,
                stride_mn, stride_pn,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, DIAG=False, CAUSAL=CAUSAL, MASK_MODE=MASK_MODE,
                SOFTCAP=SOFTCAP, DOT_PRECISION=DOT_PRECISION,
            )  # fmt: skip
            m_i, l_i = _lse_inner(
                m_i, l_i, q, k_ptr, mid, num_diag, offs_d, row_end, key_lo, key_hi, rows_left, seqlen_k, head_dim,
                sm_scale, softcap, qk_scale, mask_ptr, pad_ptr, bits_hi, stride_kn, stride_kd, stride_mm,
                stride_mn, stride_pn,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, DIAG=True, CAUSAL=CAUSAL, MASK_MODE=MASK_MODE,
                SOFTCAP=SOFTCAP, DOT_PRECISION=DOT_PRECISION,
            )  # fmt: skip
            # p > θ  <=>  (x - m)·qk_scale > log2(θ · D_all); θ <= 0 keeps every visible key (p > 0 exactly).
            row_cut = tl.where(prunable & (theta > 0), tl.math.log2(l_i) + tl.math.log2(theta), float("-inf"))
        else:
            row_cut = tl.where(prunable, theta / score_scale, float("-inf"))  # s > θ  <=>  x > θ / score_scale
        row_cut = tl.where(row_ok, row_cut, float("inf"))  # rows past the end never keep a tile alive
        cap_row = tl.where(prunable, cap, NO_CAP)

    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    l_kept = l_i  # the sink is kept; with "post" l_i is already final and l_kept starts again from the sink
    if POST_PASS:
        l_kept = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_SINKS:
            l_kept += sink_w * tl.math.exp2((sink_x - safe_shift(m_i)) * qk_scale)
    kept = tl.zeros([BLOCK_M], dtype=tl.int32)
    skipped = tl.zeros([], dtype=tl.int32)
    COUNT_KEPT: tl.constexpr = HAS_THETA and (RETURN_STATS or CAP or (not POST and SDC == SDC_THRESHOLD))
    # Cap keeps the most recent keys, so it walks right to left: the diagonal tiles first, then the full ones.
    if CAP:
        first_start = mid + (num_diag - 1) * BLOCK_N
        second_start = mid - BLOCK_N
        first_count = num_diag
        second_count = num_full
    else:
        first_start = tile_lo
        second_start = mid
        first_count = num_full
        second_count = num_diag
    acc, l_i, l_kept, m_i, kept, skipped = _attn_inner(
        acc, l_i, l_kept, m_i, kept, skipped,
        q, k_ptr, v_ptr, first_start, first_count, offs_d, offs_dv, row_end, key_lo, key_hi, rows_left, seqlen_k,
        head_dim, head_dim_v, row_cut, cap_row, sm_scale, softcap, qk_scale, mask_ptr, pad_ptr, bits_hi,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_pn,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, DIAG=CAP, REVERSE=CAP, CAUSAL=CAUSAL,
        MASK_MODE=MASK_MODE, SOFTCAP=SOFTCAP, SPARSE=SPARSE, POST=POST_PASS, CAP=CAP, COUNT_KEPT=COUNT_KEPT,
        COUNT_TILES=RETURN_STATS, VARIANT=VARIANT, DOT_PRECISION=DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, l_kept, m_i, kept, skipped = _attn_inner(
        acc, l_i, l_kept, m_i, kept, skipped,
        q, k_ptr, v_ptr, second_start, second_count, offs_d, offs_dv, row_end, key_lo, key_hi, rows_left, seqlen_k,
        head_dim, head_dim_v, row_cut, cap_row, sm_scale, softcap, qk_scale, mask_ptr, pad_ptr, bits_hi,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_pn,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, DIAG=not CAP, REVERSE=CAP,
        CAUSAL=CAUSAL, MASK_MODE=MASK_MODE, SOFTCAP=SOFTCAP, SPARSE=SPARSE, POST=POST_PASS, CAP=CAP,
        COUNT_KEPT=COUNT_KEPT, COUNT_TILES=RETURN_STATS, VARIANT=VARIANT, DOT_PRECISION=DOT_PRECISION,
    )  # fmt: skip

    # Epilogue. The row lengths and thresholds are computed again rather than kept live across the loop (registers).
    if MASK_MODE < MASK_FULL:
        n = _row_lengths(
            prefix_ptr, mask_ptr, row_end, key_hi, rows_left, seqlen_k, stride_cn, stride_mm, stride_mn,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=CAUSAL, MASK_MODE=MASK_MODE,
        )  # fmt: skip
    # The denominator of the chosen compensation. Only an empty row's 0 becomes 1: an infinite denominator gives 0
    # and a NaN stays NaN.
    denom = l_i
    if HAS_THETA and not POST:
        if SDC == SDC_EXACT:
            # Unscaled, D_kept + D_miss is D_all exactly (and l_kept is not needed at all without vmc).
            if SDC_SCALED:
                denom = l_kept + sdc_scale * (l_i - l_kept)
        elif SDC == SDC_NONE:
            denom = l_kept
        elif SDC == SDC_THRESHOLD:
            theta = _table_entry(Theta + off_h * theta_len, n, theta_len)
            dropped = n - kept
            # exp(θ - m) per dropped key, exactly 0 when nothing is dropped (θ may be +inf where nothing is kept);
            # θ - m as one FMA of the kernel-unit max, so that it is as exact as the scores.
            excess = tl.where(dropped > 0, tl.fma(safe_shift(m_i), -score_scale, theta) * LOG2E, float("-inf"))
            denom = l_kept + sdc_scale * (dropped.to(tl.float32) * tl.math.exp2(excess))
        else:
            denom = l_kept + sdc_scale * _table_entry(SdcTable + off_h * sdc_len, n, sdc_len)
        # Rows with n_i <= k_dense are never pruned and keep the dense softmax in every mode.
        denom = tl.where(n > k_dense, denom, l_i)
    denom = tl.where(denom == 0.0, 1.0, denom)
    out = acc * (1.0 / denom)[:, None]  # [BLOCK_M, HEAD_DIM_V]
    if HAS_THETA and VMC:
        # The pruned mass 1 - p_sink - Σ_kept p, spread evenly over the visible V rows (0 where none is visible).
        v_weight = (1.0 - l_kept / denom) / tl.maximum(n, 1).to(tl.float32)  # [BLOCK_M]
        if MASK_MODE >= MASK_FULL:
            v_sum = _visible_v_sum(
                v_ptr, mask_ptr, row_end, key_hi, rows_left, seqlen_k, offs_dv, head_dim_v, stride_vn, stride_vd,
                stride_mm, stride_mn,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM_V=HEAD_DIM_V, EVEN_DV=EVEN_DV, CAUSAL=CAUSAL,
                MASK_MODE=MASK_MODE, DOT_PRECISION=DOT_PRECISION,
            )  # fmt: skip
        else:
            # Σ_{j < key_end} v_j from the launcher's prefix sum (padding keys zeroed there).
            if CAUSAL:
                key_end = tl.minimum(tl.maximum(row_end, 0), seqlen_k)  # [BLOCK_M]
            else:
                key_end = tl.zeros([BLOCK_M], dtype=tl.int32) + seqlen_k
            s_ptrs = (
                VPrefix + off_b * stride_sb + off_kvh * stride_sh
                + key_end[:, None].to(tl.int64) * stride_sn + offs_dv[None, :]
            )  # fmt: skip
            v_sum = tl.load(s_ptrs, mask=row_ok[:, None] & (offs_dv < head_dim_v)[None, :], other=0.0)
        out += v_weight[:, None] * v_sum
    # NaN in, NaN out: a row with a NaN anywhere is NaN in every column. The row maxima skip NaN (tl.max, compiled
    # and interpreted alike), but l_i sums the exponential of every visible score, so a NaN score always reaches it.
    row_nan = (tl.max((out != out).to(tl.int32), 1) > 0) | (l_i != l_i)  # [BLOCK_M]
    out = tl.where(row_nan[:, None], float("nan"), out)

    o_ptrs = (
        Out + off_b * stride_ob + off_h.to(tl.int64) * stride_oh + start_m.to(tl.int64) * stride_om
        + rows[:, None] * stride_om + offs_dv[None, :] * stride_od
    )  # fmt: skip
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < head_dim_v)[None, :])
    if RETURN_STATS:
        if HAS_THETA:
            row_kept = kept
        else:
            row_kept = n
        row_kept = tl.where(row_nan, -1, row_kept)
        row_index = pid_bh.to(tl.int64) * seqlen_q + offs_m
        tl.store(Kept + row_index, row_kept, mask=row_ok)
        tl.store(Visible + row_index, n, mask=row_ok)
        if HAS_THETA:
            tl.atomic_add(TileStats, skipped)
        tl.atomic_add(TileStats + 1, num_full + num_diag)


# ---- the launcher -------------------------------------------------------------------------------------------------


@functools.cache
def _device_shared_memory(device_index: int) -> int:
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - any failure to query falls back to a size every supported GPU has
        return 99 * 1024


def _shared_memory_bytes(block: tuple[int, int, int, int], head_dim: int, head_dim_v: int, elt: int) -> int:
    """One program's shared memory, as the compile report measures it: Q (twice for float32: tf32x3 stages its split
    halves), K and V tiles for every pipeline stage, and the int32 scratch of cap's in-tile scan."""
    block_m, block_n, _, num_stages = block
    q_copies = 2 if elt >= 4 else 1
    staged = block_n * (head_dim + head_dim_v) * max(1, num_stages)
    return elt * (q_copies * block_m * head_dim + staged) + 4 * block_m * block_n


def config_fits(
    block: tuple[int, int, int, int], head_dim: int, head_dim_v: int, elt: int, shared_memory: int,
    mask_mode: int = MASK_NONE.value,
) -> bool:  # fmt: skip
    """Whether a ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` config may run for padded head dims ``head_dim`` (q/k)
    and ``head_dim_v`` (v), element size ``elt``, on a device with ``shared_memory`` bytes per block, for a call of
    ``mask_mode``: its shared memory fits, its register tiles stay within ``config.PREFILL_MAX_ACC_PER_THREAD`` values
    per thread, float32 inputs use one of ``config.PREFILL_FP32_CONFIGS``, and a general per-row mask none of
    ``config.PREFILL_FULL_MASK_EXCLUDED`` (see kernels/config.py for where these come from)."""
    block_m, block_n, num_warps, _ = block
    if elt >= 4 and tuple(block) not in config.PREFILL_FP32_CONFIGS:
        return False
    if mask_mode == MASK_FULL.value and tuple(block) in config.PREFILL_FULL_MASK_EXCLUDED:
        return False
    if block_m * (head_dim_v + block_n) > config.PREFILL_MAX_ACC_PER_THREAD * 32 * num_warps:
        return False
    return _shared_memory_bytes(block, head_dim, head_dim_v, elt) <= shared_memory


def tile_configs() -> tuple[tuple[int, int, int, int], ...]:
    """The ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` configs this process chooses from (before the fit rule):
    exactly one under the interpreter, the shipped list otherwise."""
    if config.INTERPRET:
        return (config.PREFILL_INTERPRET_CONFIG,)
    return tuple(config.PREFILL_CONFIGS)


def fitting_configs(
    head_dim: int, head_dim_v: int, elt: int, shared_memory: int, mask_mode: int = MASK_NONE.value
) -> list[tuple[int, int, int, int]]:
    """The configs of :func:`tile_configs` that :func:`config_fits`, or the smallest one when none does."""
    configs = tile_configs()
    fitting = [c for c in configs if config_fits(c, head_dim, head_dim_v, elt, shared_memory, mask_mode)]
    return fitting or [min(configs, key=lambda c: c[0] * c[1] * max(1, c[3]))]


def _prune_configs(configs, named_args, **kwargs):
    q = named_args["Q"]
    shared = _device_shared_memory(q.device.index or 0) if q.is_cuda else 1 << 30
    allowed = set(
        fitting_configs(kwargs["HEAD_DIM"], kwargs["HEAD_DIM_V"], q.element_size(), shared, kwargs["MASK_MODE"])
    )
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]


_autotuned_kernel = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in tile_configs()
    ],
    key=["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "MASK_MODE", "HAS_THETA", "POST", "VARIANT"],
    prune_configs_by={"early_config_prune": _prune_configs},
    reset_to_zero=["TileStats"],
)(_top_theta_prefill_kernel)


def _length_bucket(length: int) -> int:
    return triton.next_power_of_2(max(int(length), 16))


@functools.cache
def _scratch(device: torch.device) -> torch.Tensor:
    """A small int32 buffer standing in for the tile counters when no statistics are asked for (autotuning zeroes
    it between runs; the kernel never touches it)."""
    return torch.zeros(2, dtype=torch.int32, device=device)


def top_theta_prefill(
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
    block_config: tuple[int, int, int, int] | None = None,
    variant: str | None = None,
) -> PrefillResult:
    """Top-θ attention with the tiled prefill kernel, for any number of query rows ``Lq >= 1``.

    The arguments are the normalised ones of /work/notes/kernel_spec.md (validated once, above this launcher, by
    ``sparse_attention.ops.contract``); only what the kernel itself cannot run is refused here, through
    :func:`~sparse_attention.kernels.common.unsupported_reason`.

    Args:
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, Lk, D]``; value: ``[B, Hkv, Lk, Dv]``; one dtype (float16,
            bfloat16, float32), any strides, on a CUDA device (or the CPU under ``TRITON_INTERPRET=1``).
        theta: ``None`` (dense) or float32 ``[Hq, T]``: row i of head h uses ``theta[h, min(n_i, T) - 1]``; entries
            may be ±inf. sdc_table: float32 ``[Hq, T']`` with ``sdc="calibrated"``, else ``None``.
        sinks: ``None`` or float32 ``[Hq]``: one virtual key per head with that score and a zero value row.
        attn_mask: ``None`` or a boolean ``[B, Hq, Lq, Lk]`` view (zero strides allowed). key_padding: ``None`` or
            ``(mask [B, Lk] bool, prefix [B, Lk + 1] int32, bounds [B, 2] int32)``; never both.
        k_dense: rows with ``n_i <= k_dense`` are never pruned. sm_scale: score scale (> 0). softcap: ``c > 0`` caps
            every score to ``c·tanh(s / c)``. causal, q_offset: row i sees key j only when ``j <= q_offset + i``.
        placement: ``"pre"`` (keep ``s > θ``) or ``"post"`` (keep ``p > θ``). sdc, sdc_scale: the compensation of
            pruned "pre" rows, ``D_kept + sdc_scale · D_miss``. cap: keep only the ``cap`` most recent kept keys (0:
            off). vmc: V-mean compensation.
        return_stats: also return the statistics (else they are ``None``).
        out: optional ``[B, Hq, Lq, Dv]`` buffer in the query dtype (any strides); every element is written.
        block_config: run this ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` instead of the shipped configs.
        variant: the main-loop strategy of sparse mode, ``"pipelined"``, ``"skip_dot"`` or ``"skip_load"`` (default
            ``kernels.config.PREFILL_VARIANT``, from ``SPARSE_ATTENTION_PREFILL_VARIANT``, "pipelined" when unset).

    Returns:
        :class:`PrefillResult` ``(out, kept, visible, skipped_tiles, total_tiles)``, all on the query's device; the
        tile counts count the K/V tiles of the main pass (a ``BLOCK_M x BLOCK_N`` tile not excluded by causality or
        the padding bounds) and those in which nothing was kept.

    Raises:
        ValueError: what :func:`unsupported_reason` refuses (device, dtype, head dims, bfloat16 under the
            interpreter, float32 with a head dim above 128), an unknown ``variant`` or a malformed ``block_config``.
    """
    reason = unsupported_reason("prefill", query, key, value)
    if reason is not None:
        raise ValueError(reason)
    variant = DEFAULT_VARIANT if variant is None else variant
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}; got {variant!r}")
    b, hq, lq, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[3]
    device = query.device
    if out is None:
        out = torch.empty((b, hq, lq, dv), dtype=query.dtype, device=device)
    kept = visible = skipped_tiles = total_tiles = None
    tile_stats = _scratch(device)
    if return_stats:
        kept = torch.empty((b, hq, lq), dtype=torch.int32, device=device)
        visible = torch.empty((b, hq, lq), dtype=torch.int32, device=device)
        tile_stats = torch.zeros(2, dtype=torch.int32, device=device)
        skipped_tiles, total_tiles = tile_stats[0], tile_stats[1]
    if b * hq * lq == 0:
        return PrefillResult(out, kept, visible, skipped_tiles, total_tiles)

    has_theta = theta is not None
    post = has_theta and placement == "post"
    sdc_code = SDC_CODES[sdc]
    if has_theta and not post and sdc_scale == 0.0:
        sdc_code = SDC_NONE.value  # D_kept + 0 · D_miss, also where D_miss is infinite (θ = +inf, "threshold")
    placeholder = query  # any pointer will do for the arguments a compile-time flag switches off

    mask_mode = MASK_NONE.value
    mask_arg, mask_strides = placeholder, (0, 0, 0, 0)
    pad_mask, pad_prefix, pad_bounds = placeholder, placeholder, placeholder
    pad_strides = (0, 0, 0, 0, 0, 0)
    if attn_mask is not None:
        full = attn_mask.expand(b, hq, lq, lk)  # a view (zero strides where broadcast), never materialised
        mask_arg = full.view(torch.uint8)
        mask_strides = tuple(0 if full.shape[i] == 1 else full.stride(i) for i in range(4))
        mask_mode = MASK_SHARED.value if mask_strides[2] == 0 else MASK_FULL.value
    elif key_padding is not None:
        mask_mode = MASK_KEYS.value
        key_mask, pad_prefix, pad_bounds = key_padding
        pad_mask = key_mask.view(torch.uint8)
        pad_strides = (*pad_mask.stride(), *pad_prefix.stride(), *pad_bounds.stride())

    v_prefix, prefix_strides = placeholder, (0, 0, 0)
    if has_theta and vmc and mask_mode < MASK_FULL.value:
        # The V mean of every row from a float32 prefix sum over keys (padding keys zeroed, not multiplied: a NaN in
        # a padding row must not reach any row).
        v_rows = value if key_padding is None else torch.where(key_padding[0][:, None, :, None], value, 0)
        v_prefix = torch.zeros((b, hkv, lk + 1, dv), dtype=torch.float32, device=device)
        torch.cumsum(v_rows, dim=2, dtype=torch.float32, out=v_prefix[:, :, 1:])
        prefix_strides = v_prefix.stride()[:3]

    score_scale = 1.0 if softcap else sm_scale
    head_dim, head_dim_v = triton.next_power_of_2(d), triton.next_power_of_2(dv)
    theta_arg = theta if has_theta else placeholder
    table_arg = sdc_table if (has_theta and sdc_table is not None) else placeholder
    args = (
        query, key, value, out, theta_arg, table_arg, placeholder if sinks is None else sinks, mask_arg,
        pad_mask, pad_prefix, pad_bounds, v_prefix, placeholder if kept is None else kept,
        placeholder if visible is None else visible, tile_stats,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(), *mask_strides, *pad_strides, *prefix_strides,
        float(sm_scale), float(score_scale * LOG2E.value), float(softcap), float(sdc_scale),
        hq, hq // hkv, lq, lk, q_offset, k_dense, cap, theta_arg.shape[-1] if has_theta else 1,
        table_arg.shape[-1] if table_arg is sdc_table else 1, d, dv,
        _length_bucket(lq), _length_bucket(lk),
    )  # fmt: skip
    flags = dict(
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, EVEN_D=head_dim == d, EVEN_DV=head_dim_v == dv,
        CAUSAL=bool(causal), MASK_MODE=mask_mode, HAS_THETA=has_theta, POST=post, SDC=sdc_code,
        VMC=has_theta and bool(vmc), CAP=has_theta and cap > 0, SOFTCAP=softcap > 0, HAS_SINKS=sinks is not None,
        SDC_SCALED=sdc_scale != 1.0, RETURN_STATS=bool(return_stats), VARIANT=VARIANTS[variant],
        DOT_PRECISION="tf32x3" if query.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    if block_config is None and config.AUTOTUNE:
        grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]) * b * hq,)
        _autotuned_kernel[grid](*args, **flags)
        return PrefillResult(out, kept, visible, skipped_tiles, total_tiles)
    if block_config is None:
        shared = _device_shared_memory(device.index or 0) if device.type == "cuda" else 1 << 30
        block_config = fitting_configs(head_dim, head_dim_v, query.element_size(), shared, mask_mode)[0]
    if len(block_config) != 4 or not all(isinstance(x, int) and x > 0 for x in block_config):
        raise ValueError(f"block_config must be (BLOCK_M, BLOCK_N, num_warps, num_stages) ints, got {block_config!r}")
    block_m, block_n, num_warps, num_stages = block_config
    grid = (triton.cdiv(lq, block_m) * b * hq,)
    _top_theta_prefill_kernel[grid](
        *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages
    )
    return PrefillResult(out, kept, visible, skipped_tiles, total_tiles)
