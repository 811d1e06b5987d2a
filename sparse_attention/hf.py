"""The Hugging Face ``"top_theta"`` attention backend.

``import sparse_attention`` registers :func:`top_theta_attention_forward` with transformers'
``AttentionInterface`` and a boolean mask builder with ``AttentionMaskInterface``, so any model whose attention
goes through that interface (GPT-2, Llama, Mistral, Qwen2, ...) accepts ``attn_implementation="top_theta"``.

What transformers passes, and what we make of it:

- query ``[B, Hq, Lq, D]`` (possibly strided), key/value ``[B, Hkv, Lk, D]`` (GQA: not repeated).
- ``attention_mask``: ``None``, boolean (True = attend) or additive float (0 = attend, very negative = masked).
  A ``None`` mask with ``Lq > 1`` means top-left causal (``q_offset = 0``, as in a static-cache prefill where the
  keys beyond ``Lq`` are unused slots); with ``Lq == 1`` it means every key is visible.
- ``scaling=None`` is derived as GPT-2's eager path does (``module.scaling`` when present, else ``D ** -0.5``).

Settings live in ``model.config.top_theta`` (written by :func:`sparse_attention.configure`). With none configured
the backend computes exact dense attention. In training mode it computes dense SDPA (with dropout) and feeds the
active condensation regularizer, if any: Top-θ pruning is an inference-time transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .functional import dispatch
from .hooks import ModelContext, use_top_theta
from .reference import topk_attention, visibility
from .thresholds import Thresholds
from .validation import BACKENDS, SDC_MODES, check_int, prepare_call

BACKEND_NAME = "top_theta"
_registered = False


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise ImportError(
            "sparse_attention's Hugging Face backend needs transformers>=5.17: pip install 'transformers>=5.17'"
        ) from exc


def _mask_builder(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask

    # A boolean mask, or None when the pattern is plain causal: the kernels then skip masked tiles by index.
    return sdpa_mask(*args, **kwargs)


def ensure_registered() -> bool:
    """Register ``"top_theta"`` with transformers (idempotent). Returns False when transformers is missing."""
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(BACKEND_NAME, top_theta_attention_forward)
    AttentionMaskInterface.register(BACKEND_NAME, _mask_builder)
    _registered = True
    return True


# ---- settings ---------------------------------------------------------------------------------------------------


@dataclass
class ModelSettings:
    """Parsed ``config.top_theta``."""

    thresholds: Thresholds | None
    sdc: str = "exact"
    vmc: bool = False
    backend: str = "auto"

    def to_dict(self) -> dict:
        return {
            "sdc": self.sdc,
            "vmc": self.vmc,
            "backend": self.backend,
            "thresholds": None if self.thresholds is None else self.thresholds.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModelSettings:
        if not isinstance(d, dict):
            raise ValueError(f"config.top_theta must be a dict, got {type(d).__name__}")
        settings = cls(
            thresholds=None if d.get("thresholds") is None else Thresholds.from_dict(d["thresholds"]),
            sdc=d.get("sdc", "exact"),
            vmc=bool(d.get("vmc", False)),
            backend=d.get("backend", "auto"),
        )
        if settings.sdc not in SDC_MODES:
            raise ValueError(f"config.top_theta['sdc'] must be one of {SDC_MODES}, got {settings.sdc!r}")
        if settings.backend not in BACKENDS:
            raise ValueError(f"config.top_theta['backend'] must be one of {BACKENDS}, got {settings.backend!r}")
        return settings


# id(config.top_theta dict) -> (that dict, parsed settings). Holding the dict keeps its id from being reused; configs
# are unhashable, so the dict's identity is the key, and a replaced dict is parsed afresh.
_settings_cache: dict[int, tuple[dict, ModelSettings]] = {}
_SETTINGS_CACHE_SIZE = 64


def model_settings(config) -> ModelSettings | None:
    """The Top-θ settings stored in a Hugging Face ``config``, or ``None`` when it has none (dense)."""
    raw = getattr(config, "top_theta", None)
    if raw is None:
        return None
    hit = _settings_cache.get(id(raw))
    if hit is not None and hit[0] is raw:
        return hit[1]
    settings = ModelSettings.from_dict(raw)
    if len(_settings_cache) >= _SETTINGS_CACHE_SIZE:
        _settings_cache.clear()
    _settings_cache[id(raw)] = (raw, settings)
    return settings


# ---- observers ----------------------------------------------------------------------------------------------------


class StatsCollector(ModelContext):
    """Accumulates kept/visible counts of every ``top_theta`` attention call (see :func:`collect_stats`)."""

    def __init__(self, model, k: int | None = None):
        super().__init__(model, switch=False)
        self.k = k
        self.rows_over_k = 0
        self.kept_over_k = 0
        self.prefill_kept: dict[int, torch.Tensor] = {}
        self.prefill_visible: dict[int, torch.Tensor] = {}
        self.decode_kept_v: dict[int, int] = {}
        self.decode_visible_v: dict[int, int] = {}
        self.dense_layers: set[int] = set()

    def add(self, layer: int, stats, lq: int, dense: bool) -> None:
        if dense:
            self.dense_layers.add(layer)
        if lq == 1 and stats.kept_v_rows is not None:
            hkv = stats.kept_v_rows.shape[1]
            group = stats.visible.shape[1] // hkv
            # The visible keys of a decode row are the same for every head of a kv group.
            n = stats.visible[:, ::group, 0]
            self.decode_kept_v[layer] = self.decode_kept_v.get(layer, 0) + int(stats.kept_v_rows.sum())
            self.decode_visible_v[layer] = self.decode_visible_v.get(layer, 0) + int(n.sum())
            return
        if self.k is not None and not dense:
            long_rows = stats.visible > self.k
            self.rows_over_k += int(long_rows.sum())
            self.kept_over_k += int(stats.kept[long_rows].sum())
        kept = stats.kept.sum(dim=(0, 2)).double().cpu()
        vis = stats.visible.sum(dim=(0, 2)).double().cpu()
        self.prefill_kept[layer] = self.prefill_kept.get(layer, 0) + kept
        self.prefill_visible[layer] = self.prefill_visible.get(layer, 0) + vis

    def kept_fraction_per_head(self) -> dict[int, list[float]]:
        """Prefill kept-element fraction per layer and head."""
        return {
            layer: (self.prefill_kept[layer] / self.prefill_visible[layer].clamp_min(1)).tolist()
            for layer in sorted(self.prefill_kept)
        }

    def kept_fraction_per_layer(self) -> dict[int, float]:
        return {
            layer: float(self.prefill_kept[layer].sum() / max(1.0, float(self.prefill_visible[layer].sum())))
            for layer in sorted(self.prefill_kept)
        }

    def kept_fraction(self, include_dense: bool = True) -> float | None:
        """Overall prefill kept-element fraction (``None`` when no prefill call was seen)."""
        layers = [i for i in self.prefill_kept if include_dense or i not in self.dense_layers]
        vis = sum(float(self.prefill_visible[i].sum()) for i in layers)
        return sum(float(self.prefill_kept[i].sum()) for i in layers) / vis if vis else None

    def kept_v_fraction(self, include_dense: bool = True) -> float | None:
        """Decode kept V-row fraction: V rows loaded over visible keys, per kv head (``None`` without decode)."""
        layers = [i for i in self.decode_kept_v if include_dense or i not in self.dense_layers]
        vis = sum(self.decode_visible_v[i] for i in layers)
        return sum(self.decode_kept_v[i] for i in layers) / vis if vis else None

    def kept_v_fraction_per_layer(self) -> dict[int, float]:
        return {i: self.decode_kept_v[i] / max(1, self.decode_visible_v[i]) for i in sorted(self.decode_kept_v)}

    def kept_per_k(self) -> float | None:
        """Mean kept count of the pruned layers' rows longer than ``k``, divided by ``k`` (1.0 = exactly top-k)."""
        if self.k is None or self.rows_over_k == 0:
            return None
        return self.kept_over_k / self.rows_over_k / self.k

    def report(self) -> dict:
        """A JSON-serialisable summary."""
        return {
            "kept_fraction": self.kept_fraction(),
            "kept_fraction_pruned_layers": self.kept_fraction(include_dense=False),
            "kept_v_fraction": self.kept_v_fraction(),
            "kept_v_fraction_pruned_layers": self.kept_v_fraction(include_dense=False),
            "kept_per_k": self.kept_per_k(),
            "dense_layers": sorted(self.dense_layers),
            "per_layer": {str(k): v for k, v in self.kept_fraction_per_layer().items()},
            "per_head": {str(k): v for k, v in self.kept_fraction_per_head().items()},
            "decode_per_layer": {str(k): v for k, v in self.kept_v_fraction_per_layer().items()},
        }


