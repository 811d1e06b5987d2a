"""What the kernel modules share: supported dtypes, the sdc mode codes and the launchers' input validation.

The prefill and decode launchers take the same arguments (those of an ``AttentionCall`` as normalised by
``sparse_attention.validation.prepare_call``), so one function checks them and names the kernel in its messages;
each launcher adds only the checks of its own options.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import config

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * LOG2E)

# Softmax denominator compensation modes as kernel constants, numbered in the order of validation.SDC_MODES.
SDC_EXACT = tl.constexpr(0)
SDC_NONE = tl.constexpr(1)
SDC_THRESHOLD = tl.constexpr(2)
SDC_CALIBRATED = tl.constexpr(3)
SDC_CODES = {"exact": SDC_EXACT.value, "none": SDC_NONE.value, "threshold": SDC_THRESHOLD.value,
             "calibrated": SDC_CALIBRATED.value}  # fmt: skip


# ---- shared @triton.jit helpers -------------------------------------------------------------------------------


@triton.jit
def safe_shift(m):
    """The shift used to exponentiate a row whose running max is ``m``: 0 where the row has seen no visible score yet
    (``m == -inf``), so that ``exp(s - shift)`` never evaluates ``-inf - (-inf)``. NaN stays NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def soft_cap(s, softcap):
    """``softcap · tanh(s / softcap)``, written with exp2 so that it runs the same compiled and under the interpreter.

    Saturates to ±softcap without overflow (exp2 of a large argument is inf, and ``1 - 2 / (inf + 1) = 1``).
    """
    e = tl.math.exp2(s * (2.0 * LOG2E / softcap))
    return softcap * (1.0 - 2.0 / (e + 1.0))


