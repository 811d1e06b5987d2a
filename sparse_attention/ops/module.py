"""A thin ``nn.Module`` for models that do not use transformers: one layer's Top-θ attention, a drop-in for
``torch.nn.functional.scaled_dot_product_attention``.

In a nanoGPT-style block, replace ``F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)`` by
``self.attn_op(q, k, v, is_causal=True, dropout_p=p)`` with ``self.attn_op = TopThetaAttention.from_thresholds(th,
layer)`` (or ``TopThetaAttention()`` for dense attention). In training mode the module computes SDPA itself
(Top-θ pruning is an inference-time transform); in evaluation mode it runs Top-θ attention.
"""

from __future__ import annotations

import torch

from .attention import run
from .contract import BACKENDS, PLACEMENTS, SDC_MODES, check_choice, prepare_call
from .thresholds import Thresholds


class TopThetaAttention(torch.nn.Module):
    """Top-θ attention of one layer with its thresholds and settings (see the module docstring).

    Args:
        theta: ``None`` (dense) or a threshold table as :func:`sparse_attention.top_theta_attention` takes it.
        k_dense, placement, sdc, sdc_table, sdc_scale, cap, vmc, softcap, backend: as there.

    Attributes:
        last_stats: the :class:`~sparse_attention.AttentionStats` of the latest evaluation-mode call when
            ``record_stats`` is True, else ``None``.
    """

    def __init__(self, theta=None, *, k_dense: int = 0, placement: str = "pre", sdc: str = "exact", sdc_table=None,
                 sdc_scale: float = 1.0, cap: int | None = None, vmc: bool = False, softcap: float | None = None,
                 backend: str = "auto", record_stats: bool = False):  # fmt: skip
        super().__init__()
        check_choice("placement", placement, PLACEMENTS)
        check_choice("sdc", sdc, SDC_MODES)
        check_choice("backend", backend, BACKENDS)
        self.register_buffer("theta", None if theta is None else torch.as_tensor(theta, dtype=torch.float32))
        self.register_buffer(
            "sdc_table", None if sdc_table is None else torch.as_tensor(sdc_table, dtype=torch.float32)
        )
        self.k_dense, self.placement, self.sdc, self.sdc_scale = k_dense, placement, sdc, sdc_scale
        self.cap, self.vmc, self.softcap, self.backend = cap, vmc, softcap, backend
        self.record_stats = record_stats
        self.last_stats = None

    @classmethod
    def from_thresholds(cls, thresholds: Thresholds, layer: int, *, sdc: str = "exact", **settings):
        """The module of ``layer`` of calibrated thresholds (dense when the layer is one of their dense layers)."""
        if not isinstance(thresholds, Thresholds):
            raise TypeError(f"thresholds must be a sparse_attention.Thresholds, got {type(thresholds).__name__}")
        if thresholds.is_dense(layer):
            return cls(sdc=sdc, **settings)
        table = thresholds.sdc(layer) if sdc == "calibrated" else None
        return cls(thresholds.table(layer), k_dense=thresholds.k_of(layer), placement=thresholds.placement, sdc=sdc,
                   sdc_table=table, **settings)  # fmt: skip

    def forward(self, query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:  # fmt: skip
        """Arguments as ``torch.nn.functional.scaled_dot_product_attention`` (boolean ``attn_mask``, True = attend;
        ``is_causal`` aligned top-left as SDPA does); returns ``[B, Hq, Lq, Dv]``.

        Raises:
            ValueError: ``dropout_p > 0`` in evaluation mode (pruning and dropout do not combine), and as
            :func:`sparse_attention.top_theta_attention`.
        """
        if self.training:
            gqa = enable_gqa or query.shape[1] != key.shape[1]
            return torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                enable_gqa=gqa,
            )  # fmt: skip
        if dropout_p:
            raise ValueError(f"dropout_p={dropout_p} in evaluation mode; pass dropout_p=0.0 outside training")
        call = prepare_call(
            query, key, value, self.theta, k_dense=self.k_dense, scale=scale, softcap=self.softcap,
            causal=bool(is_causal), q_offset=0, attn_mask=attn_mask, placement=self.placement, sdc=self.sdc,
            sdc_table=self.sdc_table if self.sdc == "calibrated" else None, sdc_scale=self.sdc_scale, cap=self.cap,
            vmc=self.vmc, return_stats=self.record_stats,
        )  # fmt: skip
        out, stats = run(call, self.backend)
        self.last_stats = stats
        return out

    def extra_repr(self) -> str:
        kind = "dense" if self.theta is None else f"theta {tuple(self.theta.shape)}, k_dense={self.k_dense}"
        return f"{kind}, placement={self.placement!r}, sdc={self.sdc!r}, backend={self.backend!r}"
