"""The contract of one attention call, as data: the modes, the defaults, the call object and the one validation.

Every entry point that takes tensors from a user (``top_theta_attention``, the reference, ``topk_attention``, the
regularizer, the ``nn.Module``) and the Hugging Face backend build their :class:`AttentionCall` with
:func:`prepare_call`, which raises a ``TypeError`` or ``ValueError`` naming the offending argument and the fix.
Nothing below it checks the contract again: the reference trusts the call, and the kernel launchers check only what
the kernels cannot do (``sparse_attention.kernels.common.unsupported_reason``).

Validation makes no device-to-host synchronisation for tensors that live on a GPU, except one NaN check per distinct
user table (cached by tensor identity and version), so a Hugging Face decode step stays capturable in a CUDA graph.
"""

from __future__ import annotations

import math
import numbers
import weakref
from dataclasses import dataclass, replace

import numpy as np
import torch

PLACEMENTS = ("pre", "post")
SDC_MODES = ("exact", "none", "threshold", "calibrated")
BACKENDS = ("auto", "reference", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The first two layers of a model stay dense unless told otherwise: Top-θ inference, calibration and the condensation
# regularizer all default to them (early layers attend broadly; pruning them costs the most quality for the least work).
DEFAULT_DENSE_LAYERS = (0, 1)
# θ = mean + sigma · std of the calibration records.
DEFAULT_SIGMA = 0.1


@dataclass
class AttentionStats:
    """Work statistics of one attention call (all device tensors; reading them is the caller's choice).

    Attributes:
        kept: ``[B, Hq, Lq]`` int32, number of kept (not pruned) visible keys per query row.
        visible: ``[B, Hq, Lq]`` int32, number of visible keys ``n_i`` per query row.
        kept_v_rows: ``[B, Hkv]`` int32 for decode calls (``Lq == 1``): V rows kept by at least one query head of the
            group (a key counts once per kv head). ``None`` for prefill calls.
        skipped_tiles: 0-d int32 tensor, P·V tiles the Triton prefill kernel skipped because nothing in them was kept
            (``None`` for the reference backend, which has no tiles, and for decode).
        total_tiles: 0-d int32 tensor, K/V tiles the Triton prefill kernel walked (``None`` likewise).
    """

    kept: torch.Tensor
    visible: torch.Tensor
    kept_v_rows: torch.Tensor | None = None
    skipped_tiles: torch.Tensor | None = None
    total_tiles: torch.Tensor | None = None

    @property
    def kept_fraction(self) -> float:
        """Kept visible elements over visible elements (1.0 when nothing is visible). Reads the device."""
        vis = int(self.visible.sum())
        return float(self.kept.sum()) / vis if vis else 1.0


@dataclass(frozen=True)
class KeyPadding:
    """Per-batch key padding, the usual Hugging Face mask besides causality, in the form the kernels walk.

    Built once (per decoding step, by the Hugging Face backend) and shared by every layer: the kernels then know each
    row's visible count and the range of keys worth walking in closed form, with no scan of a mask.

    Attributes:
        mask: ``[B, Lk]`` bool, True = the key is attended.
        prefix: ``[B, Lk + 1]`` int32, ``prefix[b, j]`` = attended keys before key j.
        bounds: ``[B, 2]`` int32, ``(first attended key, last attended key + 1)``, ``(0, 0)`` when none.
    """

    mask: torch.Tensor
    prefix: torch.Tensor
    bounds: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> KeyPadding:
        """Build it from a boolean ``[B, Lk]`` key mask with device operations only (no synchronisation)."""
        b, lk = mask.shape
        mask = mask.contiguous()
        prefix = torch.zeros(b, lk + 1, dtype=torch.int32, device=mask.device)
        if lk:
            torch.cumsum(mask, dim=-1, dtype=torch.int32, out=prefix[:, 1:])
            first = mask.to(torch.uint8).argmax(-1)
            last = lk - mask.flip(-1).to(torch.uint8).argmax(-1)
            bounds = torch.stack([first, last], -1).masked_fill(~mask.any(-1, keepdim=True), 0).to(torch.int32)
        else:
            bounds = torch.zeros(b, 2, dtype=torch.int32, device=mask.device)
        return cls(mask=mask, prefix=prefix, bounds=bounds.contiguous())

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mask, prefix, bounds)``, the form the kernel launchers take."""
        return self.mask, self.prefix, self.bounds


@dataclass(frozen=True)
class AttentionCall:
    """A checked and normalised attention call (build it with :func:`prepare_call`).

    Tables are float32 on the query's device: ``theta`` and ``sdc_table`` ``[Hq, T]`` contiguous, ``sinks`` ``[Hq]``.
    ``attn_mask`` is a general boolean mask, a broadcast view ``[B, Hq, Lq, Lk]``; a mask that only depends on the
    key and the batch arrives as ``key_padding`` instead (never both). ``softcap`` 0 and ``cap`` 0 mean off.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    theta: torch.Tensor | None
    sdc_table: torch.Tensor | None
    sinks: torch.Tensor | None
    attn_mask: torch.Tensor | None
    key_padding: KeyPadding | None
    k_dense: int
    scale: float
    softcap: float
    causal: bool
    q_offset: int
    placement: str
    sdc: str
    sdc_scale: float
    cap: int
    vmc: bool
    return_stats: bool

    @property
    def groups(self) -> int:
        return self.query.shape[1] // self.key.shape[1]

    @property
    def dense(self) -> bool:
        return self.theta is None

    def visibility(self, start: int, stop: int) -> torch.Tensor:
        """Boolean ``[B or 1, Hq or 1, stop - start, Lk]``: which keys query rows ``start:stop`` see."""
        lk = self.key.shape[2]
        device = self.query.device
        vis = torch.ones(1, 1, stop - start, lk, dtype=torch.bool, device=device)
        if self.causal:
            rows = torch.arange(start, stop, device=device)[:, None] + self.q_offset
            vis = vis & (torch.arange(lk, device=device)[None, :] <= rows)
        if self.attn_mask is not None:
            vis = vis & self.attn_mask[:, :, start:stop]
        if self.key_padding is not None:
            vis = vis & self.key_padding.mask[:, None, None, :]
        return vis

    def with_pruning(
        self,
        theta: torch.Tensor,
        *,
        k_dense: int,
        placement: str,
        sdc: str,
        sdc_table: torch.Tensor | None = None,
        sdc_scale: float = 1.0,
        cap: int = 0,
        vmc: bool = False,
    ) -> AttentionCall:
        """This call with already validated Top-θ settings (the Hugging Face backend's per-layer tables, which were
        checked when their :class:`~sparse_attention.Thresholds` was built): no data is read."""
        return replace(
            self, theta=theta, k_dense=k_dense, placement=placement, sdc=sdc, sdc_table=sdc_table,
            sdc_scale=float(sdc_scale), cap=int(cap), vmc=bool(vmc),
        )  # fmt: skip

    def with_stats(self, return_stats: bool) -> AttentionCall:
        return self if self.return_stats == return_stats else replace(self, return_stats=return_stats)


