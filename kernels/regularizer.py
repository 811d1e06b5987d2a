"""Fused Triton forward and backward of the attention-condensation regularizer.

What it computes. For query ``[B, Hq, Lq, D]`` and GQA key ``[B, Hkv, Lk, D]`` (query head h reads kv head
``h // G``), every query row i with more than ``k`` visible keys is *regularized*: with P its softmax over the visible
keys (and the sink, below), ``m_i`` = the mass of its top ``k`` keys, and the row's loss is ``-log m_i``
("logmass") or ``1 - m_i`` ("mass"). :class:`TopkRegularizerFunction` returns the sum of the loss and of the masses
over the regularized rows and their count, with gradients for query, key and the sink logits. Scores are
``s = sm_scale · q·k`` in float32, soft-capped first (``softcap · tanh(s / softcap)``) when ``softcap > 0``.

The paper. "Attention Condensation via Sparsity Induced Regularized Training" (arXiv 2503.01564) proposes pushing each
attention row's mass onto its top keys; its body is withdrawn, so the loss is our formulation of its abstract
(DESIGN.md, "The condensation regularizer"): ``-log m_i = LSE_all - LSE_topk``, whose score gradient is ``P - P̂``
(``P̂`` = P restricted to the top-k and renormalised), and ``1 - m_i``, whose score gradient is ``P (m_i - 1[top-k])``.
A sink (HF's ``s_aux``, a virtual key per head with a zero value row) joins every softmax and counts as kept:
``m_i = (Σ_top-k e_j + e_sink) / (Σ_visible e_j + e_sink)``; it is not a key, so it takes no top-k slot and does not
count as visible. Through the cap the score gradient is multiplied by ``1 - (s / softcap)²``.

How. Neither pass writes the ``Lq × Lk`` score matrix; memory besides inputs and gradients is O(B · Hq · Lq).

- Forward, one program per (query tile, batch · query head): walks its key tiles keeping the online row max ``m_i``
  and sum of exponentials ``l_i``, and a running top list: a ``[BLOCK_M, BLOCK_N]`` buffer of the largest scores seen
  so far, sorted descending. Each score tile is sorted ascending by a bitonic network; its elementwise max with the
  buffer holds the top ``BLOCK_N`` of their union and is bitonic, so one merge pass sorts it into the new buffer.
  ``BLOCK_N >= k``, so the k-th largest visible score (the threshold ``t_i``) and the top-k mass come out of the
  buffer at the end. Per row it writes ``LSE_all``, ``m_i``, ``t_i``, the tie weight and the visible count.
- Backward, two kernels that recompute the scores tile by tile: one per query tile accumulates dQ over its key tiles,
  one per key tile accumulates dK over the query tiles of every query head of its kv group. No atomics. The score
  gradient is ``p · (α - w · β)`` with ``p = exp(s - LSE_all)``, ``w`` the top-k weight of the key and per-row
  ``(α, β) = (1, 1 / m_i)`` (logmass) or ``(m_i, 1)`` (mass), computed once per row by the launcher. The sink
  gradient, ``Σ_rows p_sink (α - β)``, needs no kernel: it comes from the saved ``LSE_all`` and ``m_i``.

Tiles walked. Key tiles start at multiples of ``BLOCK_N`` and query tiles at multiples of ``BLOCK_M`` in all three
kernels. A query tile walks only the key tiles that hold a key one of its rows may see: at or below the causal
diagonal of its last row (``j <= q_offset + i``) and, with ``key_padding``, inside the batch's bounds; the dK kernel
walks, for its key tile, only the query tiles whose rows may see one of its keys. Keys outside that range are read as
zeros (so a NaN in a key row that no row of the tile sees never reaches dQ through ``0 · NaN``). With ``key_padding``
the per-key bits are loaded per tile (``[BLOCK_N]``) and the visible counts come in closed form from its prefix sums.
A general ``attn_mask`` (any broadcast view of ``[B, Hq, Lq, Lk]``, never materialised) is read per element and
every tile is walked (below the diagonal when causal).

Ties and bit-identical recomputation. Keys whose score equals ``t_i`` share the top-k slots left over by the keys
above it, each with weight ``(k - #above) / #tied`` (the average over every way of breaking the tie, so the loss is
the exact top-k mass and the gradient is symmetric). Counting the tied keys needs every key equal to ``t_i``, including
those that fell off the end of the buffer; the forward keeps, per row, the number of dropped scores equal to the
buffer's current minimum. The backward decides top-k membership by comparing its recomputed scores with ``t_i``
exactly, so the forward and both backward kernels compute every score with the same code (:func:`_tile_scores`), on
the same tile (fixed tile origins, above: walking fewer tiles never moves a score to another tile), with the same tile
shape and number of warps (``kernels/config.py``, never autotuned). On sm_90 every score element comes from the
same wgmma instruction (m64n64k16, over the head dim in the same order) in all three kernels; at k <= 64 (a 128 x 64
tile) also with the same warp layout, while at k > 64 (64 x 128) the forward spreads the tile's columns over its two
warpgroups and the backward kernels, whose score tile feeds a second product, compute it in both. Should a compiler
ever round a recomputed score differently, only keys within an ulp of ``t_i`` could change sides, which gives the
gradient at a neighbouring input.

Supports float16, bfloat16 and float32 inputs (scores and statistics in float32; float32 dot products in full
precision, "ieee"), any strides, head dims ``config.MIN_HEAD_DIM..MAX_HEAD_DIM`` (padded to a power of two), GQA,
causal masking with any ``q_offset`` (Lq != Lk), key padding, a general boolean mask, softcap and sinks. Batch, head
and tile-row offsets are int64; offsets inside a tile (at most ``BLOCK × stride``) are int32, so a row stride must
stay below ``2**31 / 128`` elements. NaN in a query row or in a key row the row sees makes the row's loss and the
gradients NaN.

Limits. ``1 <= k <= config.REGULARIZER_MAX_K`` (the buffer lives in registers; ``BLOCK_N`` grows to the next power
of two of k, see :func:`kernels.common.unsupported_reason`). With a general ``attn_mask`` a NaN in a key row that no
row sees but that shares a walked tile with visible keys makes dQ NaN for the rows of that tile. Runs on CPU tensors
under ``TRITON_INTERPRET=1`` (float32 and float16; the interpreter's bfloat16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import common, config
from .common import LOG2E, safe_shift, soft_cap

KINDS = ("logmass", "mass")
# Minimum tile side of tl.dot on GPUs.
MIN_DOT_SIDE = 16
# How visibility beyond causality is given (the MASK_MODE constexpr).
MASK_NONE: tl.constexpr = tl.constexpr(0)
MASK_KEY_PADDING: tl.constexpr = tl.constexpr(1)  # per-key bits [B, Lk] with prefix sums and bounds
MASK_GENERAL: tl.constexpr = tl.constexpr(2)  # a boolean view of [B, Hq, Lq, Lk], read per element

# The bitonic network reduces pairs with tl.max / tl.min. Under the interpreter every call of a jitted function (tl.max
# itself is one) costs about a millisecond, which makes the forward about 4x slower there; tl.reduce with the very
# combine functions tl.max and tl.min use is recognised by the interpreter and runs on numpy. Those names are private
# to Triton, so they are used only under the interpreter, and only if they exist; compiled code never touches them.
_INTERPRETER_MAX = getattr(tl.standard, "_elementwise_max", None)
_INTERPRETER_MIN = getattr(tl.standard, "_elementwise_min", None)
FAST_INTERPRETER_REDUCE: tl.constexpr = tl.constexpr(
    config.INTERPRET and _INTERPRETER_MAX is not None and _INTERPRETER_MIN is not None
)


class RegularizerStats(NamedTuple):
    """Per-row statistics of :func:`regularizer_forward`, each ``[B, Hq, Lq]``; meaningful where ``n_visible > k``."""

    lse_all: torch.Tensor  # float32 log-sum-exp of the visible scores and the sink
    mass: torch.Tensor  # float32 top-k mass m_i (the sink counts as kept)
    thresh: torch.Tensor  # float32 k-th largest visible score t_i
    tie_w: torch.Tensor  # float32 top-k weight of a key whose score equals t_i
    n_visible: torch.Tensor  # int32 number of visible keys
    walked_tiles: torch.Tensor | None  # int32 [cdiv(Lq, BLOCK_M), B * Hq] key tiles each program walked (debug)


# ---- @triton.jit helpers --------------------------------------------------------------------------------------


@triton.jit
def _key_range(
    KeyBounds, off_b, start_m, seqlen_q, seqlen_k, q_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr,
):  # fmt: skip
    """``(lo, hi, lo_tile)``: the keys ``[lo, hi)`` some row of the query tile at ``start_m`` may see, and the first
    walked tile (``lo`` rounded down to a tile origin, so that every score lands on the same tile in every kernel)."""
    lo = 0
    hi = seqlen_k
    if CAUSAL:
        hi = tl.minimum(hi, q_offset + tl.minimum(start_m + BLOCK_M, seqlen_q))
    if MASK_MODE == MASK_KEY_PADDING:
        lo = tl.load(KeyBounds + off_b.to(tl.int64) * 2)
        hi = tl.minimum(hi, tl.load(KeyBounds + off_b.to(tl.int64) * 2 + 1))
    # An empty range walks nothing (a tile origin below lo could otherwise still be below hi).
    return lo, hi, tl.where(hi > lo, (lo // BLOCK_N) * BLOCK_N, hi)


@triton.jit
def _tile_scores(
    q, k, offs_m, offs_n, mask_ptrs, key_bits, seqlen_q, seqlen_k, q_offset, sm_scale, softcap,
    CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Scores of a ``[BLOCK_M, BLOCK_N]`` tile, ``-inf`` where the key is not visible, and the visibility.

    Every kernel computes scores only here, so the forward's and the backward's are bit-identical. ``offs_m`` /
    ``offs_n`` are the tile's query / key indices, ``mask_ptrs`` the general mask's elements of the tile
    (``[BLOCK_M, BLOCK_N]``), ``key_bits`` the key padding bits of its keys (``[BLOCK_N]``).
    """
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale  # [BLOCK_M, BLOCK_N]
    if HAS_SOFTCAP:
        s = soft_cap(s, softcap)
    # Rows past seqlen_q see nothing either: their zero query rows times a NaN key would leak NaN into dK.
    if MASK_MODE == MASK_KEY_PADDING:
        visible = (offs_m < seqlen_q)[:, None] & (key_bits != 0)[None, :]  # key bits are 0 past seqlen_k
    elif MASK_MODE == MASK_GENERAL:
        in_range = (offs_m < seqlen_q)[:, None] & (offs_n < seqlen_k)[None, :]
        allowed = tl.load(mask_ptrs, mask=in_range, other=0)  # [BLOCK_M, BLOCK_N]
        visible = allowed != 0
    else:
        visible = (offs_m < seqlen_q)[:, None] & (offs_n < seqlen_k)[None, :]  # [BLOCK_M, BLOCK_N]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + q_offset)  # [BLOCK_M, BLOCK_N]
    return tl.where(visible, s, float("-inf")), visible


