"""What the kernel modules share: supported dtypes, the sdc mode codes, shared jit helpers and the one answer to
"can the kernels run this?" (:func:`unsupported_reason`).

The contract itself is validated once, above the kernels (``sparse_attention.ops.contract``); the launchers receive
normalised arguments and refuse only what a kernel cannot do.
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
    if config.INTERPRET and query.dtype == torch.bfloat16:
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
    if (
        op == "prefill"
        and query.dtype == torch.float32
        and max(triton.next_power_of_2(t.shape[-1]) for t in (query, value) if t is not None)
        > config.PREFILL_FP32_MAX_HEAD_DIM
    ):
        return (
            f"float32 with a head dim above {config.PREFILL_FP32_MAX_HEAD_DIM} is not supported by the prefill kernel "
            "(every tile config spills registers there); use float16/bfloat16 or the reference"
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