# ---- argument checks (each raises naming the argument) -------------------------------------------------------------


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int; ``ValueError`` naming ``name`` unless it is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    """``ValueError`` naming ``name`` when ``value`` is not one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """``TypeError`` naming ``name`` unless ``value`` is a bool (a string such as ``"False"`` is not one)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_real(name: str, value, *, minimum: float | None = None, positive: bool = False, allow_inf=False) -> float:
    """``value`` as a finite float (a Python or NumPy real number, or a 0-d real CPU tensor); raise naming ``name``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor of shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            raise TypeError(f"{name} must be a Python float (got a {value.device} tensor; pass float({name}))")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have rank 4 ([B, H, L, D]), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (it has no data); pass a tensor on a real device")
    if t.shape[3] == 0:
        raise ValueError(f"{name} has head dim 0; the head dim must be >= 1")


def check_qk(query, key) -> tuple[int, int]:
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


class IdentityCache:
    """A mapping from live tensors (by identity) to values, dropping an entry when its tensor dies.

    ``weakref.WeakKeyDictionary`` cannot hold tensors: on a hash collision it compares keys with ``==``, which for
    tensors is elementwise (and reads the device).
    """

    def __init__(self):
        self._data: dict[int, tuple[weakref.ref, object]] = {}

    def get(self, t: torch.Tensor, default=None):
        entry = self._data.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else default

    def __contains__(self, t: torch.Tensor) -> bool:
        entry = self._data.get(id(t))
        return entry is not None and entry[0]() is t

    def __setitem__(self, t: torch.Tensor, value) -> None:
        key = id(t)
        data = self._data

        def drop(ref, key=key):
            entry = data.get(key)
            if entry is not None and entry[0] is ref:
                del data[key]

        data[key] = (weakref.ref(t, drop), value)

    def __len__(self) -> int:
        return len(self._data)


# A user's CUDA table is checked for NaN once per tensor version, not once per call (the check reads the device).
_checked_tables = IdentityCache()


def _as_float_table(name: str, table, device) -> torch.Tensor:
    if table is None or isinstance(table, (str, bytes)):
        raise TypeError(f"{name} must be a number, a sequence of numbers or a real tensor, got {table!r}")
    if isinstance(table, torch.Tensor):
        if table.is_complex() or table.dtype == torch.bool:
            raise TypeError(f"{name} must be a real tensor, got dtype {table.dtype}")
        if table.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor (it has no data); pass a tensor on a real device")
        return table.to(device=device, dtype=torch.float32)
    if isinstance(table, complex):
        raise TypeError(f"{name} must be real, got {table!r}")
    try:
        return torch.as_tensor(table, dtype=torch.float32, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"{name} must be a number, a rectangular sequence of real numbers or a real tensor; got {table!r:.80} "
            f"({str(exc).splitlines()[0]})"
        ) from None


def _check_values(name: str, source, t: torch.Tensor, *, nonneg: bool, finite: bool) -> None:
    """NaN (and, when asked, infinite or negative) entries raise, naming the table as the user's."""
    key = source if isinstance(source, torch.Tensor) and t.is_cuda else None
    if key is not None and _checked_tables.get(key) == key._version:
        return
    if bool(torch.isnan(t).any()):
        raise ValueError(
            f"{name} contains NaN (in the table you passed); use -inf to keep every key, +inf to keep none"
        )
    if finite and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    if nonneg and bool((t < 0).any()):
        raise ValueError(f"{name} must be >= 0 (it is a mass of exponentials)")
    if key is not None:
        _checked_tables[key] = key._version