@triton.jit
def _key_tile_scores(
    q, k_head, k_offs, mask_rows, mask_offs, key_mask_row, start_n, offs_m, offs_j, d_ok, lo, hi,
    seqlen_q, seqlen_k, q_offset, sm_scale, softcap, stride_kn, stride_mn,
    EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The key tile at ``start_n`` of a query tile's walk: its K rows in ``[lo, hi)`` (``[BLOCK_N, HEAD_DIM]``), its
    scores and their visibility (:func:`_tile_scores`). The forward and the dQ kernel walk their keys through this one
    function, so the dQ kernel recomputes each score on the forward's own tile."""
    offs_n = start_n + offs_j
    k_ok = ((offs_n >= lo) & (offs_n < hi))[:, None]
    if not EVEN_D:
        k_ok = k_ok & d_ok
    k = tl.load(k_head + tl.cast(start_n, tl.int64) * stride_kn + k_offs, mask=k_ok, other=0.0)  # [BLOCK_N, HEAD_DIM]
    key_bits = offs_j
    if MASK_MODE == MASK_KEY_PADDING:
        key_bits = tl.load(key_mask_row + offs_n, mask=offs_n < seqlen_k, other=0)  # [BLOCK_N]
    s, visible = _tile_scores(
        q, k, offs_m, offs_n, mask_rows + tl.cast(start_n, tl.int64) * stride_mn + mask_offs, key_bits,
        seqlen_q, seqlen_k, q_offset, sm_scale, softcap,
        CAUSAL=CAUSAL, MASK_MODE=MASK_MODE, HAS_SOFTCAP=HAS_SOFTCAP, DOT_PRECISION=DOT_PRECISION,
    )  # fmt: skip
    return k, s, visible


@triton.jit
def _merge_top(top, top_min, n_dropped, s, LOG_N: tl.constexpr, N_DIMS: tl.constexpr):
    """Merge score tile ``s`` into the descending top buffer ``top``; both ``[BLOCK_M, BLOCK_N = 2**LOG_N]``.

    ``n_dropped`` counts, per row, scores that fell off the buffer and equal its minimum ``top_min``.

    Bitonic sorting network on the tile viewed as the hypercube ``[2] * N_DIMS`` (the last LOG_N axes are the bits of
    the column index). A compare-exchange of the pairs whose column indices differ in bit j takes the min and the max
    over that axis, which reads the partner without a gather. Written out in one function: under the interpreter
    every call of a jitted helper costs about a millisecond.
    """
    # Sort the tile ascending: stage t sorts runs of 2**t columns, descending where column bit t is set. Column bit j
    # is hypercube axis N_DIMS - 1 - j; the loops run over axes because constexprs cannot be reassigned in a loop.
    h = tl.reshape(s, [2] * N_DIMS)
    for stage in tl.static_range(1, LOG_N + 1):
        for axis in tl.static_range(N_DIMS - stage, N_DIMS):
            upper = tl.reshape(tl.arange(0, 2), [1] * axis + [2] + [1] * (N_DIMS - 1 - axis))
            if stage < LOG_N:
                upper = upper ^ tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - 1 - stage) + [2] + [1] * stage)
            if FAST_INTERPRETER_REDUCE:
                h_max = tl.reduce(h, axis, _INTERPRETER_MAX, keep_dims=True)
                h_min = tl.reduce(h, axis, _INTERPRETER_MIN, keep_dims=True)
            else:
                h_max = tl.max(h, axis, keep_dims=True)
                h_min = tl.min(h, axis, keep_dims=True)
            h = tl.where(upper != 0, h_max, h_min)
    # Descending buffer against ascending tile: the elementwise max holds the top BLOCK_N of their union and is bitonic,
    # so one merge pass (larger element first at every distance) sorts it descending.
    h = tl.maximum(tl.reshape(top, [2] * N_DIMS), h)
    for axis in tl.static_range(N_DIMS - LOG_N, N_DIMS):
        lower = tl.reshape(tl.arange(0, 2), [1] * axis + [2] + [1] * (N_DIMS - 1 - axis)) == 0
        if FAST_INTERPRETER_REDUCE:
            h_max = tl.reduce(h, axis, _INTERPRETER_MAX, keep_dims=True)
            h_min = tl.reduce(h, axis, _INTERPRETER_MIN, keep_dims=True)
        else:
            h_max = tl.max(h, axis, keep_dims=True)
            h_min = tl.min(h, axis, keep_dims=True)
        h = tl.where(lower, h_max, h_min)
    merged = tl.reshape(h, s.shape)  # [BLOCK_M, BLOCK_N]

    new_min = tl.min(merged, 1)
    at_min = new_min[:, None]
    # Scores equal to the new minimum that fell off: those in the union minus those still in the buffer. Earlier
    # drops are all <= the old minimum, so they only still tie when the minimum did not move.
    dropped_now = (top == at_min).to(tl.int32) + (s == at_min).to(tl.int32) - (merged == at_min).to(tl.int32)
    n_dropped = tl.sum(dropped_now, 1) + tl.where(new_min == top_min, n_dropped, 0)
    return merged, new_min, n_dropped


