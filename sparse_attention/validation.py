"""Argument checking shared by every backend of :func:`sparse_attention.top_theta_attention`.

Every public entry point funnels its arguments through :func:`prepare_call`, which raises a ``TypeError`` or
``ValueError`` naming the offending argument, and returns an :class:`AttentionCall` whose fields are normalised
(threshold tables as float32 ``[Hq, T]``, masks as boolean views broadcast to ``[B, Hq, Lq, Lk]``, defaults
resolved). Backends receive only normalised calls and do no checking of their own beyond what they support.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PLACEMENTS = ("pre", "post")
SDC_MODES = ("exact", "none", "threshold", "calibrated")
BACKENDS = ("auto", "reference", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class AttentionStats:
    """Work statistics of one attention call.

    Attributes:
        kept: ``[B, Hq, Lq]`` int32, number of kept (not pruned) visible keys per query row.
        visible: ``[B, Hq, Lq]`` int32, number of visible keys ``n_i`` per query row.
        kept_v_rows: ``[B, Hkv]`` int32 when ``Lq == 1``: V rows kept by at least one query head of the group
            (a key counts once per kv head). ``None`` for prefill calls.
        skipped_tiles: P·V tiles the Triton prefill kernel skipped because nothing in them was kept
            (``None`` for the reference backend, which has no tiles).
        total_tiles: visible (not causally skipped) K/V tiles the Triton prefill kernel walked.
    """

    kept: torch.Tensor
    visible: torch.Tensor
    kept_v_rows: torch.Tensor | None = None
    skipped_tiles: int | None = None
    total_tiles: int | None = None

    @property
    def kept_fraction(self) -> float:
        """Kept visible elements over visible elements (1.0 when nothing is visible)."""
        vis = int(self.visible.sum())
        return float(self.kept.sum()) / vis if vis else 1.0


@dataclass
class AttentionCall:
    """A checked and normalised attention call (see :func:`prepare_call`)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    theta: torch.Tensor | None  # float32 [Hq, T]; None = dense
    sdc_table: torch.Tensor | None  # float32 [Hq, T]; only with sdc="calibrated"
    attn_mask: torch.Tensor | None  # bool, broadcast view [B, Hq, Lq, Lk]; True = attend
    k_dense: int
    scale: float
    causal: bool
    q_offset: int
    placement: str
    sdc: str
    vmc: bool
    return_stats: bool

    @property
    def groups(self) -> int:
        return self.query.shape[1] // self.key.shape[1]


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have rank 4 ([B, H, L, D]), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")