@triton.jit
def maximum_nan(a, b):
    """Elementwise maximum that propagates NaN (``tl.maximum`` drops it by default); also a ``tl.reduce`` combine.
    Row maxima use it so that a NaN score makes its row NaN (kernel spec, decision 5)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def max_nan(x, axis: tl.constexpr):
    """``tl.max(x, axis)`` that is NaN wherever the reduced slice holds a NaN."""
    return tl.reduce(x, axis, maximum_nan)


# ---- what the kernels cannot run --------------------------------------------------------------------------------


def unsupported_reason(op: str, query, key=None, value=None, *, k: int | None = None) -> str | None:
    """Why the ``op`` kernel (``"prefill"``, ``"decode"`` or ``"regularizer"``) cannot run on these tensors, or
    ``None`` when it can. The one answer to "can the kernels run this?": the ops layer's backend picker and every
    launcher ask it. Only the kernels' own limits are checked here (device, dtype, head dims, k of the regularizer);
    the contract (shapes, options) was validated once, by ``sparse_attention.ops.contract``."""
    reason = unsupported_device(query.device, f"{op} kernel")
    if reason is not None:
        return reason
    if query.dtype not in KERNEL_DTYPES:
        return f"dtype {query.dtype} is not supported by the {op} kernel (use float16, bfloat16 or float32)"
    if config.INTERPRET and query.dtype == torch.bfloat16 :
        return (
            "bfloat16 does not run under TRITON_INTERPRET=1 (the interpreter's bfloat16 tl.dot is wrong); "
            "use float16 or float32 on CPU, or a CUDA device"
        )
    for name, t in (("query/key", query), ("value", value)):
        if t is not None and not config.MIN_HEAD_DIM <= t.shape[-1] <= config.MAX_HEAD_DIM:
            return (
                f"{name} head dim {t.shape[-1]} is outside the {op} kernel's range "
                f"{config.MIN_HEAD_DIM}..{config.MAX_HEAD_DIM}"
            )
    if k is not None and k > config.REGULARIZER_MAX_K:
        return f"k = {k} exceeds the fused regularizer's maximum {config.REGULARIZER_MAX_K}"
    return None


def unsupported_device(device: torch.device, kernel: str) -> str | None:
    """Why ``kernel`` cannot run on tensors on ``device`` (``None`` when it can)."""
    if device.type != "cuda" and not config.INTERPRET:
        return (
            f"query is on {device}; the {kernel} needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "sparse_attention is imported to run it on CPU"
        )
    return None


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def check_attention_inputs(
    kernel: str, query, key, value, theta, sdc_table, attn_mask, *, k_dense, scale, q_offset, placement, sdc, out
) -> None:
    """Raise TypeError or ValueError, naming the argument and the fix, unless the call is one the ``kernel`` kernel
    (``"prefill"`` or ``"decode"``) can run. Tensors may have any strides; ``attn_mask`` must broadcast to
    ``[B, Hq, Lq, Lk]``."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 ([B, H, L, D]), got shape {tuple(t.shape)}")
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the {kernel} kernel takes float16, bfloat16 or float32")
    device = query.device
    reason = unsupported_device(device, f"{kernel} kernel")
    if reason is not None:
        raise ValueError(reason)
    for name, t in (("key", key), ("value", value)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but query is on {device}; move all three to one device")
        if t.dtype != query.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but query has {query.dtype}; cast all three to one dtype")
    b, hq, lq, d = query.shape
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} must equal key shape {tuple(key.shape)}")
    if key.shape[0] != b:
        raise ValueError(f"key/value batch size {key.shape[0]} must equal the query batch size {b}")
    if key.shape[3] != d:
        raise ValueError(f"key/value head dim {key.shape[3]} must equal the query head dim {d}")
    hkv, lk = key.shape[1], key.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for grouped-query attention"
        )
    if not config.MIN_HEAD_DIM <= d <= config.MAX_HEAD_DIM:
        raise ValueError(
            f"query head dim {d} is not supported by the {kernel} kernel; "
            f"use {config.MIN_HEAD_DIM}..{config.MAX_HEAD_DIM}"
        )
    if placement not in ("pre", "post"):
        raise ValueError(f"placement must be 'pre' or 'post', got {placement!r}")
    if sdc not in SDC_CODES:
        raise ValueError(f"sdc must be one of {', '.join(map(repr, SDC_CODES))}; got {sdc!r}")
    if placement == "post" and sdc != "exact":
        raise ValueError("placement='post' always normalises by the full softmax denominator; use sdc='exact'")
    if isinstance(k_dense, bool) or not isinstance(k_dense, int) or k_dense < 0:
        raise ValueError(f"k_dense must be a non-negative int, got {k_dense!r}")
    if isinstance(q_offset, bool) or not isinstance(q_offset, int):
        raise ValueError(f"q_offset must be an int, got {q_offset!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale != scale or abs(scale) == float("inf"):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    for name, table in (("theta", theta), ("sdc_table", sdc_table)):
        if table is None:
            continue
        if not isinstance(table, torch.Tensor) or table.dtype != torch.float32 or table.dim() != 2:
            raise TypeError(
                f"{name} must be a float32 [Hq, T] tensor (normalise it with sparse_attention.validation.prepare_call),"
                f" got {_describe(table)}"
            )
        if table.shape[0] != hq or table.shape[1] < 1:
            raise ValueError(f"{name} must have shape [Hq={hq}, T>=1], got {tuple(table.shape)}")
        if table.device != device:
            raise ValueError(f"{name} is on {table.device} but query is on {device}; move it to the query's device")
    if theta is not None:
        if sdc == "calibrated" and sdc_table is None:
            raise ValueError("sdc='calibrated' needs sdc_table (the calibrated mean dropped mass, [Hq, T])")
        if sdc != "calibrated" and sdc_table is not None:
            raise ValueError(f"sdc_table is only used with sdc='calibrated', not sdc={sdc!r}; pass None")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must be a boolean torch.Tensor (True = attend), got {_describe(attn_mask)}")
        if attn_mask.device != device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {device}")
        if attn_mask.dim() > 4:
            raise ValueError(f"attn_mask must have rank <= 4, got shape {tuple(attn_mask.shape)}")
        try:
            attn_mask.expand(b, hq, lq, lk)
        except RuntimeError:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, Hq, Lq, Lk] = {(b, hq, lq, lk)}"
            ) from None
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != query.shape or out.dtype != query.dtype or out.device != device:
            raise ValueError(
                f"out must match query (shape {tuple(query.shape)}, {query.dtype}, {device}); got shape "
                f"{tuple(out.shape)}, {out.dtype}, {out.device}"
            )