def head_table(name: str, table, num_heads: int, device, *, nonneg: bool = False, finite: bool = False):
    """Normalise a per-head, per-row-length table (scalar, ``[Hq]``, ``[1, T]``, ``[Hq, T]``) to float32 ``[Hq, T]``."""
    t = _as_float_table(name, table, device)
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
    _check_values(name, table, t, nonneg=nonneg, finite=finite)
    return t.expand(num_heads, t.shape[1]).contiguous()


def _sinks(sinks, num_heads: int, device) -> torch.Tensor:
    t = _as_float_table("sinks", sinks, device)
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1 or t.shape[0] not in (1, num_heads):
        raise ValueError(f"sinks must be [Hq] = [{num_heads}] (one logit per query head), got {tuple(t.shape)}")
    return t.expand(num_heads).contiguous()


def _mask(attn_mask, b: int, hq: int, lq: int, lk: int, device):
    """``(general mask view [B, Hq, Lq, Lk] or None, key padding or None)``."""
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a boolean torch.Tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        raise TypeError(
            f"attn_mask must have dtype torch.bool (True = attend), got {attn_mask.dtype}; for an additive mask "
            "pass mask == 0"
        )
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {device}")
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must have rank <= 4, got shape {tuple(attn_mask.shape)}")
    try:
        full = attn_mask.expand(b, hq, lq, lk)
    except RuntimeError:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, Hq, Lq, Lk] = {(b, hq, lq, lk)}"
        ) from None
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    if shape[1] == 1 and shape[2] == 1:
        # A mask over keys only (HF padding, [B, 1, 1, Lk]): the kernels walk it as per-batch key ranges.
        return None, KeyPadding.from_mask(full[:, 0, 0, :])
    return full, None


