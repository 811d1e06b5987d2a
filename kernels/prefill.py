"""Top-θ prefill attention: a FlashAttention-2 style tiled forward that skips the P·V work of pruned tiles.

Computes Top-θ attention (Berestizshevsky, Andri, Cavigelli, "Top-Theta Attention: Sparsifying Transformers by
Compensated Thresholding", arXiv 2502.08363) for query ``[B, Hq, Lq, D]`` and key/value ``[B, Hkv, Lk, D]`` with the
semantics of DESIGN.md (``sparse_attention.reference`` is the executable form). One program owns a tile of
``BLOCK_M`` query rows of one (batch, query head) and walks the K/V tiles that some of its rows can see, keeping an
online row max and two running denominators (all visible keys and kept keys) in float32. A score is kept when it
beats its row's threshold ``theta[h, min(n_i, T) - 1]``; a K/V tile in which no score is kept skips its V load and
its P·V ``tl.dot``. Compensation (``sdc``) and V-mean compensation (``vmc``) are applied in the epilogue.

Supports: float16, bfloat16 and float32 inputs with any strides; head dims 16..256 (others than powers of two are
padded); any lengths; GQA by index (kv head ``h // G``); causal with any ``q_offset`` (rows before the first key are
empty); boolean masks of any broadcast shape (a padding mask ``[B, 1, 1, Lk]`` is read one key row per tile and its
leading and trailing padded tiles are never walked); placement ``"pre"`` (one pass) and ``"post"`` (a log-sum-exp
pass first); the four ``sdc`` modes; ``vmc``. Row lengths ``n_i`` come from a closed form (causal), per-batch prefix
counts (padding masks) or a counting pass over the mask (general masks). The V mean for ``vmc`` comes from a float32
prefix sum of V computed once per call; with a general (per-row) mask it is accumulated in the main loop instead,
which then reads every walked V tile.

Limits: work is skipped per BLOCK_M x BLOCK_N tile (a tile with one kept score loads all its V rows); Q·Kᵀ and the
exponentials stay dense, and placement "post" computes Q·Kᵀ twice; query heads of one kv group run in separate programs
(K/V are re-read per head, from L2); a general mask costs one extra pass over the mask when row lengths are needed;
float32 inputs use full-precision ("ieee") dots on FMA units (slow, tiles of at most 64 rows); B·Hq <= 65535.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import config
from .common import LOG2E, SDC_CALIBRATED, SDC_CODES, SDC_NONE, SDC_THRESHOLD, check_attention_inputs

FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32, keeps log2 finite

# How the boolean attention mask is read.
MASK_NONE = tl.constexpr(0)  # causal / length limits only
MASK_KEYS = tl.constexpr(1)  # one key row per batch ([B, 1, 1, Lk] padding mask): per-tile [BLOCK_N] loads
MASK_FULL = tl.constexpr(2)  # anything else: per-tile [BLOCK_M, BLOCK_N] loads through the mask's strides

_MAX_GRID_Y = 65535  # CUDA limit on the second grid dimension, which holds batch x query heads


@triton.jit
def _tile_scores(
    q, k_base, mask_base, cols, offs_m, offs_d, row_lim, hi, lq, lk, head_dim, sm_scale,
    stride_kn, stride_kd, stride_mm, stride_mn,
    EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, DIAG: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Scores of one K tile: raw ``s = scale·q·k`` (float32), ``s2 = s·log2(e)`` with -inf where not visible, and the
    visibility. ``DIAG`` tiles may cross the causal diagonal or the end of the walked key range; the others lie
    entirely inside both, so they need no causal or bounds mask."""
    k_ptrs = k_base + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn
    if DIAG:
        k_ok = (cols < lk)[None, :]
        if not EVEN_D:
            k_ok = k_ok & (offs_d < head_dim)[:, None]
        kt = tl.load(k_ptrs, mask=k_ok, other=0.0)  # [HEAD_DIM, BLOCK_N]
    elif EVEN_D:
        kt = tl.load(k_ptrs)
    else:
        kt = tl.load(k_ptrs, mask=(offs_d < head_dim)[:, None], other=0.0)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * sm_scale  # [BLOCK_M, BLOCK_N]
    vis = tl.full((BLOCK_M, BLOCK_N), True, tl.int1)
    if DIAG:
        vis = vis & (cols < hi)[None, :]
        if CAUSAL:
            vis = vis & (cols[None, :] < row_lim[:, None])
    if MASK_MODE == MASK_KEYS:
        bits = tl.load(mask_base + cols * stride_mn, mask=cols < lk, other=0)  # [BLOCK_N]
        vis = vis & (bits != 0)[None, :]
    elif MASK_MODE == MASK_FULL:
        m_ptrs = mask_base + offs_m[:, None] * stride_mm + cols[None, :] * stride_mn
        bits = tl.load(m_ptrs, mask=(offs_m < lq)[:, None] & (cols < lk)[None, :], other=0)  # [BLOCK_M, BLOCK_N]
        vis = vis & (bits != 0)
    s2 = tl.where(vis, s * LOG2E, float("-inf"))
    return s, s2, vis