@triton.jit
def _score_grad(s, lse, thresh, c_above, c_tie, c_below, softcap, HAS_SOFTCAP: tl.constexpr):
    """``d loss / d (sm_scale · q·k)`` of a ``[BLOCK_M, BLOCK_N]`` tile: ``p · c`` with ``p = exp(s - LSE_all)`` and
    ``c`` the row's coefficient for a key above, at or below the threshold, times the cap's derivative.

    Rows that contribute nothing arrive with ``lse = +inf`` and zero coefficients and give exact zeros."""
    p = tl.math.exp2((s - lse[:, None]) * LOG2E)  # [BLOCK_M, BLOCK_N]
    t = thresh[:, None]
    coef = tl.where(s > t, c_above[:, None], tl.where(s == t, c_tie[:, None], c_below[:, None]))
    ds = p * coef
    if HAS_SOFTCAP:
        # Invisible keys have s = -inf: the clamp keeps their 0 · (1 - inf) from becoming NaN.
        capped = s / softcap
        ds = ds * (1.0 - tl.minimum(capped * capped, 1.0))
    return ds


@triton.jit
def _row_coefficients(Lse, Thresh, CAbove, CTie, CBelow, rows, in_range):
    """The backward's per-row inputs of ``rows`` (``[BLOCK_M]``). Rows past the end read as rows that contribute
    nothing (``+inf`` LSE and threshold, zero coefficients), so :func:`_score_grad` gives them exact zeros."""
    lse = tl.load(Lse + rows, mask=in_range, other=float("inf"))
    thresh = tl.load(Thresh + rows, mask=in_range, other=float("inf"))
    c_above = tl.load(CAbove + rows, mask=in_range, other=0.0)
    c_tie = tl.load(CTie + rows, mask=in_range, other=0.0)
    c_below = tl.load(CBelow + rows, mask=in_range, other=0.0)
    return lse, thresh, c_above, c_tie, c_below