def prepare_call(
    query,
    key,
    value,
    theta=None,
    *,
    k_dense: int = 0,
    scale: float | None = None,
    softcap: float | None = None,
    causal: bool = True,
    q_offset: int | None = None,
    attn_mask=None,
    key_padding: KeyPadding | None = None,
    sinks=None,
    placement: str = "pre",
    sdc: str = "exact",
    sdc_table=None,
    sdc_scale: float = 1.0,
    cap: int | None = None,
    vmc: bool = False,
    return_stats: bool = False,
) -> AttentionCall:
    """Check the arguments of :func:`sparse_attention.top_theta_attention` and normalise them into an
    :class:`AttentionCall`. ``key_padding`` (a prepared :class:`KeyPadding`) is the Hugging Face backend's way to pass
    the per-step padding without rebuilding it in every layer; it excludes ``attn_mask``.

    Raises:
        TypeError: a non-tensor, a non-floating dtype, mismatched dtypes, a non-boolean mask, a table or number of the
            wrong kind (strings, complex, ragged lists, booleans for numbers, strings for booleans).
        ValueError: wrong ranks or shapes, head dim 0, heads that do not group, mismatched devices, meta tensors, an
            unknown ``placement`` or ``sdc``, a missing or unexpected ``sdc_table``, a table with the wrong head count
            or a NaN, a negative or infinite ``sdc_table``, a negative ``k_dense``, a ``scale`` that is not a finite
            positive number, a ``softcap`` <= 0, a ``cap`` < 1, a negative ``sdc_scale``, a mask that does not
            broadcast.
    """
    hq, _ = check_qk(query, key)
    _check_tensor("value", value)
    if value.device != query.device:
        raise ValueError(f"value is on {value.device} but query is on {query.device}; move both to one device")
    if value.dtype != query.dtype:
        raise TypeError(f"value has dtype {value.dtype} but query has {query.dtype}; cast both to one dtype")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value shape {tuple(value.shape)} must match key shape {tuple(key.shape)} in B, Hkv, Lk")
    check_choice("placement", placement, PLACEMENTS)
    check_choice("sdc", sdc, SDC_MODES)
    if placement == "post" and sdc != "exact":
        raise ValueError("placement='post' always normalises by the full softmax denominator; use sdc='exact'")
    k_dense = check_int("k_dense", k_dense, minimum=0)
    b, _, lq, d = query.shape
    lk = key.shape[2]
    scale = d**-0.5 if scale is None else check_real("scale", scale, positive=True)
    softcap = 0.0 if softcap is None else check_real("softcap", softcap, positive=True)
    causal = check_bool("causal", causal)
    q_offset = lk - lq if q_offset is None else q_offset
    if isinstance(q_offset, bool) or not isinstance(q_offset, numbers.Integral):
        raise ValueError(f"q_offset must be an int, got {q_offset!r}")
    sdc_scale = check_real("sdc_scale", sdc_scale, minimum=0.0)
    cap = 0 if cap is None else check_int("cap", cap, minimum=1)
    device = query.device

    mask = None
    if attn_mask is not None:
        if key_padding is not None:
            raise ValueError("pass either attn_mask or key_padding, not both")
        mask, key_padding = _mask(attn_mask, b, hq, lq, lk, device)
    elif key_padding is not None and not isinstance(key_padding, KeyPadding):
        raise TypeError(f"key_padding must be a sparse_attention KeyPadding, got {type(key_padding).__name__}")

    theta_t = None if theta is None else head_table("theta", theta, hq, device)
    table = None
    if sdc == "calibrated":
        if sdc_table is None:
            raise ValueError("sdc='calibrated' needs sdc_table (the calibrated mean dropped mass, [Hq, T])")
        table = head_table("sdc_table", sdc_table, hq, device, nonneg=True, finite=True)
    elif sdc_table is not None:
        raise ValueError(f"sdc_table is only used with sdc='calibrated', not sdc={sdc!r}")
    return AttentionCall(
        query=query,
        key=key,
        value=value,
        theta=theta_t,
        sdc_table=table,
        sinks=None if sinks is None else _sinks(sinks, hq, device),
        attn_mask=mask,
        key_padding=key_padding,
        k_dense=k_dense,
        scale=scale,
        softcap=softcap,
        causal=causal,
        q_offset=int(q_offset),
        placement=placement,
        sdc=sdc,
        sdc_scale=sdc_scale,
        cap=cap if theta_t is not None else 0,
        vmc=check_bool("vmc", vmc),
        return_stats=check_bool("return_stats", return_stats),
    )