@triton.jit
def _v_tile(v_base, cols, offs_d, lk, head_dim, stride_vn, stride_vd, EVEN_D: tl.constexpr, DIAG: tl.constexpr):
    """The ``[BLOCK_N, HEAD_DIM]`` V tile of keys ``cols``, zero-padded; as in ``_tile_scores``, only ``DIAG`` tiles
    may run past the last key."""
    v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if DIAG:
        v = tl.load(v_ptrs, mask=(cols < lk)[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    elif EVEN_D:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=(offs_d < head_dim)[None, :], other=0.0)
    return v


@triton.jit
def _count_visible(
    mask_base, offs_m, row_lim, hi, lq, lk, stride_mm, stride_mn,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Visible keys per row under a general mask: one pass over the mask bits, no K or V."""
    n = tl.zeros([BLOCK_M], dtype=tl.int32)
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        m_ptrs = mask_base + offs_m[:, None] * stride_mm + cols[None, :] * stride_mn
        bits = tl.load(m_ptrs, mask=(offs_m < lq)[:, None] & (cols < hi)[None, :], other=0)  # [BLOCK_M, BLOCK_N]
        vis = bits != 0
        if CAUSAL:
            vis = vis & (cols[None, :] < row_lim[:, None])
        n += tl.sum(vis.to(tl.int32), 1)
    return n


@triton.jit
def _lse_loop(
    m2, l_all, q, k_base, mask_base, offs_m, offs_d, row_lim, lo, hi, range_hi, lq, lk, head_dim, sm_scale,
    stride_kn, stride_kd, stride_mm, stride_mn,
    EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, DIAG: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """First pass of placement "post": the row max (log2 units) and the full denominator over tiles [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        s, s2, vis = _tile_scores(
            q, k_base, mask_base, cols, offs_m, offs_d, row_lim, range_hi, lq, lk, head_dim, sm_scale,
            stride_kn, stride_kd, stride_mm, stride_mn,
            EVEN_D, CAUSAL, MASK_MODE, DIAG, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        m_new = tl.maximum(m2, tl.max(s2, 1))
        # A row that has seen nothing visible yet keeps m = -inf; shift by 0 instead so that no inf - inf appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_all = l_all * tl.math.exp2(m2 - m_safe) + tl.sum(tl.math.exp2(s2 - m_safe[:, None]), 1)
        m2 = m_new
    return m2, l_all


@triton.jit
def _pv_loop(
    acc, l_all, l_kept, m2, kept, v_sum, skipped, walked,
    q, k_base, v_base, mask_base, offs_m, offs_d, row_lim, thr, lo, hi, range_hi, lq, lk, head_dim, sm_scale,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, DIAG: tl.constexpr, ONLINE: tl.constexpr,
    POST: tl.constexpr, VMC_IN_LOOP: tl.constexpr, COUNT_KEPT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Main pass over K/V tiles [lo, hi): keep mask, denominators, kept counts and P·V of the kept scores.

    ``ONLINE`` (placement "pre") updates the row max as it goes and rescales the running state; otherwise the max
    ``m2`` and ``l_all`` are final, from the log-sum-exp pass. ``thr`` is the per-row keep threshold, in score units
    for "pre" and in log2 units for "post"; +inf for rows past the end, so that they never keep a tile alive.
    """
    offs_n = tl.arange(0, BLOCK_N)
    m_safe = tl.where(m2 == float("-inf"), 0.0, m2)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        s, s2, vis = _tile_scores(
            q, k_base, mask_base, cols, offs_m, offs_d, row_lim, range_hi, lq, lk, head_dim, sm_scale,
            stride_kn, stride_kd, stride_mm, stride_mn,
            EVEN_D, CAUSAL, MASK_MODE, DIAG, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        if POST:
            keep = vis & (s2 > thr[:, None])  # [BLOCK_M, BLOCK_N]
        else:
            keep = vis & (s > thr[:, None])
        if ONLINE:
            m_new = tl.maximum(m2, tl.max(s2, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m2 - m_safe)
            p = tl.math.exp2(s2 - m_safe[:, None])  # [BLOCK_M, BLOCK_N], 0 where not visible
            l_all = l_all * alpha + tl.sum(p, 1)
            l_kept = l_kept * alpha
            acc = acc * alpha[:, None]
            m2 = m_new
        else:
            p = tl.math.exp2(s2 - m_safe[:, None])
        p = tl.where(keep, p, 0.0)
        l_kept += tl.sum(p, 1)
        keep_i = keep.to(tl.int32)
        if COUNT_KEPT:
            kept += tl.sum(keep_i, 1)
        walked += 1
        if VMC_IN_LOOP:
            # A general mask has no prefix sum of V, so the visible V rows are summed here from every walked tile.
            v = _v_tile(v_base, cols, offs_d, lk, head_dim, stride_vn, stride_vd, EVEN_D, DIAG)
            v_sum += tl.dot(vis.to(v.dtype), v, input_precision=DOT_PRECISION)
            if tl.max(keep_i) > 0:
                acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            else:
                skipped += 1
        elif tl.max(keep_i) > 0:
            v = _v_tile(v_base, cols, offs_d, lk, head_dim, stride_vn, stride_vd, EVEN_D, DIAG)
            acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:
            skipped += 1
    return acc, l_all, l_kept, m2, kept, v_sum, skipped, walked


@triton.jit(
    do_not_specialize=["num_heads", "groups", "lq", "lk", "q_offset", "k_dense", "theta_len", "sdc_len", "head_dim"]
)
def _top_theta_prefill_kernel(
    Q, K, V, Out, Theta, SdcTable, Mask, KeyCount, KeyRange, VPrefix, Kept, Visible, TileStats,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_ph, stride_pn,
    sm_scale, num_heads, groups, lq, lk, q_offset, k_dense, theta_len, sdc_len, head_dim,
    LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr,
    HAS_THETA: tl.constexpr, POST: tl.constexpr, SDC: tl.constexpr, VMC: tl.constexpr,
    RETURN_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # LQ_BUCKET and LK_BUCKET are only the autotuning key (lengths rounded up to powers of two).
    # Heaviest causal tiles (the last query rows) first, so that the tail of the grid is short.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_kvh = off_h // groups
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < lq
    d_ok = offs_d < head_dim

    q_ptrs = (
        Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    )  # fmt: skip
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, HEAD_DIM]
    k_base = K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
    mask_base = Mask + off_b.to(tl.int64) * stride_mb + off_h.to(tl.int64) * stride_mh

    # Key range walked by this program: [lo, hi), cut by the padding mask and by the causal limit of its last row.
    row_lim = q_offset + offs_m + 1  # row i sees keys j < row_lim when causal
    lo = 0
    hi = lk
    if MASK_MODE == MASK_KEYS:
        lo = tl.load(KeyRange + 2 * off_b)
        hi = tl.load(KeyRange + 2 * off_b + 1)
    if CAUSAL:
        hi = tl.minimum(hi, q_offset + tl.minimum(start_m + BLOCK_M, lq))
    lo = (lo // BLOCK_N) * BLOCK_N
    # Tiles in [lo, mid) are seen whole by every row of the program; [mid, hi) need the per-element masks.
    if CAUSAL:
        full_end = tl.minimum(q_offset + start_m + 1, hi)
    else:
        full_end = hi
    mid = lo + (tl.maximum(full_end - lo, 0) // BLOCK_N) * BLOCK_N

    # n_i, the number of visible keys of each row, is needed before the walk: the threshold depends on it.
    NEED_N: tl.constexpr = HAS_THETA or VMC or RETURN_STATS
    if CAUSAL:
        key_end = tl.minimum(tl.maximum(row_lim, 0), lk)  # [BLOCK_M]
    else:
        key_end = tl.full([BLOCK_M], 0, tl.int32) + lk
    if MASK_MODE == MASK_NONE:
        n = key_end
    elif MASK_MODE == MASK_KEYS:
        n = tl.load(KeyCount + off_b.to(tl.int64) * (lk + 1) + key_end)
    elif NEED_N:
        n = _count_visible(mask_base, offs_m, row_lim, hi, lq, lk, stride_mm, stride_mn, CAUSAL, BLOCK_M, BLOCK_N)
    else:
        n = tl.zeros([BLOCK_M], dtype=tl.int32)

    if HAS_THETA:
        theta = tl.load(Theta + off_h * theta_len + tl.minimum(tl.maximum(n, 1), theta_len) - 1)
        prunable = n > k_dense
    else:
        theta = tl.zeros([BLOCK_M], dtype=tl.float32)
        prunable = n < 0

    m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)  # row max of s·log2(e)
    l_all = tl.zeros([BLOCK_M], dtype=tl.float32)
    if POST:
        m2, l_all = _lse_loop(
            m2, l_all, q, k_base, mask_base, offs_m, offs_d, row_lim, lo, mid, hi, lq, lk, head_dim, sm_scale,
            stride_kn, stride_kd, stride_mm, stride_mn,
            EVEN_D, CAUSAL, MASK_MODE, False, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        m2, l_all = _lse_loop(
            m2, l_all, q, k_base, mask_base, offs_m, offs_d, row_lim, mid, hi, hi, lq, lk, head_dim, sm_scale,
            stride_kn, stride_kd, stride_mm, stride_mn,
            EVEN_D, CAUSAL, MASK_MODE, True, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        # p > θ  <=>  s·log2(e) > m2 + log2(θ · l_all); θ <= 0 keeps every visible key.
        m_safe = tl.where(m2 == float("-inf"), 0.0, m2)
        log_cut = m_safe + tl.math.log2(tl.maximum(l_all, FLT_MIN)) + tl.math.log2(tl.maximum(theta, FLT_MIN))
        thr = tl.where(prunable & (theta > 0), log_cut, float("-inf"))
    else:
        thr = tl.where(prunable, theta, float("-inf"))
    thr = tl.where(row_ok, thr, float("inf"))

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_kept = tl.zeros([BLOCK_M], dtype=tl.float32)
    kept = tl.zeros([BLOCK_M], dtype=tl.int32)
    v_sum = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    skipped = tl.full([], 0, tl.int32)
    walked = tl.full([], 0, tl.int32)
    VMC_IN_LOOP: tl.constexpr = VMC and MASK_MODE == MASK_FULL
    COUNT_KEPT: tl.constexpr = RETURN_STATS or (HAS_THETA and not POST and SDC == SDC_THRESHOLD)
    acc, l_all, l_kept, m2, kept, v_sum, skipped, walked = _pv_loop(
        acc, l_all, l_kept, m2, kept, v_sum, skipped, walked,
        q, k_base, v_base, mask_base, offs_m, offs_d, row_lim, thr, lo, mid, hi, lq, lk, head_dim, sm_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        EVEN_D, CAUSAL, MASK_MODE, False, not POST, POST, VMC_IN_LOOP, COUNT_KEPT, DOT_PRECISION, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    acc, l_all, l_kept, m2, kept, v_sum, skipped, walked = _pv_loop(
        acc, l_all, l_kept, m2, kept, v_sum, skipped, walked,
        q, k_base, v_base, mask_base, offs_m, offs_d, row_lim, thr, mid, hi, hi, lq, lk, head_dim, sm_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        EVEN_D, CAUSAL, MASK_MODE, True, not POST, POST, VMC_IN_LOOP, COUNT_KEPT, DOT_PRECISION, BLOCK_M, BLOCK_N,
    )  # fmt: skip

    # Epilogue: the denominator of the chosen compensation, guarded so that empty or fully pruned rows give 0.
    denom = l_all
    if HAS_THETA and not POST:
        if SDC == SDC_NONE:
            denom = l_kept
        elif SDC == SDC_THRESHOLD:
            dropped = (n - kept).to(tl.float32)
            # exp(θ - m) per dropped key, only when something was dropped (θ may be +inf where nothing is kept).
            m_safe = tl.where(m2 == float("-inf"), 0.0, m2)
            excess = tl.where(dropped > 0, theta * LOG2E - m_safe, float("-inf"))
            denom = l_kept + dropped * tl.math.exp2(excess)
        elif SDC == SDC_CALIBRATED:
            c = tl.load(SdcTable + off_h * sdc_len + tl.minimum(tl.maximum(n, 1), sdc_len) - 1)
            denom = l_kept + c
        # Rows with n_i <= k_dense are never pruned and keep the dense softmax in every mode.
        denom = tl.where(prunable, denom, l_all)
    denom = tl.where(denom > 0, denom, 1.0)
    out = acc / denom[:, None]  # [BLOCK_M, HEAD_DIM]
    if VMC:
        if not VMC_IN_LOOP:
            p_ptrs = (
                VPrefix + off_b.to(tl.int64) * stride_pb + off_kvh.to(tl.int64) * stride_ph
                + key_end[:, None].to(tl.int64) * stride_pn + offs_d[None, :]
            )  # fmt: skip
            v_sum = tl.load(p_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        v_mean = v_sum / tl.maximum(n, 1).to(tl.float32)[:, None]
        out += (1.0 - l_kept / denom)[:, None] * v_mean

    o_ptrs = (
        Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
        + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    )  # fmt: skip
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if RETURN_STATS:
        row_index = pid_bh.to(tl.int64) * lq + offs_m
        tl.store(Kept + row_index, kept, mask=row_ok)
        tl.store(Visible + row_index, n, mask=row_ok)
    tl.atomic_add(TileStats, skipped)
    tl.atomic_add(TileStats + 1, walked)


def _shared_memory_bytes(block_m: int, block_n: int, num_stages: int, head_dim: int, elt: int) -> int:
    """A deliberately generous estimate of one program's shared memory: K and V tiles for every pipeline stage plus
    one, and P on its way to the dot (float32 dots use more staging than 16-bit ones, hence the slack)."""
    return elt * (head_dim * block_n * (2 * max(1, num_stages) + 1) + block_m * block_n)


def _device_shared_memory(device: torch.device) -> int:
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - any failure to query falls back to a size every supported GPU has
        return 99 * 1024


def config_fits(block: tuple[int, int, int, int], head_dim: int, elt: int, shared_memory: int) -> bool:
    """Whether a ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` tile config fits ``shared_memory`` bytes for a padded
    ``head_dim`` and an element size ``elt``. float32 inputs take tiles of at most 64 query rows: their full-precision
    dots run on FMA units, where taller tiles only spill registers (and take minutes to compile)."""
    block_m, block_n, _, num_stages = block
    if elt >= 4 and block_m > 64:
        return False
    return _shared_memory_bytes(block_m, block_n, num_stages, head_dim, elt) <= shared_memory


def tile_configs() -> tuple[tuple[int, int, int, int], ...]:
    """The ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` configs autotuning chooses from in this process."""
    if config.INTERPRET:
        return (config.PREFILL_INTERPRET_CONFIG,)
    if not config.AUTOTUNE:
        return config.PREFILL_CONFIGS[:1]
    return tuple(config.PREFILL_CONFIGS)


def _prune_configs(configs, named_args, **kwargs):
    q = named_args["Q"]
    shared = _device_shared_memory(q.device) if q.is_cuda else 1 << 30
    fitting = [
        c
        for c in configs
        if config_fits(
            (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages),
            kwargs["HEAD_DIM"],
            q.element_size(),
            shared,
        )
    ]
    if fitting:
        return fitting
    return [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * max(1, c.num_stages))]


_autotuned_kernel = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in tile_configs()
    ],
    key=["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "CAUSAL", "MASK_MODE", "POST", "VMC"],
    prune_configs_by={"early_config_prune": _prune_configs},
    reset_to_zero=["TileStats"],
)(_top_theta_prefill_kernel)


def _length_bucket(length: int) -> int:
    return triton.next_power_of_2(max(int(length), 16))


def _check_inputs(query, key, value, theta, sdc_table, attn_mask, k_dense, scale, q_offset, placement, sdc, out):
    check_attention_inputs(
        "prefill", query, key, value, theta, sdc_table, attn_mask,
        k_dense=k_dense, scale=scale, q_offset=q_offset, placement=placement, sdc=sdc, out=out,
    )  # fmt: skip
    b, hq = query.shape[:2]
    if b * hq > _MAX_GRID_Y:
        raise ValueError(f"query has B * Hq = {b * hq} (batch x heads) > {_MAX_GRID_Y}; split the batch")


def top_theta_prefill(
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
    block_config: tuple[int, int, int, int] | None = None,
):
    """Top-θ attention with the tiled prefill kernel, for any number of query rows ``Lq >= 1``.

    Arguments are those of an :class:`~sparse_attention.validation.AttentionCall` (normalised by ``prepare_call``):

    Args:
        query: ``[B, Hq, Lq, D]``; key, value: ``[B, Hkv, Lk, D]``; float16, bfloat16 or float32, any strides, on a
            CUDA device (or the CPU under ``TRITON_INTERPRET=1``). ``16 <= D <= 256``.
        theta: ``None`` (dense) or float32 ``[Hq, T]``: row i of head h uses ``theta[h, min(n_i, T) - 1]``.
        sdc_table: float32 ``[Hq, T']`` with ``sdc="calibrated"`` (and a theta), else ``None``.
        attn_mask: ``None`` or a boolean mask broadcastable to ``[B, Hq, Lq, Lk]`` (True = attend); broadcast views
            are read through their strides, never materialised.
        k_dense: rows with ``n_i <= k_dense`` are never pruned. scale: score scale. causal, q_offset: row i sees key
            j only when ``j <= q_offset + i``. placement: ``"pre"`` or ``"post"``. sdc: ``"exact"``, ``"none"``,
            ``"threshold"`` or ``"calibrated"``. vmc: V-mean compensation.
        return_stats: also return the kept and visible counts per row.
        out: optional ``[B, Hq, Lq, D]`` buffer in the query dtype to write into (any strides).
        block_config: run this ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` instead of autotuning (for tests).

    Returns:
        ``(out, kept, visible, skipped_tiles, total_tiles)``: ``out [B, Hq, Lq, D]`` in the query dtype; ``kept`` and
        ``visible`` int32 ``[B, Hq, Lq]`` (``None`` unless ``return_stats``); ``skipped_tiles`` and ``total_tiles``
        0-d int32 tensors: K/V tiles walked whose keep mask was all False (V load and P·V skipped), and K/V tiles
        walked (``BLOCK_M x BLOCK_N`` tiles not skipped by causality or padding).

    Raises:
        TypeError: a non-tensor, a dtype other than float16/bfloat16/float32, mismatched dtypes, a non-bool mask,
            a malformed threshold table.
        ValueError: a head dim outside 16..256, tensors on different devices, CPU tensors without the interpreter,
            bad shapes, an unknown ``placement`` or ``sdc``, a missing or unexpected ``sdc_table``, a mask that does
            not broadcast, a bad ``out`` buffer, ``B * Hq > 65535``.
    """
    _check_inputs(query, key, value, theta, sdc_table, attn_mask, k_dense, scale, q_offset, placement, sdc, out)
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    device = query.device
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    kept = visible = None
    if return_stats:
        kept = torch.empty(b, hq, lq, dtype=torch.int32, device=device)
        visible = torch.empty(b, hq, lq, dtype=torch.int32, device=device)
    tile_stats = torch.zeros(2, dtype=torch.int32, device=device)
    if b * hq * lq == 0:
        return out, kept, visible, tile_stats[0], tile_stats[1]

    scratch_f32 = torch.zeros(1, dtype=torch.float32, device=device)
    scratch_i32 = torch.zeros(2, dtype=torch.int32, device=device)
    mask_mode = MASK_NONE.value
    mask_arg, mask_strides = scratch_i32.view(torch.uint8), (0, 0, 0, 0)
    key_count, key_range = scratch_i32, scratch_i32
    key_mask = None
    if attn_mask is not None:
        full = attn_mask.expand(b, hq, lq, lk)
        mask_arg = full.view(torch.uint8)
        mask_strides = tuple(0 if full.shape[i] == 1 else full.stride(i) for i in range(4))
        if mask_strides[1] == 0 and mask_strides[2] == 0:
            # A padding mask: per batch, prefix counts give n_i and the first/last attended keys bound the walk.
            mask_mode = MASK_KEYS.value
            key_mask = full[:, 0, 0, :]  # [B, Lk]
            key_count = torch.zeros(b, lk + 1, dtype=torch.int32, device=device)
            key_count[:, 1:] = key_mask.cumsum(-1)
            attended = key_mask.any(-1)
            first = key_mask.to(torch.uint8).argmax(-1)
            last = lk - key_mask.flip(-1).to(torch.uint8).argmax(-1)
            key_range = torch.stack([first, last], -1).masked_fill(~attended[:, None], 0).to(torch.int32).contiguous()
        else:
            mask_mode = MASK_FULL.value

    v_prefix, prefix_strides = scratch_f32, (0, 0, 0)
    if vmc and mask_mode != MASK_FULL.value:
        v32 = value.float()
        if key_mask is not None:
            v32 = v32 * key_mask[:, None, :, None]
        v_prefix = torch.zeros(b, hkv, lk + 1, d, dtype=torch.float32, device=device)
        torch.cumsum(v32, dim=2, out=v_prefix[:, :, 1:])
        prefix_strides = v_prefix.stride()[:3]

    has_theta = theta is not None
    theta_arg = theta if has_theta else scratch_f32
    table_arg = sdc_table if (has_theta and sdc == "calibrated") else scratch_f32
    head_dim = triton.next_power_of_2(d)
    args = (
        query, key, value, out, theta_arg, table_arg, mask_arg, key_count, key_range, v_prefix,
        kept if return_stats else scratch_i32, visible if return_stats else scratch_i32, tile_stats,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(), *mask_strides, *prefix_strides,
        float(scale), hq, hq // hkv, lq, lk, q_offset, k_dense, theta_arg.shape[-1], table_arg.shape[-1], d,
        _length_bucket(lq), _length_bucket(lk),
    )  # fmt: skip
    flags = dict(
        HEAD_DIM=head_dim, EVEN_D=head_dim == d, CAUSAL=bool(causal), MASK_MODE=mask_mode, HAS_THETA=has_theta,
        POST=placement == "post", SDC=SDC_CODES[sdc], VMC=bool(vmc), RETURN_STATS=bool(return_stats),
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    if block_config is None:
        grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), b * hq)
        _autotuned_kernel[grid](*args, **flags)
    else:
        block_m, block_n, num_warps, num_stages = block_config
        grid = (triton.cdiv(lq, block_m), b * hq)
        _top_theta_prefill_kernel[grid](
            *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages
        )
    return out, kept, visible, tile_stats[0], tile_stats[1]