def check_int(name: str, value, minimum: int = 1) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    """Raise ``ValueError`` naming ``name`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def check_qk(query: torch.Tensor, key: torch.Tensor) -> tuple[int, int]:
    """Check a ``[B, Hq, Lq, D]`` query against a ``[B, Hkv, Lk, D]`` key; return ``(Hq, Hkv)``."""
    _check_tensor("query", query)
    _check_tensor("key", key)
    if key.device != query.device:
        raise ValueError(f"key is on {key.device} but query is on {query.device}; move both to one device")
    if key.dtype != query.dtype:
        raise TypeError(f"key has dtype {key.dtype} but query has {query.dtype}; cast both to one dtype")
    if key.shape[0] != query.shape[0]:
        raise ValueError(f"key batch size {key.shape[0]} does not match query batch size {query.shape[0]}")
    if key.shape[3] != query.shape[3]:
        raise ValueError(f"key head dim {key.shape[3]} does not match query head dim {query.shape[3]}")
    hq, hkv = query.shape[1], key.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for grouped-query attention"
        )
    return hq, hkv


def head_table(name: str, table, num_heads: int, device: torch.device) -> torch.Tensor:
    """Normalise a per-head, per-row-length table (scalar, ``[Hq]``, ``[1, T]``, ``[Hq, T]``) to float32 ``[Hq, T]``."""
    t = torch.as_tensor(table, dtype=torch.float32, device=device)
    if t.dim() == 0:
        t = t.reshape(1, 1)
    elif t.dim() == 1:
        if t.shape[0] not in (1, num_heads):
            raise ValueError(f"{name} has {t.shape[0]} entries but there are {num_heads} query heads")
        t = t[:, None]
    elif t.dim() == 2:
        if t.shape[0] not in (1, num_heads):
            raise ValueError(f"{name} has {t.shape[0]} head rows but there are {num_heads} query heads")
    else:
        raise ValueError(f"{name} must be a scalar, [Hq] or [Hq, T]; got shape {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one row-length entry (T >= 1)")
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN")
    return t.expand(num_heads, t.shape[1]).contiguous()


def prepare_call(
    query,
    key,
    value,
    theta=None,
    *,
    k_dense: int = 0,
    scale: float | None = None,
    causal: bool = True,
    q_offset: int | None = None,
    attn_mask=None,
    placement: str = "pre",
    sdc: str = "exact",
    sdc_table=None,
    vmc: bool = False,
    return_stats: bool = False,
) -> AttentionCall:
    """Check the arguments of :func:`sparse_attention.top_theta_attention` and normalise them.

    Raises:
        TypeError: a non-tensor, a non-floating dtype, or mismatched dtypes.
        ValueError: wrong ranks or shapes, heads that do not group, mismatched devices, an unknown ``placement``
            or ``sdc``, a missing or unexpected ``sdc_table``, a table with the wrong head count, a negative
            ``k_dense``, a non-finite ``scale``, a mask that does not broadcast.
    """
    hq, _ = check_qk(query, key)
    _check_tensor("value", value)
    if value.device != query.device:
        raise ValueError(f"value is on {value.device} but query is on {query.device}; move both to one device")
    if value.dtype != query.dtype:
        raise TypeError(f"value has dtype {value.dtype} but query has {query.dtype}; cast both to one dtype")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value shape {tuple(value.shape)} must match key shape {tuple(key.shape)} in B, Hkv, Lk")
    if value.shape[3] != query.shape[3]:
        raise ValueError(f"value head dim {value.shape[3]} must equal the query head dim {query.shape[3]}")
    check_choice("placement", placement, PLACEMENTS)
    check_choice("sdc", sdc, SDC_MODES)
    if placement == "post" and sdc != "exact":
        raise ValueError("placement='post' always normalises by the full softmax denominator; use sdc='exact'")
    if isinstance(k_dense, bool) or not isinstance(k_dense, int) or k_dense < 0:
        raise ValueError(f"k_dense must be a non-negative int, got {k_dense!r}")
    b, _, lq, d = query.shape
    lk = key.shape[2]
    if scale is None:
        scale = d**-0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if q_offset is None:
        q_offset = lk - lq
    if isinstance(q_offset, bool) or not isinstance(q_offset, int):
        raise ValueError(f"q_offset must be an int, got {q_offset!r}")
    device = query.device

    mask = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a boolean torch.Tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must have dtype torch.bool (True = attend), got {attn_mask.dtype}")
        if attn_mask.device != device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {device}")
        if attn_mask.dim() > 4:
            raise ValueError(f"attn_mask must have rank <= 4, got shape {tuple(attn_mask.shape)}")
        try:
            mask = attn_mask.expand(b, hq, lq, lk)
        except RuntimeError:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, Hq, Lq, Lk] = {(b, hq, lq, lk)}"
            ) from None

    theta_t = None if theta is None else head_table("theta", theta, hq, device)
    table = None
    if sdc == "calibrated":
        if sdc_table is None:
            raise ValueError("sdc='calibrated' needs sdc_table (the calibrated mean dropped mass, [Hq, T])")
        table = head_table("sdc_table", sdc_table, hq, device)
    elif sdc_table is not None:
        raise ValueError(f"sdc_table is only used with sdc='calibrated', not sdc={sdc!r}")
    return AttentionCall(
        query=query,
        key=key,
        value=value,
        theta=theta_t,
        sdc_table=table,
        attn_mask=mask,
        k_dense=k_dense,
        scale=scale,
        causal=bool(causal),
        q_offset=q_offset,
        placement=placement,
        sdc=sdc,
        vmc=bool(vmc),
        return_stats=bool(return_stats),
    )
