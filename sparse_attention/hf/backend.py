"""The Hugging Face ``"top_theta"`` attention backend: registration, argument adaptation, the forward, configuration.

``import sparse_attention`` registers :func:`top_theta_attention_forward` with transformers' ``AttentionInterface``
and :func:`build_mask` with ``AttentionMaskInterface``, so any model whose attention goes through that interface
(GPT-2, Llama, Mistral, Qwen2, Gemma-2/3, Phi-3, GPT-NeoX, gpt-oss, DeepSeek-V3, ...) accepts
``attn_implementation="top_theta"``.

What transformers passes, and what becomes of it (once per call, into one :class:`~sparse_attention.ops.contract.
AttentionCall`):

- query ``[B, Hq, Lq, D]``, key ``[B, Hkv, Lk, D]``, value ``[B, Hkv, Lk, Dv]`` (GQA: not repeated; Dv may differ).
- the mask: :func:`build_mask` builds transformers' boolean SDPA mask and, when the pattern is the standard causal
  one, remembers its decomposition (causal with an offset, plus a per-batch key padding prepared once per forward and
  shared by every layer), so the kernels skip masked tiles by index and never scan the mask. Any other mask (sliding
  windows, packed sequences, custom patterns, static-cache decoding) is read as a general boolean mask, a mask over
  keys only as a key padding (also prepared once per step). ``None`` with ``Lq > 1`` means top-left causal (a static
  cache prefill: the keys beyond ``Lq`` are unused slots); with ``Lq == 1`` every key is visible. Additive float masks
  must be 0 / very negative (checked once per mask tensor).
- ``scaling=None`` is derived as GPT-2's eager path does; ``softcap`` (Gemma-2) and ``s_aux`` (attention sinks,
  gpt-oss) join the call; ``sliding_window`` is already part of the mask. Any other keyword that would change the
  result raises ``NotImplementedError`` naming it: nothing is swallowed.

Settings live in ``config.top_theta`` of the attention modules' config (the text config of a multimodal wrapper),
written by :func:`configure`. With none configured the backend computes exact dense attention. In training mode it
computes dense attention (with dropout; Top-θ pruning is an inference-time transform) and lets the active model
contexts observe the call (the condensation regularizer records there).

Model contexts (calibration, statistics, the top-k baseline, condensation; :class:`ModelContext`) register their
model's attention modules here and answer through two methods, ``attend(module, call)`` (may compute the output
instead of the default path) and ``observe(module, call, out, stats)``. This module imports none of them.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch

from ..ops.attention import run
from ..ops.contract import (
    BACKENDS,
    SDC_MODES,
    AttentionCall,
    AttentionStats,
    IdentityCache,
    KeyPadding,
    check_bool,
    check_choice,
    check_int,
    check_real,
    prepare_call,
)
from ..ops.thresholds import Thresholds, TopThetaSettings

BACKEND_NAME = "top_theta"
_registered = False

# HF keyword arguments that do not change the attention result here, and why.
_IGNORED_KWARGS = {
    "sliding_window",  # the window is already in the mask transformers builds for the layer
    "position_ids",  # positions were applied to q and k (RoPE) before the attention function
    "cache_position",  # likewise: the mask carries what the positions mean for visibility
    "output_attentions",  # the backend returns no weights (None), like SDPA
    "use_cache",  # a model-level flag passed through by several models
    "past_key_values",
    "output_router_logits",  # gpt-oss: about its experts, not attention
    "output_hidden_states",  # CLIP vision towers pass it through
    "num_items_in_batch",  # the Trainer's loss normalisation
    # Packed sequences: transformers builds the block-diagonal mask from position_ids, so the boundaries flash
    # attention reads from these are already in the mask (they are refused below when position_ids are missing).
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
}


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise ImportError(
            "sparse_attention's Hugging Face backend needs transformers>=5.17: pip install 'transformers>=5.17'"
        ) from exc


# ---- masks --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MaskInfo:
    """How a mask built by :func:`build_mask` decomposes: causal with ``q_offset`` AND a key padding (or none)."""

    q_offset: int
    key_padding: KeyPadding | None


# Decompositions and key paddings, keyed by the mask tensor object, so that every layer of a forward pass reuses the
# work of the first (masks are rebuilt at every forward, so entries die with them).
_mask_info = IdentityCache()
_key_paddings = IdentityCache()
_checked_float_masks = IdentityCache()


def build_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0, mask_function=None,
               attention_mask=None, **kwargs):  # fmt: skip
    """transformers' boolean SDPA mask (``None`` when the pattern is plain causal), plus, for the standard causal
    pattern with an integer offset, its decomposition into causal + key padding for :func:`adapt`."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    mask = sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, **kwargs,
    )  # fmt: skip
    if mask is not None and mask_function is causal_mask_function and isinstance(q_offset, int):
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        key_padding = None
        if padding is not None:
            key_padding = KeyPadding.from_mask(
                padding[:, kv_offset : kv_offset + kv_length].to(mask.device, torch.bool)
            )
        _mask_info[mask] = _MaskInfo(q_offset=q_offset - kv_offset, key_padding=key_padding)
    return mask


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"top_theta takes boolean or additive float attention masks, got {mask.dtype}")
    masked = mask <= torch.finfo(mask.dtype).min / 2
    if mask not in _checked_float_masks:
        # Reads the device, once per mask tensor (transformers builds boolean masks for top_theta; float masks come
        # only from models that build their own).
        if not bool(((mask == 0) | masked).all()):
            raise ValueError("top_theta supports additive masks of 0 / -inf only, not attention biases")
        _checked_float_masks[mask] = True
    return ~masked