class TopKAttention(ModelContext):
    """Exact top-k attention on every non-dense layer of a model: the quality baseline Top-θ approximates.

    ``with TopKAttention(model, k=16): model(**batch)``; switches the model to ``top_theta`` for the duration.
    """

    def __init__(self, model, k: int, dense_layers=(0, 1)):
        super().__init__(model, switch=True)
        check_int("k", k)
        self.k = k
        self.dense_layers = tuple(dense_layers)


def collect_stats(model, k: int | None = None) -> StatsCollector:
    """Context manager collecting how much attention a ``top_theta`` model keeps.

    With ``k`` it also measures ``kept_per_k()``: the mean kept count of pruned rows longer than k, over k.

    ``with collect_stats(model) as st: model(**batch)`` then ``st.kept_fraction()`` (prefill, kept over visible
    elements), ``st.kept_fraction_per_head()``, ``st.kept_v_fraction()`` (decode steps: V rows loaded over visible
    keys per kv head) or ``st.report()``. Raises ``ValueError`` when the model does not use ``top_theta``.
    """
    return StatsCollector(model, k)


# ---- the attention function ---------------------------------------------------------------------------------------


def _scaling(module, query: torch.Tensor, scaling) -> float:
    if scaling is not None:
        return float(scaling)
    if getattr(module, "scaling", None) is not None:
        return float(module.scaling)
    scale = 1.0
    if getattr(module, "scale_attn_weights", True):
        scale = query.shape[-1] ** -0.5
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(module.layer_idx + 1)
    return scale


