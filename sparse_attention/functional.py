"""The functional API: checks inputs once, picks a backend, returns outputs and statistics."""

from __future__ import annotations

import os

import torch

from . import reference
from .validation import BACKENDS, AttentionCall, AttentionStats, check_choice, prepare_call


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unsupported_reason(call: AttentionCall) -> str | None:
    """Why the Triton kernels cannot run ``call`` (``None`` when they can)."""
    from .kernels import config
    from .kernels.common import KERNEL_DTYPES

    q = call.query
    if q.device.type != "cuda" and not _interpreting():
        return (
            f"tensors are on {q.device}; the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
            "sparse_attention is imported to run them on CPU"
        )
    if q.dtype not in KERNEL_DTYPES:
        return f"query dtype {q.dtype} is not supported by the Triton kernels (use float16, bfloat16 or float32)"
    if not config.MIN_HEAD_DIM <= q.shape[-1] <= config.MAX_HEAD_DIM:
        return (
            f"head dim {q.shape[-1]} is outside the Triton kernels' range {config.MIN_HEAD_DIM}..{config.MAX_HEAD_DIM}"
        )
    return None


def _triton_forward(call: AttentionCall) -> tuple[torch.Tensor, AttentionStats | None]:
    from .kernels import config

    args = (call.query, call.key, call.value, call.theta, call.sdc_table, call.attn_mask)
    kwargs = dict(
        k_dense=call.k_dense, scale=call.scale, causal=call.causal, q_offset=call.q_offset,
        placement=call.placement, sdc=call.sdc, vmc=call.vmc, return_stats=call.return_stats,
    )  # fmt: skip
    if call.query.shape[2] <= config.DECODE_MAX_Q:
        from .kernels.decode import top_theta_decode

        out, kept, visible, kept_v_rows = top_theta_decode(*args, **kwargs)
        stats = None
        if call.return_stats:
            stats = AttentionStats(
                kept=kept, visible=visible, kept_v_rows=kept_v_rows if call.query.shape[2] == 1 else None
            )
        return out, stats
    from .kernels.prefill import top_theta_prefill

    out, kept, visible, skipped, total = top_theta_prefill(*args, **kwargs)
    stats = None
    if call.return_stats:
        stats = AttentionStats(kept=kept, visible=visible, skipped_tiles=int(skipped), total_tiles=int(total))
    return out, stats


def dispatch(call: AttentionCall, backend: str) -> tuple[torch.Tensor, AttentionStats | None]:
    """Run a prepared call on ``backend`` ("auto" | "reference" | "triton")."""
    check_choice("backend", backend, BACKENDS)
    if backend == "reference":
        return reference._forward(call)
    reason = triton_unsupported_reason(call)
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run this call: {reason}")
        return _triton_forward(call)
    # "auto" runs the kernels on CUDA tensors only: on CPU the interpreter is a testing tool, far slower than PyTorch.
    if reason is None and call.query.is_cuda:
        return _triton_forward(call)
    return reference._forward(call)


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
    backend: str = "auto",
    return_stats: bool = False,
):
    """Top-θ attention: each score that does not beat its row's calibrated threshold is pruned.

    Args:
        query: ``[B, Hq, Lq, D]``.
        key, value: ``[B, Hkv, Lk, D]`` with ``Hq`` a multiple of ``Hkv`` (query head h reads kv head ``h // G``).
        theta: threshold table, float ``[Hq, T]``; a scalar or ``[Hq]`` broadcasts. Row i of head h uses
            ``theta[h, min(n_i, T) - 1]`` where ``n_i`` counts its visible keys. ``None`` (default) is dense.
        k_dense: rows with ``n_i <= k_dense`` are never pruned (default 0).
        scale: score scale, default ``D ** -0.5``.
        causal: row i sees key j only when ``j <= q_offset + i`` (default True).
        q_offset: position of query row 0 among the keys, default ``Lk - Lq`` (bottom-right alignment).
        attn_mask: boolean mask, True = attend, broadcastable to ``[B, Hq, Lq, Lk]``.
        placement: ``"pre"`` keeps ``s > θ``; ``"post"`` keeps ``p > θ`` with p the full softmax.
        sdc: softmax denominator compensation, ``"exact"`` (default), ``"none"``, ``"threshold"`` or
            ``"calibrated"`` (needs ``sdc_table``, shaped like ``theta``).
        vmc: add ``(1 - kept mass) · mean of the visible V rows`` (default False).
        backend: ``"auto"`` (Triton for CUDA tensors when the kernels support the call, else the reference),
            ``"reference"`` or ``"triton"``.
        return_stats: also return :class:`~sparse_attention.validation.AttentionStats`.

    Returns:
        ``[B, Hq, Lq, D]`` in the query dtype, or ``(out, stats)``. Rows with nothing visible are zeros; rows with
        nothing kept are zeros plus the V-mean term when ``vmc`` is on. Never NaN for finite inputs.

    Raises:
        TypeError / ValueError naming the argument for bad input (see ``prepare_call``), and ``ValueError`` when
        ``backend="triton"`` cannot run the call (CPU tensors without the interpreter, float64, head dim > 256).
    """
    call = prepare_call(
        query, key, value, theta, k_dense=k_dense, scale=scale, causal=causal, q_offset=q_offset,
        attn_mask=attn_mask, placement=placement, sdc=sdc, sdc_table=sdc_table, vmc=vmc, return_stats=return_stats,
    )  # fmt: skip
    out, stats = dispatch(call, backend)
    return (out, stats) if return_stats else out