def adapt(module, query, key, value, attention_mask, *, scaling, is_causal, softcap, sinks) -> AttentionCall:
    """transformers' attention arguments as one dense :class:`AttentionCall` (no device read for boolean masks)."""
    lq, lk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    attn_mask = key_padding = None
    q_offset = 0
    if attention_mask is None:
        if causal and lq == 1:
            causal = False  # a decode step without a mask sees every cached key
        q_offset = 0
    else:
        info = _mask_info.get(attention_mask)
        if info is not None:
            causal, q_offset, key_padding = True, info.q_offset, info.key_padding
        else:
            mask = _bool_mask(attention_mask)
            if mask.dim() == 2:
                mask = mask[:, None, None, :]
            mask = mask[..., :lk]
            causal, q_offset = False, 0
            if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
                key_padding = _key_paddings.get(attention_mask)
                if key_padding is None:
                    key_padding = _key_paddings[attention_mask] = KeyPadding.from_mask(mask[:, 0, 0, :])
            else:
                attn_mask = mask
    return prepare_call(
        query, key, value, scale=_scaling(module, query, scaling), softcap=softcap, causal=causal, q_offset=q_offset,
        attn_mask=attn_mask, key_padding=key_padding, sinks=sinks,
    )  # fmt: skip


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


# ---- settings -----------------------------------------------------------------------------------------------------

# id(config.top_theta dict) -> (that dict, parsed settings). Holding the dict keeps its id from being reused; configs
# are unhashable, so the dict's identity is the key, and a replaced dict is parsed afresh.
_settings_cache: dict[int, tuple[dict, TopThetaSettings]] = {}
_SETTINGS_CACHE_SIZE = 64


def model_settings(config, where: str = "") -> TopThetaSettings | None:
    """The Top-θ settings stored in a Hugging Face ``config`` (a model's or a text config), or ``None`` (dense)."""
    raw = getattr(config, "top_theta", None)
    if raw is None:
        return None
    if isinstance(raw, TopThetaSettings):
        return raw
    hit = _settings_cache.get(id(raw))
    if hit is not None and hit[0] is raw:
        return hit[1]
    settings = TopThetaSettings.from_dict(raw, where=where)
    if len(_settings_cache) >= _SETTINGS_CACHE_SIZE:
        _settings_cache.clear()
    _settings_cache[id(raw)] = (raw, settings)
    return settings


