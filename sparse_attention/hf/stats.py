"""Observing what a ``top_theta`` model keeps, and the exact top-k baseline it is measured against.

:func:`collect_stats` counts kept and visible attention elements per (layer, head) in prefill, and kept V rows per
kv head in decode steps; :class:`TopKAttention` replaces every non-dense layer's attention by exact top-k. Both are
model contexts of the backend (:class:`~sparse_attention.hf.backend.ModelContext`). Counts accumulate on the
device; they are read when a report is asked for.
"""

from __future__ import annotations

import torch

from ..ops import reference
from ..ops.attention import run
from ..ops.contract import DEFAULT_DENSE_LAYERS, AttentionCall, check_int
from .backend import ModelContext


class StatsCollector(ModelContext):
    """Accumulates kept/visible counts of every ``top_theta`` attention call (see :func:`collect_stats`)."""

    wants_stats = True

    def __init__(self, model, k: int | None = None):
        super().__init__(model, switch=False)
        if k is not None:
            check_int("k", k)
        self.k = k
        self._over_k: list[torch.Tensor] = []  # (rows longer than k, their kept count) per pruned prefill call
        self.prefill_kept: dict[int, torch.Tensor] = {}
        self.prefill_visible: dict[int, torch.Tensor] = {}
        self.decode_kept_v: dict[int, torch.Tensor] = {}
        self.decode_visible_v: dict[int, torch.Tensor] = {}
        self.dense_layers: set[int] = set()

    def observe(self, module, call: AttentionCall, out, stats, dense: bool) -> None:
        if stats is None:
            return
        layer = module.layer_idx
        if dense:
            self.dense_layers.add(layer)
        if call.query.shape[2] == 1 and stats.kept_v_rows is not None:
            # The visible keys of a decode row are the same for every head of a kv group.
            n = stats.visible[:, :: call.groups, 0].sum(dtype=torch.int64)
            self._add(self.decode_kept_v, layer, stats.kept_v_rows.sum(dtype=torch.int64))
            self._add(self.decode_visible_v, layer, n)
            return
        if self.k is not None and not dense:
            long_rows = stats.visible > self.k
            self._over_k.append(torch.stack([long_rows.sum(), (stats.kept * long_rows).sum()]).to(torch.int64))
        self._add(self.prefill_kept, layer, stats.kept.sum(dim=(0, 2), dtype=torch.int64))
        self._add(self.prefill_visible, layer, stats.visible.sum(dim=(0, 2), dtype=torch.int64))

    @staticmethod
    def _add(store: dict, layer: int, value: torch.Tensor) -> None:
        store[layer] = store[layer] + value if layer in store else value

    def kept_fraction_per_head(self) -> dict[int, list[float]]:
        """Prefill kept-element fraction per layer and head."""
        return {
            layer: (self.prefill_kept[layer].double() / self.prefill_visible[layer].clamp_min(1).double()).tolist()
            for layer in sorted(self.prefill_kept)
        }

    def kept_fraction_per_layer(self) -> dict[int, float]:
        return {
            layer: float(self.prefill_kept[layer].sum()) / max(1.0, float(self.prefill_visible[layer].sum()))
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
        vis = sum(float(self.decode_visible_v[i]) for i in layers)
        return sum(float(self.decode_kept_v[i]) for i in layers) / vis if vis else None

    def kept_v_fraction_per_layer(self) -> dict[int, float]:
        return {
            i: float(self.decode_kept_v[i]) / max(1.0, float(self.decode_visible_v[i]))
            for i in sorted(self.decode_kept_v)
        }

    def kept_per_k(self) -> float | None:
        """Mean kept count of the pruned layers' rows longer than ``k``, divided by ``k`` (1.0 = exactly top-k)."""
        if self.k is None or not self._over_k:
            return None
        rows, kept = (int(x) for x in torch.stack(self._over_k).sum(0))
        return kept / rows / self.k if rows else None

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


def collect_stats(model, k: int | None = None) -> StatsCollector:
    """Context manager collecting how much attention a ``top_theta`` model keeps.

    With ``k`` it also measures ``kept_per_k()``: the mean kept count of pruned rows longer than k, over k.

    ``with collect_stats(model) as st: model(**batch)`` then ``st.kept_fraction()`` (prefill, kept over visible
    elements), ``st.kept_fraction_per_head()``, ``st.kept_v_fraction()`` (decode steps: V rows loaded over visible
    keys per kv head) or ``st.report()``. Raises ``ValueError`` when the model does not use ``top_theta``.
    """
    return StatsCollector(model, k)


class TopKAttention(ModelContext):
    """Exact top-k attention on every non-dense layer of a model: the quality baseline Top-θ approximates.

    ``with TopKAttention(model, k=16): model(**batch)``; switches the model to ``top_theta`` for the duration. The
    softmax is renormalised over each row's k largest scores (and its sink, when the model has sinks).
    """

    def __init__(self, model, k: int, dense_layers=DEFAULT_DENSE_LAYERS):
        super().__init__(model, switch=True)
        self.k = check_int("k", k)
        self.dense_layers = frozenset(int(i) for i in dense_layers)

    def attend(self, module, call: AttentionCall):
        if module.layer_idx in self.dense_layers:
            out, stats = run(call)
            return out, stats, True
        out, stats = reference.topk(call, self.k)
        return out, stats, False
