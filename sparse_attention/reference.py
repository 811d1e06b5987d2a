"""Reference Top-θ attention in plain PyTorch, float32 inside.

The executable form of the semantics in DESIGN.md: tests compare every kernel against it, and it is the backend
used on CPU. Query rows are processed in chunks so that memory stays bounded (a 1024-token GPT-2 batch runs on a
laptop); inside a chunk everything is vectorised, with no Python loop over rows. Never imports the kernels.
"""

from __future__ import annotations

import torch

from .validation import AttentionCall, AttentionStats, check_int, prepare_call

# Score elements materialised per chunk of query rows (float32): 2**24 elements = 64 MiB per temporary.
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(call_shape: tuple[int, int, int, int], lk: int):
    b, hq, lq, _ = call_shape
    rows = max(1, _CHUNK_ELEMENTS // max(1, b * hq * lk))
    for start in range(0, lq, rows):
        yield start, min(lq, start + rows)


def visibility(start: int, stop: int, lk: int, causal: bool, q_offset: int, attn_mask, device) -> torch.Tensor:
    """Boolean ``[B or 1, H or 1, stop - start, Lk]``: which keys rows ``start:stop`` see (causal AND mask)."""
    vis = torch.ones(1, 1, stop - start, lk, dtype=torch.bool, device=device)
    if causal:
        rows = torch.arange(start, stop, device=device)[:, None] + q_offset
        vis = vis & (torch.arange(lk, device=device)[None, :] <= rows)
    if attn_mask is not None:
        vis = vis & attn_mask[:, :, start:stop]
    return vis


def visible_keys(
    b: int, hq: int, start: int, stop: int, lk: int, causal: bool, q_offset: int, attn_mask, device
) -> torch.Tensor:
    """:func:`visibility` broadcast to ``[B, Hq, stop - start, Lk]`` (a view)."""
    return visibility(start, stop, lk, causal, q_offset, attn_mask, device).expand(b, hq, stop - start, lk)


def grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale · q kᵀ`` in ``dtype`` (default float32) for ``q [B, Hq, M, D]`` and GQA keys ``k [B, Hkv, N, D]``
    → ``[B, Hq, M, N]``."""
    b, hq, m, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    qg = q.to(dtype).reshape(b, hkv, hq // hkv, m, d)
    s = torch.matmul(qg, k.to(dtype)[:, :, None].transpose(-1, -2))
    return (s * scale).reshape(b, hq, m, n)


def grouped_pv(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``p v`` for ``p [B, Hq, M, N]`` and GQA values ``v [B, Hkv, N, D]`` → float32 ``[B, Hq, M, D]``."""
    b, hq, m, n = p.shape
    hkv = v.shape[1]
    out = torch.matmul(p.float().reshape(b, hkv, hq // hkv, m, n), v.float()[:, :, None])
    return out.reshape(b, hq, m, v.shape[-1])


def lookup(table: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Per-row table lookup ``table[h, min(n, T) - 1]`` for ``table [Hq, T]`` and counts ``n [B, Hq, M]``."""
    t = table.shape[1]
    idx = (n.clamp(1, t) - 1).long()
    heads = torch.arange(table.shape[0], device=n.device)[None, :, None]
    return table[heads, idx]


def _forward(call: AttentionCall) -> tuple[torch.Tensor, AttentionStats | None]:
    q, k, v = call.query, call.key, call.value
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.empty(b, hq, lq, d, dtype=torch.float32, device=q.device)
    kept_count = torch.empty(b, hq, lq, dtype=torch.int32, device=q.device)
    vis_count = torch.empty(b, hq, lq, dtype=torch.int32, device=q.device)
    kept_v = torch.zeros(b, hkv, lk, dtype=torch.bool, device=q.device) if lq == 1 else None
    for start, stop in _row_chunks(q.shape, lk):
        s = grouped_scores(q[:, :, start:stop], k, call.scale)  # [B, Hq, M, Lk]
        vis = visible_keys(b, hq, start, stop, lk, call.causal, call.q_offset, call.attn_mask, q.device)
        n = vis.sum(-1)  # [B, Hq, M]
        s_vis = s.masked_fill(~vis, float("-inf"))
        m = s_vis.amax(-1).masked_fill(n == 0, 0.0)
        e = torch.exp(s_vis - m[..., None])  # 0 where not visible
        d_all = e.sum(-1)
        if call.theta is None:
            keep = vis
            prunable = torch.zeros_like(n, dtype=torch.bool)
            th = None
        else:
            th = lookup(call.theta, n)
            prunable = n > call.k_dense
            if call.placement == "pre":
                above = s > th[..., None]
            else:
                above = e / d_all.clamp_min(torch.finfo(torch.float32).tiny)[..., None] > th[..., None]
            keep = vis & (above | ~prunable[..., None])
        e_kept = e.masked_fill(~keep, 0.0)
        d_kept = e_kept.sum(-1)
        kept_n = keep.sum(-1)
        if call.placement == "post" or call.sdc == "exact" or th is None:
            denom = d_all
        elif call.sdc == "none":
            denom = d_kept
        elif call.sdc == "threshold":
            dropped = (n - kept_n).float()
            denom = d_kept + torch.where(dropped > 0, dropped * torch.exp(th - m), torch.zeros_like(d_kept))
        else:
            denom = d_kept + lookup(call.sdc_table, n)
        # Rows that are never pruned (n <= k_dense) keep the dense softmax whatever the compensation mode.
        denom = torch.where(prunable, denom, d_all)
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))
        p = e_kept / denom[..., None]
        o = grouped_pv(p, v)
        if call.vmc:
            v_mean = grouped_pv(vis.float(), v) / n.clamp_min(1)[..., None].float()
            o = o + (1.0 - p.sum(-1))[..., None] * v_mean
        out[:, :, start:stop] = o
        kept_count[:, :, start:stop] = kept_n.to(torch.int32)
        vis_count[:, :, start:stop] = n.to(torch.int32)
        if kept_v is not None:
            kept_v |= keep.reshape(b, hkv, hq // hkv, lk).any(2)
    out = out.to(q.dtype)
    if not call.return_stats:
        return out, None
    stats = AttentionStats(
        kept=kept_count,
        visible=vis_count,
        kept_v_rows=None if kept_v is None else kept_v.sum(-1).to(torch.int32),
    )
    return out, stats


def top_theta_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    theta=None,
    *,
    k_dense: int = 0,
    scale: float | None = None,
    causal: bool = True,
    q_offset: int | None = None,
    attn_mask: torch.Tensor | None = None,
    placement: str = "pre",
    sdc: str = "exact",
    sdc_table=None,
    vmc: bool = False,
    return_stats: bool = False,
):
    """Top-θ attention computed in float32 PyTorch; same signature and semantics as
    :func:`sparse_attention.top_theta_attention` without ``backend``.

    Shapes: query ``[B, Hq, Lq, D]``, key/value ``[B, Hkv, Lk, D]``; returns ``[B, Hq, Lq, D]`` in the query dtype,
    or ``(out, AttentionStats)`` with ``return_stats=True``.
    Raises as :func:`~sparse_attention.validation.prepare_call`.
    """
    call = prepare_call(
        query, key, value, theta, k_dense=k_dense, scale=scale, causal=causal, q_offset=q_offset,
        attn_mask=attn_mask, placement=placement, sdc=sdc, sdc_table=sdc_table, vmc=vmc, return_stats=return_stats,
    )  # fmt: skip
    out, stats = _forward(call)
    return (out, stats) if return_stats else out


def topk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k: int,
    *,
    scale: float | None = None,
    causal: bool = True,
    q_offset: int | None = None,
    attn_mask: torch.Tensor | None = None,
    return_stats: bool = False,
):
    """Exact top-k attention, the reference baseline: each row keeps its ``k`` largest visible scores (all of them
    when it has at most ``k``) and renormalises the softmax over the kept keys. Ties at the k-th score are broken
    by key position, so exactly ``min(k, n_i)`` keys are kept.

    Shapes as :func:`top_theta_attention`. Raises ``ValueError`` for ``k < 1`` and as ``prepare_call``.
    """
    check_int("k", k)
    call = prepare_call(
        query, key, value, None, scale=scale, causal=causal, q_offset=q_offset, attn_mask=attn_mask,
        return_stats=return_stats,
    )  # fmt: skip
    q, v = call.query, call.value
    b, hq, lq, d = q.shape
    hkv, lk = call.key.shape[1], call.key.shape[2]
    out = torch.empty(b, hq, lq, d, dtype=torch.float32, device=q.device)
    kept_count = torch.empty(b, hq, lq, dtype=torch.int32, device=q.device)
    vis_count = torch.empty(b, hq, lq, dtype=torch.int32, device=q.device)
    kept_v = torch.zeros(b, hkv, lk, dtype=torch.bool, device=q.device) if lq == 1 else None
    for start, stop in _row_chunks(q.shape, lk):
        s = grouped_scores(q[:, :, start:stop], call.key, call.scale)
        vis = visible_keys(b, hq, start, stop, lk, call.causal, call.q_offset, call.attn_mask, q.device)
        keep = topk_mask(s, vis, k)
        s_kept = s.masked_fill(~keep, float("-inf"))
        kept_n = keep.sum(-1)
        m = s_kept.amax(-1).masked_fill(kept_n == 0, 0.0)
        e = torch.exp(s_kept - m[..., None])
        denom = e.sum(-1)
        p = e / torch.where(denom > 0, denom, torch.ones_like(denom))[..., None]
        out[:, :, start:stop] = grouped_pv(p, v)
        kept_count[:, :, start:stop] = kept_n.to(torch.int32)
        vis_count[:, :, start:stop] = vis.sum(-1).to(torch.int32)
        if kept_v is not None:
            kept_v |= keep.reshape(b, hkv, hq // hkv, lk).any(2)
    out = out.to(q.dtype)
    if not return_stats:
        return out
    return out, AttentionStats(
        kept=kept_count, visible=vis_count, kept_v_rows=None if kept_v is None else kept_v.sum(-1).to(torch.int32)
    )


def topk_mask(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest visible scores per row (all visible ones when fewer), ``[..., N]``."""
    n = scores.shape[-1]
    if k >= n:
        return visible.clone() if visible.is_contiguous() else visible.contiguous()
    s = scores.masked_fill(~visible, float("-inf"))
    idx = s.topk(k, dim=-1).indices
    keep = torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, idx, True)
    return keep & visible


def kth_largest_visible(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest visible score of each row (``-inf`` where a row has fewer than ``k`` visible keys).

    Shapes: scores and visible ``[..., N]`` → ``[...]``. Calibration records this with ``k + 1``.
    """
    s = scores.masked_fill(~visible, float("-inf"))
    if k > s.shape[-1]:
        return torch.full(s.shape[:-1], float("-inf"), dtype=s.dtype, device=s.device)
    return s.topk(k, dim=-1).values[..., -1]