def _with_layer_settings(module, call: AttentionCall) -> tuple[AttentionCall, bool, str]:
    """The call with this module's layer settings, whether the layer is dense, and the backend."""
    settings = model_settings(module.config) if hasattr(module, "config") else None
    if settings is None:
        return call, True, "auto"
    th = settings.thresholds
    if th is None:
        return call, True, settings.backend
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError(
            f"top_theta thresholds need attention modules with a layer_idx; {type(module).__name__} has none"
        )
    if th.is_dense(layer):
        return call, True, settings.backend
    device = call.query.device
    call = call.with_pruning(
        th.table(layer, device), k_dense=th.k_of(layer), placement=th.placement, sdc=settings.sdc,
        sdc_table=th.sdc(layer, device) if settings.sdc == "calibrated" else None, sdc_scale=settings.sdc_scale,
        cap=settings.cap or 0, vmc=settings.vmc,
    )  # fmt: skip
    return call, False, settings.backend


# ---- model contexts -----------------------------------------------------------------------------------------------

# attention module -> active contexts of its model, in the order they were entered (one dict lookup per call). Modules
# hash by identity, so a weak-key dictionary is safe here.
_contexts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ModelContext:
    """A context manager that observes or takes over the ``top_theta`` attention calls of one model.

    On entry it registers the model's attention modules with the backend (switching the model to ``top_theta`` when
    ``switch=True`` and restoring the previous implementation on exit). Subclasses override :meth:`attend` and/or
    :meth:`observe`; ``wants_stats`` asks the default path for statistics. At most one context of a class per model.
    """

    wants_stats = False

    def __init__(self, model: torch.nn.Module, *, switch: bool = True):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
        self.model = model
        self._switch = switch
        self._previous = None
        self._modules: list[torch.nn.Module] = []

    def attend(self, module, call: AttentionCall) -> tuple[torch.Tensor, AttentionStats | None, bool] | None:
        """Compute this call's ``(output, stats, dense)`` instead of the default path, or return ``None`` to leave
        it alone (``dense``: the layer ran without pruning)."""
        return None

    def observe(self, module, call: AttentionCall, out: torch.Tensor, stats: AttentionStats | None, dense: bool):
        """See every call after its output is known (``dense``: the layer ran without pruning)."""

    def __enter__(self):
        if self._switch and attention_implementation(self.model) != BACKEND_NAME:
            self._previous = attention_implementation(self.model)
            use_top_theta(self.model)
        elif attention_implementation(self.model) != BACKEND_NAME:
            raise ValueError(
                "the model does not use attn_implementation='top_theta'; load it with that argument or call "
                "sparse_attention.configure(model, thresholds) first"
            )
        modules = attention_modules(self.model)
        for module in modules:
            if any(type(c) is type(self) for c in _contexts.get(module, ())):
                raise RuntimeError(f"another {type(self).__name__} is already active on this model")
        for module in modules:
            _contexts.setdefault(module, []).append(self)
            self._modules.append(module)
        return self

    def __exit__(self, *exc):
        for module in self._modules:
            active = _contexts.get(module, [])
            if self in active:
                active.remove(self)
            if not active:
                _contexts.pop(module, None)
        self._modules.clear()
        if self._previous is not None:
            set_attention_implementation(self.model, self._previous)
            self._previous = None
        return False


def active_contexts(module) -> tuple[ModelContext, ...]:
    """The model contexts active on an attention module, in the order they were entered."""
    return tuple(_contexts.get(module, ()))


def attention_modules(model) -> list[torch.nn.Module]:
    """The attention modules (those with a ``layer_idx``) of a model's language model."""
    lm, _ = language_model(model)
    return [m for m in lm.modules() if getattr(m, "layer_idx", None) is not None]


# ---- the attention function ---------------------------------------------------------------------------------------


