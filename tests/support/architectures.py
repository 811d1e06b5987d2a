"""Tiny random-weight Hugging Face decoders, one per architecture the ``top_theta`` backend must support.

``model, info = make("gemma2")`` (or ``make_gemma2()``) builds a float32, eval-mode model from a fixed seed (the
global RNG is left untouched). ``info`` holds what a test needs to know about it (see :class:`ArchInfo`).
Imports only torch and transformers; works on transformers 5.17 and 5.24. An architecture the installed
transformers lacks raises :class:`ArchitectureUnavailable` (an ``ImportError``); :func:`make_or_skip` turns that
into ``pytest.skip``. ``batch(info)`` builds a left-padded ``input_ids`` / ``attention_mask`` batch.

Dims are legal minima: hidden 64, 4 heads of 16 (2 kv heads where GQA exists), 2 layers (gemma3: 4), vocab 100,
sliding windows of 8 (shorter than the 12-token test sequences), MoE with 4 experts and 2 per token.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import torch
import transformers

VOCAB = 100
# fmt: off
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GEMMA = dict(_BASE, head_dim=16, query_pre_attn_scalar=16, sliding_window=8)
# fmt: on


class ArchitectureUnavailable(ImportError):
    """The installed transformers has no such architecture (or no such config/model class)."""


@dataclasses.dataclass
class ArchInfo:
    name: str
    model_type: str
    num_layers: int  # decoder layers of the language model
    num_heads: int  # query heads (Hq)
    num_kv_heads: int  # key/value heads as passed to the attention function (Hkv)
    qk_head_dim: int  # D of query and key
    v_head_dim: int  # Dv of value (!= qk_head_dim only for MLA, i.e. deepseek_v3)
    vocab_size: int
    sliding_window: int | None = None  # window of the sliding layers (None: no sliding layer)
    sliding_layers: tuple[int, ...] = ()  # layer_idx of the layers that use the window
    softcap: float | None = None  # passed as softcap=... (gemma3 ignores attn_logit_softcapping: always None)
    has_sinks: bool = False  # passes per-head attention sinks as s_aux=module.sinks
    is_wrapper: bool = False  # a multimodal wrapper around a language model
    language_model_path: str = ""  # dotted path from the top model to the text decoder ("" = the model itself)
    text_config_path: str = ""  # dotted path from model.config to the config the text attention modules hold
    # False (falcon): make(attn_implementation=<custom>) raises KeyError; set_attn_implementation(<custom>) only
    # logs a warning and keeps the old implementation
    uses_attention_interface: bool = True
    supports_static_cache: bool = True  # generate(cache_implementation="static") works (measured: all, 5.17 + 5.24)
    extra: dict = dataclasses.field(default_factory=dict)  # e.g. image_token_id, pixel shape for wrappers


@dataclasses.dataclass
class _Spec:
    module: str  # transformers.models.<module>
    config_cls: str
    model_cls: str
    config: dict
    info: dict
    sub: dict | None = None  # wrapper: {field: (config_cls, kwargs)}


# fmt: off
_SPECS = {
    "gpt2": _Spec("gpt2", "GPT2Config", "GPT2LMHeadModel",
                  dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0),
                  dict(num_kv_heads=4)),
    "llama": _Spec("llama", "LlamaConfig", "LlamaForCausalLM", dict(_BASE), {}),
    "mistral": _Spec("mistral", "MistralConfig", "MistralForCausalLM", dict(_BASE, sliding_window=8),
                     dict(sliding_window=8, sliding_layers=(0, 1))),
    "qwen2": _Spec("qwen2", "Qwen2Config", "Qwen2ForCausalLM", dict(_BASE), {}),
    "gemma2": _Spec("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
                    dict(_GEMMA, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
                    dict(sliding_window=8, sliding_layers=(0,), softcap=50.0)),
    "gemma3": _Spec("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(_GEMMA, num_hidden_layers=4,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
                    dict(sliding_window=8, sliding_layers=(0, 2))),
    "phi3": _Spec("phi3", "Phi3Config", "Phi3ForCausalLM", dict(_BASE), {}),
    "gpt_neox": _Spec("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM",
                      {k: v for k, v in _BASE.items() if k != "num_key_value_heads"}, dict(num_kv_heads=4)),
    "gpt_oss": _Spec("gpt_oss", "GptOssConfig", "GptOssForCausalLM",
                     dict(_BASE, head_dim=16, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                          max_position_embeddings=131072, sliding_window=8,
                          layer_types=["sliding_attention", "full_attention"]),
                     dict(sliding_window=8, sliding_layers=(0,), has_sinks=True)),
    "deepseek_v3": _Spec("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM",
                         dict(_BASE, num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=4,
                              n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                              first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8,
                              qk_nope_head_dim=16, v_head_dim=16),
                         dict(num_kv_heads=4, qk_head_dim=24, v_head_dim=16)),
    "llava": _Spec("llava", "LlavaConfig", "LlavaForConditionalGeneration",
                   dict(image_token_index=99, projector_hidden_act="gelu", vision_feature_layer=-1,
                        vision_feature_select_strategy="default", image_seq_length=16),
                   dict(is_wrapper=True, language_model_path="model.language_model", text_config_path="text_config",
                        extra=dict(image_token_id=99, image_tokens=16, pixel_shape=(3, 16, 16),
                                   vision_path="model.vision_tower")),
                   sub=dict(text_config=("LlamaConfig", dict(_BASE, vocab_size=VOCAB)),
                            vision_config=("CLIPVisionConfig",
                                           dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=16, patch_size=4,
                                                projection_dim=32)))),
    # ---- extras ----
    "granite": _Spec("granite", "GraniteConfig", "GraniteForCausalLM",
                     dict(_BASE, attention_multiplier=0.125, embedding_multiplier=2.0, residual_multiplier=0.5,
                          logits_scaling=2.0), {}),
    "cohere": _Spec("cohere", "CohereConfig", "CohereForCausalLM", dict(_BASE), {}),
    "olmo2": _Spec("olmo2", "Olmo2Config", "Olmo2ForCausalLM", dict(_BASE), {}),
    "starcoder2": _Spec("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", dict(_BASE, sliding_window=8),
                        dict(sliding_window=8, sliding_layers=(0, 1))),
    "falcon": _Spec("falcon", "FalconConfig", "FalconForCausalLM",
                    dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         new_decoder_architecture=True, num_kv_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
                    dict(uses_attention_interface=False)),
}
# fmt: on
NAMES = tuple(_SPECS)
CORE = NAMES[: NAMES.index("llava") + 1]  # the architectures the brief requires; the rest are extras


def _cls(module: str, name: str):
    try:
        mod = importlib.import_module(f"transformers.models.{module}")
        return getattr(mod, name)
    except (ImportError, AttributeError) as exc:
        raise ArchitectureUnavailable(
            f"transformers {transformers.__version__} has no {module}.{name}: architecture {module!r} unavailable"
        ) from exc


def available(name: str) -> bool:
    spec = _SPECS[name]
    try:
        _cls(spec.module, spec.config_cls), _cls(spec.module, spec.model_cls)
    except ArchitectureUnavailable:
        return False
    return True


def make_config(name: str, **overrides):
    """The tiny config of ``name``; ``overrides`` replace config fields (of the text config for a wrapper;
    ``vision_config=dict(...)`` updates the vision config)."""
    if name not in _SPECS:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(NAMES)}")
    spec = _SPECS[name]
    config_cls = _cls(spec.module, spec.config_cls)
    if spec.sub is None:
        return config_cls(**{**spec.config, **overrides})
    vision_over = overrides.pop("vision_config", {})
    subs = {}
    for field, (cls_name, kwargs) in spec.sub.items():
        sub_cls = getattr(transformers, cls_name)
        subs[field] = sub_cls(**{**kwargs, **(overrides if field == "text_config" else vision_over)})
    return config_cls(**spec.config, **subs)


def _text_config(config, path: str):
    for part in filter(None, path.split(".")):
        config = getattr(config, part)
    return config


def _info(name: str, config) -> ArchInfo:
    spec = _SPECS[name]
    text = _text_config(config, spec.info.get("text_config_path", ""))
    n_heads = getattr(text, "num_attention_heads", None) or text.n_head
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
    kv = getattr(text, "num_key_value_heads", None) or getattr(text, "num_kv_heads", None) or n_heads
    fields = dict(
        name=name,
        model_type=config.model_type,
        num_layers=text.num_hidden_layers,
        num_heads=n_heads,
        num_kv_heads=kv,
        qk_head_dim=head_dim,
        v_head_dim=head_dim,
        vocab_size=text.vocab_size,
    )
    fields.update(spec.info)
    if "sliding_window" in spec.info:  # follow overrides of the window
        fields["sliding_window"] = getattr(text, "sliding_window", None)
    if "softcap" in spec.info:
        fields["softcap"] = getattr(text, "attn_logit_softcapping", None)
    if name == "deepseek_v3":
        fields.update(qk_head_dim=text.qk_nope_head_dim + text.qk_rope_head_dim, v_head_dim=text.v_head_dim)
    layer_types = getattr(text, "layer_types", None)
    if layer_types and fields.get("sliding_window"):
        fields["sliding_layers"] = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    if not fields.get("sliding_window"):
        fields["sliding_layers"] = ()
    return ArchInfo(**fields)


def make(name: str, *, attn_implementation: str = "eager", seed: int = 0, init_std: float | None = None, **overrides):
    """Build ``(model, info)``: the tiny random ``name`` model in float32 and eval mode, weights from ``seed``.

    ``attn_implementation`` is applied at construction (any name registered with ``AttentionInterface``);
    ``init_std`` overrides ``initializer_range`` (larger = peakier attention); other keywords override config fields.
    """
    config = make_config(name, **overrides)  # KeyError for an unknown name
    spec = _SPECS[name]
    if init_std is not None:
        for c in (config, _text_config(config, spec.info.get("text_config_path", ""))):
            c.initializer_range = init_std
    model_cls = _cls(spec.module, spec.model_cls)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.float().eval(), _info(name, config)


def make_or_skip(name: str, **kwargs):
    """:func:`make`, calling ``pytest.skip`` when the installed transformers lacks the architecture."""
    try:
        return make(name, **kwargs)
    except ArchitectureUnavailable as exc:
        import pytest

        pytest.skip(str(exc))


def submodule(model, path: str):
    """``model`` followed along a dotted ``path`` (e.g. ``info.language_model_path``)."""
    for part in filter(None, path.split(".")):
        model = getattr(model, part)
    return model


def batch(info: ArchInfo, batch_size: int = 2, seq: int = 12, pad: int = 3, seed: int = 0, image: bool = False):
    """``dict(input_ids, attention_mask)`` of random tokens; row 0 is left-padded by ``pad`` tokens.

    ``image=True`` (wrappers) puts the image placeholder tokens right after the padding and adds ``pixel_values``;
    ``seq`` then counts the text tokens only.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, info.vocab_size - 1, (batch_size, seq), generator=gen)  # avoid pad/bos/eos/image ids
    if image:
        img = torch.full((batch_size, info.extra["image_tokens"]), info.extra["image_token_id"])
        ids = torch.cat([img, ids], dim=1)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, :pad] = 0
        ids[0, :pad] = 0
        if image:  # keep every image token: shift them right of the padding
            ids[0, pad : pad + info.extra["image_tokens"]] = info.extra["image_token_id"]
    out = dict(input_ids=ids, attention_mask=mask)
    if image:
        out["pixel_values"] = torch.randn(batch_size, *info.extra["pixel_shape"], generator=gen)
    return out


def valid_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, L]``: positions whose logits are meaningful (not padding)."""
    return attention_mask.bool()


for _name in NAMES:
    globals()[f"make_{_name}"] = functools.partial(make, _name)
