"""Reference Top-θ attention in plain PyTorch, float32 inside: the executable form of the semantics in DESIGN.md.

Tests compare every kernel against it, and it is the backend used on CPU. Query rows are processed in chunks so that
memory stays bounded (:func:`score_chunks`, the one chunked score loop, which calibration also walks); inside a chunk
everything is vectorised, with no Python loop over rows. Never imports the kernels.

One function computes every variant, :func:`attend`: Top-θ (a threshold decides what is kept) and exact top-k (the
quality baseline, and what calibration applies) differ only in how the kept set is chosen and which denominator
they use.

NaN: a NaN in a query row or in a key row it sees makes that row NaN; a NaN value row makes every row that keeps it
NaN (rows that see it without keeping it may be NaN too: the P·V product here is dense).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .contract import PLACEMENTS, AttentionCall, AttentionStats, check_choice, check_int, prepare_call

# Score elements materialised per chunk of query rows (float32): 2**24 elements = 64 MiB per temporary.
CHUNK_ELEMENTS = 1 << 24


@dataclass
class ScoreChunk:
    """Query rows ``start:stop`` of a call: float32 scores (soft-capped when the call says so) ``[B, Hq, M, Lk]``,
    their visibility (a broadcast view) and the visible count ``n [B, Hq, M]``."""

    start: int
    stop: int
    scores: torch.Tensor
    visible: torch.Tensor
    n: torch.Tensor


def row_chunks(b: int, hq: int, lq: int, lk: int) -> Iterator[tuple[int, int]]:
    """Query-row ranges whose ``[B, Hq, rows, Lk]`` float32 temporaries stay within :data:`CHUNK_ELEMENTS`."""
    rows = max(1, CHUNK_ELEMENTS // max(1, b * hq * lk))
    for start in range(0, lq, rows):
        yield start, min(lq, start + rows)


def grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale · q kᵀ`` in ``dtype`` for ``q [B, Hq, M, D]`` and GQA keys ``k [B, Hkv, N, D]`` → ``[B, Hq, M, N]``."""
    b, hq, m, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    qg = q.to(dtype).reshape(b, hkv, hq // hkv, m, d)
    s = torch.matmul(qg, k.to(dtype)[:, :, None].transpose(-1, -2))
    return (s * scale).reshape(b, hq, m, n)


def grouped_pv(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``p v`` for ``p [B, Hq, M, N]`` and GQA values ``v [B, Hkv, N, Dv]`` → ``[B, Hq, M, Dv]`` in p's dtype."""
    b, hq, m, n = p.shape
    hkv = v.shape[1]
    out = torch.matmul(p.reshape(b, hkv, hq // hkv, m, n), v.to(p.dtype)[:, :, None])
    return out.reshape(b, hq, m, v.shape[-1])


def soft_cap(s: torch.Tensor, softcap: float) -> torch.Tensor:
    """``softcap · tanh(s / softcap)``; the identity for ``softcap == 0``."""
    return s if not softcap else softcap * torch.tanh(s / softcap)


def score_chunks(call: AttentionCall, dtype: torch.dtype = torch.float32) -> Iterator[ScoreChunk]:
    """The scores of a call, chunk by chunk of query rows: the one chunked score loop (attention, top-k, calibration
    and the regularizer's reference all walk it)."""
    q, k = call.query, call.key
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    for start, stop in row_chunks(b, hq, lq, lk):
        s = soft_cap(grouped_scores(q[:, :, start:stop], k, call.scale, dtype), call.softcap)
        vis = call.visibility(start, stop).expand(b, hq, stop - start, lk)
        yield ScoreChunk(start, stop, s, vis, vis.sum(-1))


def lookup(table: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Per-row table lookup ``table[h, min(n, T) - 1]`` for ``table [Hq, T]`` and counts ``n [B, Hq, M]``."""
    idx = (n.clamp(1, table.shape[1]) - 1).long()
    heads = torch.arange(table.shape[0], device=n.device)[None, :, None]
    return table[heads, idx]


@dataclass
class RowState:
    """What :func:`attend` computed for a chunk of rows, handed to its ``observe`` callback (calibration records
    from it). ``m`` is the row max including the sink (0 where the row sees nothing), ``e = exp(s - m)`` is 0 where
    not visible, ``e_sink`` is ``exp(sink - m)`` (0 without sinks), ``d_all`` includes it."""

    chunk: ScoreChunk
    m: torch.Tensor
    e: torch.Tensor
    e_sink: torch.Tensor
    d_all: torch.Tensor


# A keep rule maps a chunk's state to (kept [B, Hq, M, Lk], pruned rows [B, Hq, M], per-row threshold or None).
KeepRule = Callable[[AttentionCall, RowState], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def threshold_rule(call: AttentionCall, st: RowState):
    """Top-θ: keep a visible score above its row's threshold (placement "post": a probability above it, compared in
    log space so that θ <= 0 keeps every visible key); rows with ``n <= k_dense`` are never pruned; ``cap`` keeps the
    most recent of the kept keys."""
    s, vis, n = st.chunk.scores, st.chunk.visible, st.chunk.n
    if call.theta is None:
        return vis, torch.zeros_like(n, dtype=torch.bool), None
    th = lookup(call.theta, n)
    prunable = n > call.k_dense
    if call.placement == "pre":
        above = s > th[..., None]
    else:
        log_p = s - st.m[..., None] - torch.log(st.d_all.clamp_min(torch.finfo(torch.float32).tiny))[..., None]
        above = (log_p > torch.log(th.clamp_min(0.0))[..., None]) | (th <= 0)[..., None]
    keep = vis & (above | ~prunable[..., None])
    if call.cap:
        # Keep the cap right-most kept keys: count the kept keys at or after each position.
        from_right = keep.flip(-1).cumsum(-1, dtype=torch.int32).flip(-1)
        keep = keep & ((from_right <= call.cap) | ~prunable[..., None])
    return keep, prunable, th


def topk_rule(k: int) -> KeepRule:
    """Exact top-k: each row keeps its ``k`` largest visible scores (all of them when it has at most ``k``); ties at the
    k-th score are broken by key position, so exactly ``min(k, n_i)`` keys are kept."""

    def rule(call: AttentionCall, st: RowState):
        keep = topk_mask(st.chunk.scores, st.chunk.visible, k)
        return keep, st.chunk.n > k, None

    return rule


def attend(
    call: AttentionCall,
    rule: KeepRule = threshold_rule,
    *,
    sdc: str | None = None,
    observe: Callable[[RowState, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, AttentionStats | None]:
    """Attention of a prepared call with the kept set chosen by ``rule`` and the denominator of ``sdc`` (default the
    call's; placement "post" and unpruned rows always use ``D_all``). ``observe(state, keep)`` sees every chunk.
    Returns ``(out [B, Hq, Lq, Dv] in the query dtype, stats or None)``."""
    q, v = call.query, call.value
    b, hq, lq, _ = q.shape
    hkv, lk, dv = v.shape[1], v.shape[2], v.shape[3]
    sdc = call.sdc if sdc is None else sdc
    device = q.device
    out = torch.zeros(b, hq, lq, dv, dtype=torch.float32, device=device)
    kept_count = torch.zeros(b, hq, lq, dtype=torch.int32, device=device)
    vis_count = torch.zeros(b, hq, lq, dtype=torch.int32, device=device)
    kept_v = torch.zeros(b, hkv, lk, dtype=torch.bool, device=device) if lq == 1 else None
    sink = None if call.sinks is None else call.sinks[None, :, None]
    for chunk in score_chunks(call) if lk else ():
        s, vis, n = chunk.scores, chunk.visible, chunk.n
        m = s.masked_fill(~vis, float("-inf")).amax(-1)  # NaN-propagating
        if sink is not None:
            m = torch.maximum(m, sink)
        m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
        e = torch.exp(s - m[..., None]).masked_fill(~vis, 0.0)
        e_sink = torch.zeros_like(m) if sink is None else torch.exp(sink - m)
        d_all = e.sum(-1) + e_sink
        state = RowState(chunk, m, e, e_sink, d_all)
        keep, prunable, th = rule(call, state)
        e_kept = e.masked_fill(~keep, 0.0)
        d_kept = e_kept.sum(-1) + e_sink
        kept_n = keep.sum(-1)
        if call.placement == "post" or sdc == "exact":
            miss = d_all - d_kept
        elif sdc == "none" or th is None:  # no threshold: no row is pruned, the denominator is D_all below
            miss = torch.zeros_like(d_kept)
        elif sdc == "threshold":
            dropped = (n - kept_n).float()
            # exactly 0 when nothing is dropped, so that θ = +inf never gives inf · 0
            miss = torch.where(dropped > 0, dropped * torch.exp(th - m), torch.zeros_like(d_kept))
        else:
            miss = lookup(call.sdc_table, n)
        scale = 1.0 if call.placement == "post" else call.sdc_scale
        # sdc_scale = 0 is no compensation, also where the term is infinite (θ = +inf with dropped keys): 0 · ∞ = 0.
        comp = scale * miss if scale else torch.zeros_like(miss)
        denom = torch.where(prunable, d_kept + comp, d_all)
        if call.placement == "post":
            denom = d_all
        # Only empty rows have a zero denominator; NaN stays NaN and an infinite one gives zero weights. A row whose
        # max is NaN (it sees a NaN score) is NaN even when it keeps nothing and its denominator ignores the NaN.
        denom = torch.where(denom == 0, torch.ones_like(denom), denom)
        denom = torch.where(torch.isnan(m), m, denom)
        p = e_kept / denom[..., None]
        o = grouped_pv(p, v)
        if call.vmc:
            v_mean = grouped_pv(vis.float(), v) / n.clamp_min(1)[..., None].float()
            o = o + (1.0 - e_sink / denom - p.sum(-1))[..., None] * v_mean
        out[:, :, chunk.start : chunk.stop] = o
        kept_count[:, :, chunk.start : chunk.stop] = kept_n.to(torch.int32)
        vis_count[:, :, chunk.start : chunk.stop] = n.to(torch.int32)
        if kept_v is not None:
            kept_v |= keep.reshape(b, hkv, hq // hkv, chunk.stop - chunk.start, lk).any(2).any(2)
        if observe is not None:
            observe(state, keep)
    out = out.to(q.dtype)
    if not call.return_stats:
        return out, None
    return out, AttentionStats(
        kept=kept_count, visible=vis_count, kept_v_rows=None if kept_v is None else kept_v.sum(-1).to(torch.int32)
    )


def attention(call: AttentionCall) -> tuple[torch.Tensor, AttentionStats | None]:
    """Top-θ attention of a prepared call (the reference backend)."""
    return attend(call)


def top_theta_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    theta=None,
    *,
    k_dense: int = 0,
    scale: float | None = None,
    softcap: float | None = None,
    causal: bool = True,
    q_offset: int | None = None,
    attn_mask: torch.Tensor | None = None,
    sinks=None,
    placement: str = "pre",
    sdc: str = "exact",
    sdc_table=None,
    sdc_scale: float = 1.0,
    cap: int | None = None,
    vmc: bool = False,
    return_stats: bool = False,
):
    """Top-θ attention computed in float32 PyTorch; same signature and semantics as
    :func:`sparse_attention.top_theta_attention` without ``backend``."""
    call = prepare_call(
        query, key, value, theta, k_dense=k_dense, scale=scale, softcap=softcap, causal=causal, q_offset=q_offset,
        attn_mask=attn_mask, sinks=sinks, placement=placement, sdc=sdc, sdc_table=sdc_table, sdc_scale=sdc_scale,
        cap=cap, vmc=vmc, return_stats=return_stats,
    )  # fmt: skip
    out, stats = attention(call)
    return (out, stats) if return_stats else out


def topk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k: int,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    causal: bool = True,
    q_offset: int | None = None,
    attn_mask: torch.Tensor | None = None,
    sinks=None,
    placement: str = "pre",
    vmc: bool = False,
    return_stats: bool = False,
):
    """Exact top-k attention, the reference baseline: each row keeps its ``k`` largest visible scores (all of them
    when it has at most ``k``; ties broken by key position, so exactly ``min(k, n_i)`` are kept). With placement
    ``"pre"`` (default) the softmax is renormalised over the kept keys (and the sink); with ``"post"`` the other
    probabilities are set to zero and not renormalised, plus the V-mean term when ``vmc`` is on — each as the
    inference of that placement does.

    Shapes as :func:`top_theta_attention`. Raises ``ValueError`` for ``k < 1`` and as ``prepare_call``.
    """
    check_int("k", k)
    check_choice("placement", placement, PLACEMENTS)
    call = prepare_call(
        query, key, value, None, scale=scale, softcap=softcap, causal=causal, q_offset=q_offset, attn_mask=attn_mask,
        sinks=sinks, placement=placement, vmc=vmc, return_stats=return_stats,
    )  # fmt: skip
    out, stats = topk(call, k)
    return (out, stats) if return_stats else out


def topk(call: AttentionCall, k: int, observe=None) -> tuple[torch.Tensor, AttentionStats | None]:
    """Exact top-k attention of a prepared call, normalised as its placement's inference (see
    :func:`topk_attention`)."""
    return attend(call, topk_rule(k), sdc="none" if call.placement == "pre" else "exact", observe=observe)


def topk_mask(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest visible scores per row (all visible ones when fewer), ``[..., N]``."""
    if k >= scores.shape[-1]:
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