def _dense_training(call: AttentionCall, dropout: float) -> torch.Tensor:
    """Differentiable dense attention in the model's dtype (training): SDPA, or the eager formula with softcap/sinks."""
    q, k, v = call.query, call.key, call.value
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    square_causal = call.causal and call.q_offset == 0 and lq == lk and call.attn_mask is None
    visible = None if square_causal and call.key_padding is None else call.visibility(0, lq)
    if call.softcap or call.sinks is not None:
        kk = k.repeat_interleave(call.groups, 1)
        vv = v.repeat_interleave(call.groups, 1)
        s = torch.matmul(q, kk.transpose(-1, -2)) * call.scale
        if call.softcap:
            s = call.softcap * torch.tanh(s / call.softcap)
        if visible is None:
            visible = call.visibility(0, lq)
        s = s.masked_fill(~visible, float("-inf"))
        if call.sinks is not None:
            s = torch.cat([s, call.sinks.to(s.dtype)[None, :, None, None].expand(b, hq, lq, 1)], -1)
        p = torch.softmax(s.float(), -1).to(q.dtype)
        p = torch.nan_to_num(p[..., :lk], nan=0.0)  # rows that see nothing (and have no sink) give zeros
        p = torch.nn.functional.dropout(p, dropout, training=True) if dropout else p
        return torch.matmul(p, vv)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = call.groups > 1
    if visible is None:
        return sdpa(q, k, v, is_causal=True, dropout_p=dropout, scale=call.scale, enable_gqa=gqa)
    # SDPA returns NaN for rows with nothing visible; the contract says zeros.
    empty = ~visible.any(-1, keepdim=True)
    out = sdpa(q, k, v, attn_mask=visible | empty, dropout_p=dropout, scale=call.scale, enable_gqa=gqa)
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
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
):
    """Attention function registered as ``"top_theta"``; returns ``(out [B, Lq, Hq, Dv], None)``.

    Raises:
        NotImplementedError: a keyword argument this backend does not implement (named in the message).
    """
    unknown = sorted(name for name, value_ in kwargs.items() if name not in _IGNORED_KWARGS and value_ is not None)
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("position_ids") is None:
        unknown.append("cu_seq_lens_q without position_ids")
    if unknown:
        raise NotImplementedError(
            f"the top_theta attention backend does not implement {', '.join(map(repr, unknown))} "
            f"(from {type(module).__name__}); use attn_implementation='eager' or 'sdpa' for this model"
        )
    call = adapt(
        module, query, key, value, attention_mask, scaling=scaling, is_causal=is_causal, softcap=softcap,
        sinks=None if s_aux is None else s_aux,
    )  # fmt: skip
    contexts = _contexts.get(module, ())
    if module.training:
        out = _dense_training(call, dropout)
        for ctx in contexts:
            ctx.observe(module, call, out, None, True)
        return out.transpose(1, 2).contiguous(), None

    call = call.with_stats(any(ctx.wants_stats for ctx in contexts))
    answer = None
    for ctx in contexts:
        answer = ctx.attend(module, call)
        if answer is not None:
            break
    if answer is None:
        call, dense, backend = _with_layer_settings(module, call)
        out, stats = run(call, backend)
    else:
        out, stats, dense = answer
    for ctx in contexts:
        ctx.observe(module, call, out, stats, dense)
    return out.transpose(1, 2).contiguous(), None


# ---- models: registration, the language model inside a wrapper, configuration ------------------------------------


def ensure_registered() -> bool:
    """Register ``"top_theta"`` with transformers (idempotent). Returns False when transformers is missing."""
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface, PreTrainedModel
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(BACKEND_NAME, top_theta_attention_forward)
    AttentionMaskInterface.register(BACKEND_NAME, build_mask)
    _wrap_from_pretrained(PreTrainedModel)
    _registered = True
    return True


def _wrap_from_pretrained(cls) -> None:
    """Make ``from_pretrained`` validate ``config.top_theta`` when it loads a model (not at its first forward)."""
    original = cls.__dict__["from_pretrained"].__func__
    if getattr(original, "_top_theta_checked", False):
        return

    @functools.wraps(original)
    def from_pretrained(klass, pretrained_model_name_or_path, *args, **kwargs):
        model = original(klass, pretrained_model_name_or_path, *args, **kwargs)
        if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
            check_loaded(model, f"{pretrained_model_name_or_path}/config.json")
        return model

    from_pretrained._top_theta_checked = True
    cls.from_pretrained = classmethod(from_pretrained)


def check_loaded(model, where: str) -> None:
    """Validate the ``config.top_theta`` a checkpoint brought, naming ``where`` and the field: a malformed record,
    or thresholds made for another model (layer or head count, model type), raise ``ValueError``."""
    _, config = language_model(model)
    settings = model_settings(config, where=where)
    if settings is not None and settings.thresholds is not None:
        settings.thresholds.check_model(config, where=f"{where}: top_theta.thresholds")


