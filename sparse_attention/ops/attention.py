"""The functional API and the one backend picker.

``backend="auto"`` follows one written policy, for attention and the regularizer alike (:func:`pick_backend`):

- tensors on a CUDA device and a call the kernels support → the Triton kernels;
- tensors on a CUDA device and a call they do not support (e.g. a head dim above 256, float64) → the float32
  reference, with a warning once per reason (it gives the same results, far slower);
- any other device → the reference, silently: it is the CPU path. The Triton interpreter
  (``TRITON_INTERPRET=1``) is a testing tool and is used only when asked for, with ``backend="triton"``.

``backend="triton"`` raises ``ValueError`` with the reason when the kernels cannot run the call;
``backend="reference"`` always runs the reference.
"""

from __future__ import annotations

import warnings

import torch

from . import reference
from .contract import BACKENDS, AttentionCall, AttentionStats, check_choice, prepare_call

_warned: set[str] = set()


def unsupported_reason(op: str, query: torch.Tensor, key=None, value=None, *, k: int | None = None) -> str | None:
    """Why the ``op`` kernel (``"prefill"``, ``"decode"``, ``"regularizer"``) cannot run on these tensors (``None``
    when it can): the kernels' own answer."""
    from ..kernels.common import unsupported_reason as kernel_reason

    return kernel_reason(op, query, key, value, k=k)


def pick_backend(backend: str, op: str, query: torch.Tensor, key=None, value=None, *, k: int | None = None) -> str:
    """``"triton"`` or ``"reference"`` for a call, by the policy in the module docstring."""
    check_choice("backend", backend, BACKENDS)
    if backend == "reference":
        return "reference"
    if backend == "auto" and query.device.type != "cuda":
        return "reference"
    reason = unsupported_reason(op, query, key, value, k=k)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run this call: {reason}")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"sparse_attention uses its PyTorch reference (slow) on this call: {reason}", stacklevel=3)
    return "reference"


def attention_op(call: AttentionCall) -> str:
    """``"decode"`` for calls with few query rows (split-K over the keys), else ``"prefill"``."""
    from ..kernels import config

    return "decode" if call.query.shape[2] <= config.DECODE_MAX_Q else "prefill"


def _kernel_arguments(call: AttentionCall) -> dict:
    return dict(
        theta=call.theta, sdc_table=call.sdc_table, sinks=call.sinks, attn_mask=call.attn_mask,
        key_padding=None if call.key_padding is None else call.key_padding.as_tuple(), k_dense=call.k_dense,
        sm_scale=call.scale, softcap=call.softcap, causal=call.causal, q_offset=call.q_offset,
        placement=call.placement, sdc=call.sdc, sdc_scale=call.sdc_scale, cap=call.cap, vmc=call.vmc,
        return_stats=call.return_stats,
    )  # fmt: skip


def triton_attention(call: AttentionCall, op: str) -> tuple[torch.Tensor, AttentionStats | None]:
    """Run a prepared call on the ``op`` kernel; statistics stay on the device (no synchronisation)."""
    if op == "decode":
        from ..kernels.decode import top_theta_decode

        res = top_theta_decode(call.query, call.key, call.value, **_kernel_arguments(call))
        stats = None
        if call.return_stats:
            kept_v = res.kept_v_rows if call.query.shape[2] == 1 else None
            stats = AttentionStats(kept=res.kept, visible=res.visible, kept_v_rows=kept_v)
        return res.out, stats
    from ..kernels.prefill import top_theta_prefill

    res = top_theta_prefill(call.query, call.key, call.value, **_kernel_arguments(call))
    stats = None
    if call.return_stats:
        stats = AttentionStats(
            kept=res.kept, visible=res.visible, skipped_tiles=res.skipped_tiles, total_tiles=res.total_tiles
        )
    return res.out, stats


def run(call: AttentionCall, backend: str = "auto") -> tuple[torch.Tensor, AttentionStats | None]:
    """Run a prepared call on ``backend`` ("auto" | "reference" | "triton")."""
    op = attention_op(call)
    if pick_backend(backend, op, call.query, call.key, call.value) == "triton":
        return triton_attention(call, op)
    return reference.attention(call)


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
    backend: str = "auto",
    return_stats: bool = False,
):
    """Top-θ attention: each score that does not beat its row's calibrated threshold is pruned.

    Args:
        query: ``[B, Hq, Lq, D]``.
        key: ``[B, Hkv, Lk, D]``; value: ``[B, Hkv, Lk, Dv]`` (Dv may differ from D); ``Hq`` a multiple of ``Hkv``
            (query head h reads kv head ``h // G``).
        theta: threshold table, float ``[Hq, T]``; a scalar or ``[Hq]`` broadcasts. Row i of head h uses
            ``theta[h, min(n_i, T) - 1]`` where ``n_i`` counts its visible keys. ``-inf`` keeps every key, ``+inf``
            none. ``None`` (default) is dense.
        k_dense: rows with ``n_i <= k_dense`` are never pruned (default 0).
        scale: score scale, a positive float, default ``D ** -0.5``.
        softcap: with ``c > 0``, scores become ``c · tanh(s / c)`` before anything else (Gemma-2).
        causal: row i sees key j only when ``j <= q_offset + i`` (default True).
        q_offset: position of query row 0 among the keys, default ``Lk - Lq`` (bottom-right alignment).
        attn_mask: boolean mask, True = attend, broadcastable to ``[B, Hq, Lq, Lk]``.
        sinks: float ``[Hq]``: a per-head virtual key with this score and a zero value row (gpt-oss ``s_aux``); it
            is never pruned and joins the row max and every denominator.
        placement: ``"pre"`` keeps ``s > θ``; ``"post"`` keeps ``p > θ`` with p the full softmax.
        sdc: softmax denominator compensation, ``"exact"`` (default), ``"none"``, ``"threshold"`` or
            ``"calibrated"`` (needs ``sdc_table``, shaped like ``theta``, >= 0).
        sdc_scale: multiplies the compensation term of placement "pre" (default 1).
        cap: keep at most this many of the keys a row keeps by its threshold, the most recent ones (default: no cap).
        vmc: add ``(1 - kept mass) · mean of the visible V rows`` (default False).
        backend: ``"auto"`` (see the module docstring), ``"reference"`` or ``"triton"``.
        return_stats: also return :class:`~sparse_attention.AttentionStats` (device tensors).

    Returns:
        ``[B, Hq, Lq, Dv]`` in the query dtype, or ``(out, stats)``. Rows with nothing visible are zeros; rows with
        nothing kept are zeros plus the V-mean term when ``vmc`` is on. NaN only where a NaN input reaches a row.

    Raises:
        TypeError / ValueError naming the argument for bad input (see ``prepare_call``), and ``ValueError`` when
        ``backend="triton"`` cannot run the call (CPU tensors without the interpreter, float64, bfloat16 under the
        interpreter, head dims out of range).
    """
    call = prepare_call(
        query, key, value, theta, k_dense=k_dense, scale=scale, softcap=softcap, causal=causal, q_offset=q_offset,
        attn_mask=attn_mask, sinks=sinks, placement=placement, sdc=sdc, sdc_table=sdc_table, sdc_scale=sdc_scale,
        cap=cap, vmc=vmc, return_stats=return_stats,
    )  # fmt: skip
    out, stats = run(call, backend)
    return (out, stats) if return_stats else out