def _mask_arguments(attention_mask, lq: int, lk: int, is_causal: bool):
    """Translate transformers' mask into ``(attn_mask, causal, q_offset)`` of the functional API."""
    if attention_mask is None:
        if not is_causal:
            return None, False, 0
        return None, True, 0 if lq > 1 else lk - 1
    mask = attention_mask
    if mask.dtype != torch.bool:
        min_value = torch.finfo(mask.dtype).min
        masked = mask <= min_value / 2
        if not bool(((mask == 0) | masked).all()):
            raise ValueError(
                "top_theta supports boolean masks and additive masks of 0 / -inf only, not attention biases"
            )
        mask = ~masked
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    mask = mask[..., :lk]
    return _split_causal_padding(mask, lq, lk)


def _split_causal_padding(mask: torch.Tensor, lq: int, lk: int):
    """Recognise transformers' usual prefill mask, bottom-right causal AND a per-batch key padding, and return it
    as ``(padding [B, 1, 1, Lk] or None, True, Lk - Lq)``: the kernels then skip causally masked tiles by index
    and never walk padded ones, instead of reading a full ``[B, 1, Lq, Lk]`` mask. Any other mask is returned as
    is (``causal=False``). The check is exact, so the translation never changes results."""
    if lq == 1 or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != lq:
        return mask, False, 0
    q_offset = lk - lq
    # With bottom-right causality the last query row sees every key, so it is the padding row.
    padding = mask[:, :, -1:, :]
    if not bool((mask == visibility(0, lq, lk, True, q_offset, padding, mask.device)).all()):
        return mask, False, 0
    return (None if bool(padding.all()) else padding), True, q_offset


def _dense_sdpa(query, key, value, visible: torch.Tensor | None, scale: float, dropout: float) -> torch.Tensor:
    """Dense attention for training (``visible=None`` means square causal)."""
    gqa = query.shape[1] != key.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if visible is None:
        return sdpa(query, key, value, is_causal=True, dropout_p=dropout, scale=scale, enable_gqa=gqa)
    # SDPA returns NaN for rows with nothing visible; the contract says zeros.
    empty = ~visible.any(-1, keepdim=True)
    out = sdpa(query, key, value, attn_mask=visible | empty, dropout_p=dropout, scale=scale, enable_gqa=gqa)
    return out.masked_fill(empty, 0.0)


