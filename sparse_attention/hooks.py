"""Context managers that observe or take over the ``top_theta`` attention calls of one model.

Calibration, statistics collection and condensation training all need to see each attention call of a model
with its layer index. Each is a :class:`ModelContext`: on entry it registers the model's modules, so the
Hugging Face backend can find it with :meth:`ModelContext.active_for` (one dictionary lookup per call), and it
switches the model to ``attn_implementation="top_theta"`` when ``switch=True``, restoring the previous
implementation on exit.
"""

from __future__ import annotations

import weakref

import torch


def attention_implementation(model) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def use_top_theta(model) -> None:
    """Switch ``model`` to ``attn_implementation="top_theta"``; raise ``ValueError`` when it cannot use it.

    transformers only logs a warning (and keeps the old implementation) for models whose attention does not go
    through ``AttentionInterface``, which would silently leave them dense: that is turned into an error here.
    """
    from .hf import BACKEND_NAME, ensure_registered

    ensure_registered()
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise ValueError(f"{type(model).__name__} is not a Hugging Face model with set_attn_implementation")
    setter(BACKEND_NAME)
    if attention_implementation(model) != BACKEND_NAME:
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' AttentionInterface, "
            "so it cannot use attn_implementation='top_theta'"
        )


class ModelContext:
    """Base class: subclasses get their own registry of active contexts keyed by module."""

    _registry: weakref.WeakKeyDictionary

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._registry = weakref.WeakKeyDictionary()

    def __init__(self, model: torch.nn.Module, *, switch: bool = True):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
        self.model = model
        self._switch = switch
        self._previous: str | None = None
        self._modules: list[torch.nn.Module] = []

    def __enter__(self):
        if self._switch and attention_implementation(self.model) != "top_theta":
            self._previous = attention_implementation(self.model)
            use_top_theta(self.model)
        elif attention_implementation(self.model) != "top_theta":
            raise ValueError(
                "the model does not use attn_implementation='top_theta'; load it with that argument or call "
                "sparse_attention.configure(model, thresholds) first"
            )
        for module in self.model.modules():
            if getattr(module, "layer_idx", None) is not None:
                if module in self._registry:
                    raise RuntimeError(f"another {type(self).__name__} is already active on this model")
                self._registry[module] = self
                self._modules.append(module)
        return self

    def __exit__(self, *exc):
        for module in self._modules:
            self._registry.pop(module, None)
        self._modules.clear()
        if self._previous is not None:
            self.model.set_attn_implementation(self._previous)
            self._previous = None
        return False

    @classmethod
    def active_for(cls, module) -> ModelContext | None:
        """The active context of this class registered for ``module``, or ``None``."""
        if not cls._registry:
            return None
        return cls._registry.get(module)