# ---- kernels ----------------------------------------------------------------------------------------------------


@triton.jit
def _regularizer_fwd_kernel(
    Q, K, Sinks, Mask, KeyMask, KeyPrefix, KeyBounds,
    LseAll, Mass, Thresh, TieW, NVisible, WalkedTiles,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    num_heads, groups, seqlen_q, seqlen_k, head_dim, q_offset, top_k, sm_scale, softcap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LOG_N: tl.constexpr, N_DIMS: tl.constexpr, COUNT_TILES: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_hk = off_h // groups
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = (offs_d < head_dim)[None, :]  # [1, HEAD_DIM]; not applied when EVEN_D

    # int64 bases of the batch, head and tile rows; offsets inside a tile stay int32.
    q_tile = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + start_m.to(tl.int64) * stride_qm
    q_ptrs = q_tile + tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q_ok = (offs_m < seqlen_q)[:, None]
    if not EVEN_D:
        q_ok = q_ok & d_ok
    q = tl.load(q_ptrs, mask=q_ok, other=0.0)  # [BLOCK_M, HEAD_DIM]
    k_head = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    k_offs = offs_j[:, None] * stride_kn + offs_d[None, :] * stride_kd  # [BLOCK_N, HEAD_DIM]
    mask_rows = (
        Mask + off_b.to(tl.int64) * stride_mb + off_h.to(tl.int64) * stride_mh + start_m.to(tl.int64) * stride_mm
    )
    mask_offs = tl.arange(0, BLOCK_M)[:, None] * stride_mm + offs_j[None, :] * stride_mn  # [BLOCK_M, BLOCK_N]
    key_mask_row = KeyMask + off_b.to(tl.int64) * seqlen_k

    lo, hi, lo_tile = _key_range(
        KeyBounds, off_b, start_m, seqlen_q, seqlen_k, q_offset,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=CAUSAL, MASK_MODE=MASK_MODE,
    )  # fmt: skip

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    n_visible = tl.zeros([BLOCK_M], tl.int32)
    top = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
    top_min = tl.full([BLOCK_M], float("-inf"), tl.float32)
    n_dropped = tl.zeros([BLOCK_M], tl.int32)
    walked = 0

    for start_n in range(lo_tile, hi, BLOCK_N):
        _, s, visible = _key_tile_scores(
            q, k_head, k_offs, mask_rows, mask_offs, key_mask_row, start_n, offs_m, offs_j, d_ok, lo, hi,
            seqlen_q, seqlen_k, q_offset, sm_scale, softcap, stride_kn, stride_mn,
            EVEN_D=EVEN_D, CAUSAL=CAUSAL, MASK_MODE=MASK_MODE, HAS_SOFTCAP=HAS_SOFTCAP, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip
        if MASK_MODE == MASK_GENERAL:
            n_visible += tl.sum(visible.to(tl.int32), 1)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = safe_shift(m_new)
        l_i = l_i * tl.math.exp2((m_i - shift) * LOG2E) + tl.sum(tl.math.exp2((s - shift[:, None]) * LOG2E), 1)
        m_i = m_new
        top, top_min, n_dropped = _merge_top(top, top_min, n_dropped, s, LOG_N=LOG_N, N_DIMS=N_DIMS)
        if COUNT_TILES:
            walked += 1

    if MASK_MODE != MASK_GENERAL:
        # Closed form: keys [0, cols) pass causality; with key padding, the prefix sum counts the attended ones.
        cols = tl.zeros([BLOCK_M], tl.int32) + seqlen_k
        if CAUSAL:
            cols = tl.minimum(tl.maximum(offs_m + q_offset + 1, 0), seqlen_k)
        if MASK_MODE == MASK_KEY_PADDING:
            n_visible = tl.load(KeyPrefix + off_b.to(tl.int64) * (seqlen_k + 1) + cols)
        else:
            n_visible = cols

    # The sink joins the row max and both sums; the buffer's first k slots hold the top-k (ties repeat t_i).
    offs_top = offs_j[None, :]  # [1, BLOCK_N]
    shift = safe_shift(m_i)
    if HAS_SINKS:
        sink = tl.load(Sinks + off_h.to(tl.int64))
        shift = tl.maximum(shift, sink)
        l_i = l_i * tl.math.exp2((m_i - shift) * LOG2E)
    z_top = tl.sum(tl.where(offs_top < top_k, tl.math.exp2((top - shift[:, None]) * LOG2E), 0.0), 1)
    if HAS_SINKS:
        e_sink = tl.math.exp2((sink - shift) * LOG2E)
        l_i += e_sink
        z_top += e_sink
    # Rows with no visible key and no sink (l_i = 0) are not regularized: they get LSE = shift and mass 0. No clamp of
    # l_i: a NaN score must leave it, hence the row's loss, NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse_all = shift + tl.log(l_safe)
    mass = z_top / l_safe
    thresh = tl.sum(tl.where(offs_top == top_k - 1, top, 0.0), 1)
    n_above = tl.sum((top > thresh[:, None]).to(tl.int32), 1)
    n_tied = tl.sum((top == thresh[:, None]).to(tl.int32), 1) + tl.where(top_min == thresh, n_dropped, 0)
    tie_w = (top_k - n_above).to(tl.float32) / tl.maximum(n_tied, 1).to(tl.float32)

    row_tile = pid_bh.to(tl.int64) * seqlen_q + start_m
    rows = tl.arange(0, BLOCK_M)
    in_range = offs_m < seqlen_q
    tl.store(LseAll + row_tile + rows, lse_all, mask=in_range)
    tl.store(Mass + row_tile + rows, mass, mask=in_range)
    tl.store(Thresh + row_tile + rows, thresh, mask=in_range)
    tl.store(TieW + row_tile + rows, tie_w, mask=in_range)
    tl.store(NVisible + row_tile + rows, n_visible, mask=in_range)
    if COUNT_TILES:
        tl.store(WalkedTiles + pid_m.to(tl.int64) * tl.num_programs(1) + pid_bh, walked)


@triton.jit
def _regularizer_bwd_dq_kernel(
    Q, K, Mask, KeyMask, KeyBounds,
    Lse, Thresh, CAbove, CTie, CBelow, DQ, WalkedTiles,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    num_heads, groups, seqlen_q, seqlen_k, head_dim, q_offset, sm_scale, softcap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COUNT_TILES: tl.constexpr,
):  # fmt: skip
    # The forward's program layout, tile loads and key walk, so every score is recomputed on the forward's tile.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_hk = off_h // groups
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = (offs_d < head_dim)[None, :]  # [1, HEAD_DIM]; not applied when EVEN_D
    in_range = offs_m < seqlen_q

    q_tile = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + start_m.to(tl.int64) * stride_qm
    q_ptrs = q_tile + tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q_ok = in_range[:, None]
    if not EVEN_D:
        q_ok = q_ok & d_ok
    q = tl.load(q_ptrs, mask=q_ok, other=0.0)  # [BLOCK_M, HEAD_DIM]
    k_head = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    k_offs = offs_j[:, None] * stride_kn + offs_d[None, :] * stride_kd  # [BLOCK_N, HEAD_DIM]
    mask_rows = (
        Mask + off_b.to(tl.int64) * stride_mb + off_h.to(tl.int64) * stride_mh + start_m.to(tl.int64) * stride_mm
    )
    mask_offs = tl.arange(0, BLOCK_M)[:, None] * stride_mm + offs_j[None, :] * stride_mn  # [BLOCK_M, BLOCK_N]
    key_mask_row = KeyMask + off_b.to(tl.int64) * seqlen_k
    row_tile = pid_bh.to(tl.int64) * seqlen_q + start_m
    lse, thresh, c_above, c_tie, c_below = _row_coefficients(
        Lse + row_tile, Thresh + row_tile, CAbove + row_tile, CTie + row_tile, CBelow + row_tile,
        tl.arange(0, BLOCK_M), in_range,
    )  # fmt: skip

    lo, hi, lo_tile = _key_range(
        KeyBounds, off_b, start_m, seqlen_q, seqlen_k, q_offset,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=CAUSAL, MASK_MODE=MASK_MODE,
    )  # fmt: skip
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    walked = 0
    for start_n in range(lo_tile, hi, BLOCK_N):
        k, s, _ = _key_tile_scores(
            q, k_head, k_offs, mask_rows, mask_offs, key_mask_row, start_n, offs_m, offs_j, d_ok, lo, hi,
            seqlen_q, seqlen_k, q_offset, sm_scale, softcap, stride_kn, stride_mn,
            EVEN_D=EVEN_D, CAUSAL=CAUSAL, MASK_MODE=MASK_MODE, HAS_SOFTCAP=HAS_SOFTCAP, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip
        # [BLOCK_M, BLOCK_N]
        ds = _score_grad(s, lse, thresh, c_above, c_tie, c_below, softcap, HAS_SOFTCAP=HAS_SOFTCAP)
        acc += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)  # [BLOCK_M, HEAD_DIM]
        if COUNT_TILES:
            walked += 1

    dq_tile = DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh + start_m.to(tl.int64) * stride_dqm
    dq_ptrs = dq_tile + tl.arange(0, BLOCK_M)[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (acc * sm_scale).to(DQ.dtype.element_ty), mask=q_ok)
    if COUNT_TILES:
        tl.store(WalkedTiles + pid_m.to(tl.int64) * tl.num_programs(1) + pid_bh, walked)


@triton.jit
def _regularizer_bwd_dk_kernel(
    Q, K, Mask, KeyMask, KeyBounds,
    Lse, Thresh, CAbove, CTie, CBelow, DK, WalkedTiles,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    num_heads, num_kv_heads, groups, seqlen_q, seqlen_k, head_dim, q_offset, sm_scale, softcap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COUNT_TILES: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    off_b = pid_bhk // num_kv_heads
    off_hk = pid_bhk % num_kv_heads
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = (offs_d < head_dim)[None, :]  # [1, HEAD_DIM]; not applied when EVEN_D

    # The keys of this tile some row may see: [lo, hi), as _key_range bounds them for the forward's query tiles.
    lo = 0
    hi = seqlen_k
    key_bits = offs_n
    if MASK_MODE == MASK_KEY_PADDING:
        lo = tl.load(KeyBounds + off_b.to(tl.int64) * 2)
        hi = tl.minimum(hi, tl.load(KeyBounds + off_b.to(tl.int64) * 2 + 1))
        key_bits = tl.load(KeyMask + off_b.to(tl.int64) * seqlen_k + offs_n, mask=offs_n < seqlen_k, other=0)
    k_ok = ((offs_n >= lo) & (offs_n < hi))[:, None]
    if not EVEN_D:
        k_ok = k_ok & d_ok
    k_tile = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh + start_n.to(tl.int64) * stride_kn
    k_ptrs = k_tile + tl.arange(0, BLOCK_N)[:, None] * stride_kn + offs_d[None, :] * stride_kd
    k = tl.load(k_ptrs, mask=k_ok, other=0.0)  # [BLOCK_N, HEAD_DIM]

    # Query tiles start at multiples of BLOCK_M, as in the forward. Causal: row i sees key j iff i >= j - q_offset,
    # so the first tile is the one holding the first row that sees the first key of this tile some row may see.
    first_row = 0
    if CAUSAL:
        first_row = tl.maximum(tl.maximum(start_n, lo) - q_offset, 0)
    lo_m = (first_row // BLOCK_M) * BLOCK_M
    seen = first_row < seqlen_q
    if MASK_MODE == MASK_KEY_PADDING:
        seen = seen & (start_n + BLOCK_N > lo) & (start_n < hi)
    hi_m = tl.where(seen, seqlen_q, 0)
    q_offs = offs_i[:, None] * stride_qm + offs_d[None, :] * stride_qd  # [BLOCK_M, HEAD_DIM]
    mask_offs = offs_i[:, None] * stride_mm + tl.arange(0, BLOCK_N)[None, :] * stride_mn  # [BLOCK_M, BLOCK_N]

    # One loop over (query head of the group, query tile), so the loads stay pipelined across heads.
    num_m = tl.maximum(tl.cdiv(hi_m - lo_m, BLOCK_M), 0)
    acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    walked = 0
    for it in range(0, groups * num_m):
        g = it // num_m
        start_m = lo_m + (it - g * num_m) * BLOCK_M
        off_h = (off_hk * groups + g).to(tl.int64)
        offs_m = start_m + offs_i
        in_range = offs_m < seqlen_q
        q_ok = in_range[:, None]
        if not EVEN_D:
            q_ok = q_ok & d_ok
        q_tile = Q + off_b.to(tl.int64) * stride_qb + off_h * stride_qh + tl.cast(start_m, tl.int64) * stride_qm
        q = tl.load(q_tile + q_offs, mask=q_ok, other=0.0)  # [BLOCK_M, HEAD_DIM]
        row_tile = (off_b.to(tl.int64) * num_heads + off_h) * seqlen_q + start_m
        lse, thresh, c_above, c_tie, c_below = _row_coefficients(
            Lse + row_tile, Thresh + row_tile, CAbove + row_tile, CTie + row_tile, CBelow + row_tile, offs_i, in_range,
        )  # fmt: skip
        mask_tile = Mask + off_b.to(tl.int64) * stride_mb + off_h * stride_mh + tl.cast(start_m, tl.int64) * stride_mm
        s, _ = _tile_scores(
            q, k, offs_m, offs_n, mask_tile + start_n.to(tl.int64) * stride_mn + mask_offs, key_bits,
            seqlen_q, seqlen_k, q_offset, sm_scale, softcap,
            CAUSAL=CAUSAL, MASK_MODE=MASK_MODE, HAS_SOFTCAP=HAS_SOFTCAP, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip
        # [BLOCK_M, BLOCK_N]
        ds = _score_grad(s, lse, thresh, c_above, c_tie, c_below, softcap, HAS_SOFTCAP=HAS_SOFTCAP)
        acc += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)  # [BLOCK_N, HEAD_DIM]
        if COUNT_TILES:
            walked += 1

    dk_tile = (
        DK + off_b.to(tl.int64) * stride_dkb + off_hk.to(tl.int64) * stride_dkh + start_n.to(tl.int64) * stride_dkn
    )
    dk_ptrs = dk_tile + tl.arange(0, BLOCK_N)[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dk_ok = (offs_n < seqlen_k)[:, None]
    if not EVEN_D:
        dk_ok = dk_ok & d_ok
    tl.store(dk_ptrs, (acc * sm_scale).to(DK.dtype.element_ty), mask=dk_ok)
    if COUNT_TILES:
        tl.store(WalkedTiles + pid_n.to(tl.int64) * tl.num_programs(1) + pid_bhk, walked)


# ---- launchers --------------------------------------------------------------------------------------------------


def tiles(k: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, HEAD_DIM, num_warps)``: the one shape of the forward and both backward kernels."""
    fp32 = dtype == torch.float32
    head_dim_padded = max(MIN_DOT_SIDE, triton.next_power_of_2(head_dim))
    block_n = max(MIN_DOT_SIDE, config.REGULARIZER_BLOCK_N, triton.next_power_of_2(k))
    max_tile = config.REGULARIZER_MAX_TILE
    if fp32:
        max_tile = config.REGULARIZER_FP32_MAX_TILE * 128 // max(128, head_dim_padded)
    block_m = max(MIN_DOT_SIDE, min(config.REGULARIZER_BLOCK_M, max_tile // block_n))
    return block_m, block_n, head_dim_padded, config.regularizer_num_warps(block_m, block_n, fp32)


def _check(query: torch.Tensor, key: torch.Tensor, k: int) -> None:
    reason = common.unsupported_reason("regularizer", query, key, k=k)
    if reason is not None:
        raise ValueError(reason)


def _mask_args(query: torch.Tensor, attn_mask, key_padding):
    """``(mode, mask, mask strides, key mask, key prefix, key bounds)``; unused pointers are ``query`` (never read)."""
    if attn_mask is not None:
        # bool and uint8 share a size; the view keeps the (possibly zero) broadcast strides.
        return MASK_GENERAL.value, attn_mask.view(torch.uint8), attn_mask.stride(), query, query, query
    if key_padding is not None:
        key_mask, prefix, bounds = (t.contiguous() for t in key_padding)
        return MASK_KEY_PADDING.value, query, (0, 0, 0, 0), key_mask.view(torch.uint8), prefix, bounds
    return MASK_NONE.value, query, (0, 0, 0, 0), query, query, query


def regularizer_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    sinks: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    key_padding: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    k: int,
    sm_scale: float,
    softcap: float = 0.0,
    causal: bool = True,
    q_offset: int,
    count_tiles: bool = False,
) -> RegularizerStats:
    """Per-row statistics of the regularizer (:class:`RegularizerStats`, each ``[B, Hq, Lq]``).

    Args (normalised as in the kernel spec): query ``[B, Hq, Lq, D]`` and key ``[B, Hkv, Lk, D]``, same dtype and
    device, any strides; ``sinks`` float32 ``[Hq]`` or None; ``attn_mask`` a boolean view of ``[B, Hq, Lq, Lk]`` or
    ``key_padding = (mask [B, Lk] bool, prefix [B, Lk + 1] int32, bounds [B, 2] int32)``, never both; ``k >= 1``;
    ``sm_scale > 0``; ``softcap >= 0`` (0 = off); row i sees key j iff ``j <= q_offset + i`` when causal.
    ``count_tiles`` also returns the key tiles each program walked (tests).

    Raises:
        ValueError: a call the kernels cannot run (:func:`kernels.common.unsupported_reason`).
    """
    _check(query, key, k)
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    block_m, block_n, head_dim, num_warps = tiles(k, d, query.dtype)
    device = query.device
    stats = [torch.empty(b, hq, lq, dtype=torch.float32, device=device) for _ in range(4)]
    n_visible = torch.empty(b, hq, lq, dtype=torch.int32, device=device)
    grid = (triton.cdiv(lq, block_m), b * hq)
    walked = torch.zeros(grid, dtype=torch.int32, device=device) if count_tiles else None
    mode, mask, mask_strides, key_mask, prefix, bounds = _mask_args(query, attn_mask, key_padding)
    if grid[0] * grid[1] > 0:
        _regularizer_fwd_kernel[grid](
            query, key, query if sinks is None else sinks, mask, key_mask, prefix, bounds,
            *stats, n_visible, n_visible if walked is None else walked,
            *query.stride(), *key.stride(), *mask_strides,
            hq, hq // hkv, lq, lk, d, q_offset, k, sm_scale, softcap,
            BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, EVEN_D=head_dim == d, CAUSAL=causal,
            MASK_MODE=mode, HAS_SINKS=sinks is not None, HAS_SOFTCAP=softcap > 0,
            DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
            LOG_N=block_n.bit_length() - 1, N_DIMS=(block_m * block_n).bit_length() - 1, COUNT_TILES=count_tiles,
            num_warps=num_warps, num_stages=config.REGULARIZER_NUM_STAGES,
        )  # fmt: skip
    return RegularizerStats(*stats, n_visible, walked)


def row_coefficients(stats: RegularizerStats, grad_rows: torch.Tensor, k: int, kind: str):
    """``(lse, thresh, c_above, c_tie, c_below)``, float32 ``[B, Hq, Lq]``: what the backward kernels read per row for
    the gradient of ``Σ_i grad_rows_i · loss_i``. Score gradient ``p · c``, ``c`` by the key's place against
    ``t_i``: ``α - β``, ``α - tie_w · β``, ``α`` with ``(α, β) = (1, 1 / m_i)`` (logmass) or ``(m_i, 1)`` (mass).
    Rows that are not regularized get ``+inf`` LSE and threshold and zero coefficients (exact zeros, even for rows
    whose statistics are not finite)."""
    regularized = stats.n_visible > k
    mass = stats.mass.clamp_max(1.0)
    g = torch.where(regularized, grad_rows.to(torch.float32), 0.0)
    if kind == "logmass":
        alpha, beta = g, g / mass
    elif kind == "mass":
        alpha, beta = g * mass, g
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    inf = torch.full((), float("inf"), device=mass.device)
    return (
        torch.where(regularized, stats.lse_all, inf),
        torch.where(regularized, stats.thresh, inf),
        torch.where(regularized, alpha - beta, 0.0),
        torch.where(regularized, alpha - stats.tie_w * beta, 0.0),
        torch.where(regularized, alpha, 0.0),
    )


def regularizer_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    stats: RegularizerStats,
    grad_rows: torch.Tensor,
    *,
    sinks: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    key_padding: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    k: int,
    sm_scale: float,
    softcap: float = 0.0,
    causal: bool = True,
    q_offset: int,
    kind: str = "logmass",
    count_tiles: bool = False,
):
    """``(dq, dk, dsinks)``: the gradient of ``Σ_i grad_rows_i · loss_i`` over the regularized rows.

    ``stats`` are :func:`regularizer_forward`'s on the same inputs and keywords; ``grad_rows`` float32
    ``[B, Hq, Lq]`` (rows that are not regularized are ignored). dq and dk come in the input dtype; ``dsinks`` is
    float32 ``[Hq]`` when ``sinks`` is given, else None. With ``count_tiles`` it returns
    ``(dq, dk, dsinks, (dq walked key tiles, dk walked query tiles))``.
    """
    _check(query, key, k)
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    block_m, block_n, head_dim, num_warps = tiles(k, d, query.dtype)
    coefficients = row_coefficients(stats, grad_rows, k, kind)
    mode, mask, mask_strides, key_mask, prefix, bounds = _mask_args(query, attn_mask, key_padding)
    dq = torch.empty_like(query)
    dk = torch.empty_like(key)
    grid_q = (triton.cdiv(lq, block_m), b * hq)
    grid_k = (triton.cdiv(lk, block_n), b * hkv)
    walked_q = torch.zeros(grid_q, dtype=torch.int32, device=query.device) if count_tiles else None
    walked_k = torch.zeros(grid_k, dtype=torch.int32, device=query.device) if count_tiles else None
    flags = dict(
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, EVEN_D=head_dim == d, CAUSAL=causal, MASK_MODE=mode,
        HAS_SOFTCAP=softcap > 0, DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        COUNT_TILES=count_tiles, num_warps=num_warps, num_stages=config.REGULARIZER_NUM_STAGES,
    )  # fmt: skip
    if grid_q[0] * grid_q[1] > 0:
        _regularizer_bwd_dq_kernel[grid_q](
            query, key, mask, key_mask, bounds, *coefficients, dq, dq if walked_q is None else walked_q,
            *query.stride(), *key.stride(), *mask_strides, *dq.stride(),
            hq, hq // hkv, lq, lk, d, q_offset, sm_scale, softcap, **flags,
        )  # fmt: skip
    if grid_k[0] * grid_k[1] > 0:
        _regularizer_bwd_dk_kernel[grid_k](
            query, key, mask, key_mask, bounds, *coefficients, dk, dk if walked_k is None else walked_k,
            *query.stride(), *key.stride(), *mask_strides, *dk.stride(),
            hq, hkv, hq // hkv, lq, lk, d, q_offset, sm_scale, softcap, **flags,
        )  # fmt: skip
    dsinks = None
    if sinks is not None:
        # d loss / d sink = p_sink · (α - β) per row (the sink counts as kept: w = 1).
        p_sink = torch.exp(sinks.view(1, hq, 1) - coefficients[0])
        dsinks = (p_sink * coefficients[2]).sum(dim=(0, 2))
    if count_tiles:
        return dq, dk, dsinks, (walked_q, walked_k)
    return dq, dk, dsinks


# ---- autograd -----------------------------------------------------------------------------------------------------


class TopkRegularizerFunction(torch.autograd.Function):
    """``apply(query, key, sinks, attn_mask, key_padding, k, sm_scale, softcap, causal, q_offset, kind)``.

    Returns ``(loss_sum, mass_sum, rows)``, float32 scalars: the sum over regularized rows (``n_i > k``) of the
    per-row loss (differentiable with respect to query, key and sinks), the sum of their top-k masses and their
    count (neither differentiable). Arguments are normalised as in :func:`regularizer_forward`; ``kind`` is
    ``"logmass"`` or ``"mass"``.
    """

    @staticmethod
    def forward(ctx, query, key, sinks, attn_mask, key_padding, k, sm_scale, softcap, causal, q_offset, kind):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        kw = dict(k=k, sm_scale=sm_scale, softcap=softcap, causal=causal, q_offset=q_offset)
        stats = regularizer_forward(query, key, sinks=sinks, attn_mask=attn_mask, key_padding=key_padding, **kw)
        regularized = stats.n_visible > k
        mass = stats.mass.clamp_max(1.0)
        per_row = -torch.log(mass) if kind == "logmass" else 1.0 - mass
        loss_sum = torch.where(regularized, per_row, 0.0).sum()
        mass_sum = torch.where(regularized, mass, 0.0).sum()
        rows = regularized.sum().to(torch.float32)
        padding = (None, None, None) if key_padding is None else tuple(key_padding)
        ctx.save_for_backward(query, key, sinks, attn_mask, *padding, *stats[:5])
        ctx.kw = dict(kw, kind=kind)
        ctx.mark_non_differentiable(mass_sum, rows)
        return loss_sum, mass_sum, rows

    @staticmethod
    def backward(ctx, grad_loss, grad_mass, grad_rows):
        query, key, sinks, attn_mask, key_mask, prefix, bounds, *stats = ctx.saved_tensors
        key_padding = None if key_mask is None else (key_mask, prefix, bounds)
        stats = RegularizerStats(*stats, None)
        grad = grad_loss.to(torch.float32).expand(stats.mass.shape)
        dq, dk, dsinks = regularizer_backward(
            query, key, stats, grad, sinks=sinks, attn_mask=attn_mask, key_padding=key_padding, **ctx.kw
        )
        if sinks is None or not ctx.needs_input_grad[2]:
            dsinks = None
        return dq, dk, dsinks, None, None, None, None, None, None, None, None