def text_config(config):
    """The config that a model's decoder attention modules hold: the text config of a multimodal wrapper."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def language_model(model) -> tuple[torch.nn.Module, object]:
    """``(the language model inside model, its config)``: the model itself for a plain causal LM, the decoder of a
    multimodal wrapper (Llava, Gemma-3, Mistral-3, ...) otherwise."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} is not a Hugging Face model (it has no config)")
    text = text_config(config)
    if text is config:
        return model, config
    for module in model.modules():
        if module is not model and getattr(module, "config", None) is text:
            return module, text
    raise ValueError(
        f"cannot find the language model of {type(model).__name__} (no submodule holds its text config); "
        "pass the language model itself, e.g. model.model.language_model"
    )


def attention_implementation(model) -> str | None:
    _, config = language_model(model)
    return getattr(config, "_attn_implementation", None)


def set_attention_implementation(model, name: str) -> None:
    """Set the attention implementation of a model's language model only (a wrapper's vision tower keeps its own)."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise ValueError(f"{type(model).__name__} is not a Hugging Face model with set_attn_implementation")
    lm, config = language_model(model)
    if lm is model:
        setter(name)
    else:
        lm.set_attn_implementation(name)


def use_top_theta(model) -> None:
    """Switch ``model`` (its language model) to ``attn_implementation="top_theta"``; ``ValueError`` when it cannot.

    transformers only logs a warning (and keeps the old implementation) for models whose attention does not go
    through ``AttentionInterface``, which would silently leave them dense: that is turned into an error here.
    """
    ensure_registered()
    set_attention_implementation(model, BACKEND_NAME)
    if attention_implementation(model) != BACKEND_NAME:
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' AttentionInterface, "
            "so it cannot use attn_implementation='top_theta'"
        )


def configure(model, thresholds: Thresholds | None, *, sdc: str = "exact", sdc_scale: float = 1.0,
              cap: int | None = None, vmc: bool = False, placement=None, backend: str = "auto"):  # fmt: skip
    """Switch a Hugging Face model to Top-θ attention with these thresholds and settings.

    Writes everything to ``config.top_theta`` of the model's (language model's) config, so ``save_pretrained`` /
    ``from_pretrained(dir, attn_implementation="top_theta")`` restores the same behaviour, and sets
    ``attn_implementation="top_theta"`` on the language model. ``thresholds=None`` configures exact dense attention.
    A multimodal wrapper is configured through its language model. Returns the model.

    Raises:
        ValueError: thresholds for another model (layer/head count, model type), ``placement`` different from the
            one the thresholds were calibrated for, an unknown ``sdc``/``backend``, a bad ``sdc_scale`` or ``cap``, or
            ``sdc="calibrated"`` with thresholds that carry no sdc table. TypeError: thresholds of the wrong type.
    """
    _require_transformers()
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        raise TypeError(f"thresholds must be a sparse_attention.Thresholds, got {type(thresholds).__name__}")
    check_choice("sdc", sdc, SDC_MODES)
    check_choice("backend", backend, BACKENDS)
    sdc_scale = check_real("sdc_scale", sdc_scale, minimum=0.0)
    cap = None if cap is None else check_int("cap", cap)
    settings = TopThetaSettings(
        thresholds, sdc=sdc, sdc_scale=sdc_scale, cap=cap, vmc=check_bool("vmc", vmc), backend=backend
    )
    _, config = language_model(model)
    if thresholds is not None:
        thresholds.check_model(config)
        if placement is not None and placement != thresholds.placement:
            raise ValueError(
                f"placement={placement!r} but the thresholds were calibrated for placement={thresholds.placement!r}; "
                "thresholds are in that placement's units (scores or probabilities): calibrate again"
            )
    use_top_theta(model)
    config.top_theta = settings.to_dict()
    return model


def thresholds_of(model) -> Thresholds | None:
    """The thresholds configured on a model (``None`` when it has none)."""
    _, config = language_model(model)
    settings = model_settings(config)
    return None if settings is None else settings.thresholds