def top_theta_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """Attention function registered as ``"top_theta"``; returns ``(out [B, Lq, Hq, D], None)``."""
    lq, lk = query.shape[2], key.shape[2]
    causal_flag = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    attn_mask, causal, q_offset = _mask_arguments(attention_mask, lq, lk, causal_flag)
    scale = _scaling(module, query, scaling)

    from .calibration import Calibrator

    calibrator = Calibrator.active_for(module)
    if calibrator is not None:
        out = calibrator.attend(module, query, key, value, attn_mask, causal, q_offset, scale)
        return out.transpose(1, 2).contiguous(), None

    if module.training:
        from .condensation import active_for as condensation_for

        visible = _visible_mask(attn_mask, causal, q_offset, lq, lk, query.device)
        cond = condensation_for(module)
        if cond is not None:
            cond.record(module, query, key, visible, scale=scale)
        out = _dense_sdpa(query, key, value, visible, scale, dropout)
        return out.transpose(1, 2).contiguous(), None

    collector = StatsCollector.active_for(module)
    topk = TopKAttention.active_for(module)
    if topk is not None and module.layer_idx not in topk.dense_layers:
        dense = False
        result = topk_attention(
            query, key, value, topk.k, scale=scale, causal=causal, q_offset=q_offset, attn_mask=attn_mask,
            return_stats=collector is not None,
        )  # fmt: skip
        out, stats = result if collector is not None else (result, None)
    else:
        kwargs, dense, backend = ({}, True, "auto") if topk is not None else _layer_settings(module, query.device)
        call = prepare_call(
            query, key, value, scale=scale, causal=causal, q_offset=q_offset, attn_mask=attn_mask,
            return_stats=collector is not None, **kwargs,
        )  # fmt: skip
        out, stats = dispatch(call, backend)
    if collector is not None:
        collector.add(module.layer_idx, stats, lq, dense)
    return out.transpose(1, 2).contiguous(), None


def _layer_settings(module, device) -> tuple[dict, bool, str]:
    """Top-θ keyword arguments of this module's layer, whether the layer is dense, and the backend."""
    settings = model_settings(module.config) if hasattr(module, "config") else None
    if settings is None:
        return {}, True, "auto"
    th = settings.thresholds
    if th is None:
        return {}, True, settings.backend
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError("top_theta thresholds need attention modules with a layer_idx")
    if th.is_dense(layer):
        return {}, True, settings.backend
    kwargs = dict(
        theta=th.table(layer, device), k_dense=th.k, placement=th.placement, sdc=settings.sdc, vmc=settings.vmc
    )
    if settings.sdc == "calibrated":
        kwargs["sdc_table"] = th.sdc(layer, device)
    return kwargs, False, settings.backend


def _visible_mask(attn_mask, causal: bool, q_offset: int, lq: int, lk: int, device) -> torch.Tensor | None:
    """Boolean ``[B or 1, H or 1, Lq, Lk]`` visibility, or ``None`` for plain square causal (``Lq == Lk``)."""
    if attn_mask is None and causal and q_offset == 0 and lq == lk:
        return None
    return visibility(0, lq, lk, causal, q_offset, attn_mask, device)


# ---- configuration --------------------------------------------------------------------------------------------------


def configure(model, thresholds: Thresholds | None, *, sdc: str = "exact", vmc: bool = False, placement=None,
              backend: str = "auto"):  # fmt: skip
    """Switch a Hugging Face model to Top-θ attention with these thresholds and settings.

    Writes everything to ``model.config.top_theta`` (so ``save_pretrained`` / ``from_pretrained(dir,
    attn_implementation="top_theta")`` restores the same behaviour) and sets ``attn_implementation="top_theta"``.
    ``thresholds=None`` configures exact dense attention. Returns the model.

    Raises:
        ValueError: thresholds for another model (layer/head count, model type), ``placement`` different from the
            one the thresholds were calibrated for, an unknown ``sdc``/``backend``, or ``sdc="calibrated"`` with
            thresholds that carry no sdc table.
    """
    _require_transformers()
    if sdc not in SDC_MODES:
        raise ValueError(f"sdc must be one of {SDC_MODES}, got {sdc!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if thresholds is not None:
        if not isinstance(thresholds, Thresholds):
            raise TypeError(f"thresholds must be a sparse_attention.Thresholds, got {type(thresholds).__name__}")
        thresholds.check_model(model.config)
        if placement is not None and placement != thresholds.placement:
            raise ValueError(
                f"placement={placement!r} but the thresholds were calibrated for placement={thresholds.placement!r}; "
                "thresholds are in that placement's units (scores or probabilities): calibrate again"
            )
        if thresholds.placement == "post" and sdc != "exact":
            raise ValueError("placement='post' always normalises by the full softmax denominator; use sdc='exact'")
        if sdc == "calibrated" and thresholds.sdc_table is None:
            raise ValueError("sdc='calibrated' needs thresholds calibrated with an sdc table")
    use_top_theta(model)
    model.config.top_theta = ModelSettings(thresholds, sdc=sdc, vmc=bool(vmc), backend=backend).to_dict()
    return model


def thresholds_of(model) -> Thresholds | None:
    """The thresholds configured on a model (``None`` when it has none)."""
    settings = model_settings(model.config)
    return None if settings is None else settings.thresholds
