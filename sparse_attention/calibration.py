"""Threshold calibration: run a model on calibration text and record, per (layer, head, row length n), the
(k+1)-th largest visible score of each sampled row (placement "post": probability).

θ for a row length is ``mean + sigma · std`` of the records, pooled into ``num_points`` row-length bins spaced
geometrically from ``k + 1`` to the longest row seen. With ``topk_at_calibration`` (default) each layer applies
exact top-k attention while calibrating, so deeper layers see already-pruned inputs. The ``"calibrated"``
denominator table records the mean mass that top-k drops, ``Σ_{j not in top-k} exp(s_j - m)``: the mass the
thresholds are calibrated to remove.
"""

from __future__ import annotations

import math

import torch

from .hooks import ModelContext
from .reference import _row_chunks, grouped_pv, grouped_scores, kth_largest_visible, topk_mask, visible_keys
from .thresholds import Thresholds
from .validation import PLACEMENTS, check_choice, check_int


class Calibrator(ModelContext):
    """Takes over the attention of a model while calibrating (see :func:`calibrate`)."""

    def __init__(self, model, *, k: int, placement: str, dense_layers, topk_at_calibration: bool, max_rows):
        super().__init__(model, switch=True)
        cfg = model.config
        self.k = k
        self.placement = placement
        self.dense_layers = tuple(dense_layers)
        self.topk = topk_at_calibration
        self.max_rows = max_rows
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self._cap = 0
        shape = (self.num_layers, self.num_heads, 0)
        self.count = torch.zeros(shape, dtype=torch.float64)
        self.total = torch.zeros(shape, dtype=torch.float64)
        self.total_sq = torch.zeros(shape, dtype=torch.float64)
        self.dropped = torch.zeros(shape, dtype=torch.float64)

    def _grow(self, n_max: int) -> None:
        if n_max < self._cap:
            return
        cap = max(64, 1 << math.ceil(math.log2(n_max + 1)))
        pad = cap - self._cap
        for name in ("count", "total", "total_sq", "dropped"):
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, t.new_zeros(self.num_layers, self.num_heads, pad)], dim=-1))
        self._cap = cap

    def _record(self, layer: int, n: torch.Tensor, value: torch.Tensor, dropped: torch.Tensor) -> None:
        """Add per-row records; all arguments ``[B, Hq, M]``, only rows with ``n > k`` count."""
        sel = n > self.k
        if not bool(sel.any()):
            return
        self._grow(int(n.max()))
        heads = torch.arange(self.num_heads, device=n.device)[None, :, None].expand_as(n)
        h, nn_ = heads[sel].cpu(), n[sel].cpu().long()
        val, drop = value[sel].double().cpu(), dropped[sel].double().cpu()
        flat = h * self._cap + nn_
        for name, src in (("count", torch.ones_like(val)), ("total", val), ("total_sq", val * val), ("dropped", drop)):
            getattr(self, name)[layer].view(-1).index_add_(0, flat, src)

    def attend(self, module, query, key, value, attn_mask, causal, q_offset, scale) -> torch.Tensor:
        """Record this layer's rows and return its attention output (exact top-k or dense) ``[B, Hq, Lq, D]``."""
        layer = module.layer_idx
        b, hq, lq, d = query.shape
        lk = key.shape[2]
        out = torch.empty(b, hq, lq, d, dtype=torch.float32, device=query.device)
        sample = None
        if self.max_rows is not None and lq > self.max_rows:
            sample = torch.zeros(lq, dtype=torch.bool, device=query.device)
            sample[torch.linspace(0, lq - 1, self.max_rows, device=query.device).round().long()] = True
        for start, stop in _row_chunks(query.shape, lk):
            s = grouped_scores(query[:, :, start:stop], key, scale)
            vis = visible_keys(b, hq, start, stop, lk, causal, q_offset, attn_mask, query.device)
            n = vis.sum(-1)
            s_vis = s.masked_fill(~vis, float("-inf"))
            m = s_vis.amax(-1, keepdim=True).masked_fill((n == 0)[..., None], 0.0)
            e = torch.exp(s_vis - m)
            top = topk_mask(s, vis, self.k)
            if self.placement == "pre":
                rec = kth_largest_visible(s, vis, self.k + 1)
            else:
                p = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
                rec = kth_largest_visible(p, vis, self.k + 1)
            dropped = e.masked_fill(top, 0.0).sum(-1)
            rec_n = n if sample is None else n.masked_fill(~sample[start:stop][None, None, :], 0)
            self._record(layer, rec_n, rec, dropped)
            keep = top if (self.topk and layer not in self.dense_layers) else vis
            w = e.masked_fill(~keep, 0.0)
            w = w / w.sum(-1, keepdim=True).masked_fill((n == 0)[..., None], 1.0)
            out[:, :, start:stop] = grouped_pv(w, value)
        return out.to(query.dtype)

    def thresholds(self, sigma: float, num_points: int) -> Thresholds:
        """Pool the records into ``num_points`` row-length bins and build the :class:`Thresholds`."""
        seen = (self.count.sum(dim=(0, 1)) > 0).nonzero().flatten()
        if seen.numel() == 0:
            raise ValueError(
                f"calibration saw no row longer than k={self.k}: use longer calibration sequences or a smaller k"
            )
        lo, hi = int(seen.min()), int(seen.max())
        pts = torch.unique(torch.logspace(math.log10(lo), math.log10(hi), num_points).round().long().clamp(lo, hi))
        # Each observed length goes to the nearest point in log space.
        lengths = seen.double()
        nearest = (lengths.log()[:, None] - pts.double().log()[None, :]).abs().argmin(1)
        pooled = {}
        for name in ("count", "total", "total_sq", "dropped"):
            src = getattr(self, name)[..., seen]
            pooled[name] = torch.zeros(self.num_layers, self.num_heads, pts.numel(), dtype=torch.float64)
            pooled[name].index_add_(2, nearest, src)
        cnt = pooled["count"].clamp_min(1)
        mean = pooled["total"] / cnt
        var = (pooled["total_sq"] / cnt - mean * mean).clamp_min(0)
        theta = mean + sigma * var.sqrt()
        return Thresholds(
            n_points=pts,
            theta=theta.float(),
            k=self.k,
            placement=self.placement,
            dense_layers=self.dense_layers,
            sdc_table=(pooled["dropped"] / cnt).float(),
            sigma=sigma,
            model_type=getattr(self.model.config, "model_type", None),
        )


def _as_inputs(batch, device) -> dict:
    if isinstance(batch, torch.Tensor):
        ids = batch if batch.dim() == 2 else batch[None]
        return {"input_ids": ids.to(device)}
    if isinstance(batch, dict) and "input_ids" in batch:
        return {name: (t.to(device) if isinstance(t, torch.Tensor) else t) for name, t in batch.items()}
    raise TypeError(f"batches must yield input_ids tensors or dicts of model inputs, got {type(batch).__name__}")


def calibrate(
    model,
    batches,
    *,
    k: int,
    placement: str = "pre",
    sigma: float = 0.1,
    dense_layers=(0, 1),
    topk_at_calibration: bool = True,
    max_rows: int | None = None,
    num_points: int = 16,
    progress: bool = True,
) -> Thresholds:
    """Calibrate Top-θ thresholds for ``model`` on ``batches``.

    Args:
        model: a Hugging Face causal LM whose attention goes through ``AttentionInterface`` (GPT-2, Llama, ...).
        batches: iterable of ``input_ids`` tensors ``[B, L]`` (or ``[L]``) or dicts of model inputs (with
            ``attention_mask`` for padded batches).
        k: the target number of kept keys per row; rows with ``n <= k`` are never pruned.
        placement: ``"pre"`` (thresholds on scores) or ``"post"`` (on softmax probabilities).
        sigma: θ = mean + sigma · std of the recorded (k+1)-th largest values (default 0.1).
        dense_layers: layers never pruned (default the first two).
        topk_at_calibration: apply exact top-k in the pruned layers while calibrating (default True).
        max_rows: record at most this many evenly spaced query rows per sequence (default: all rows).
        num_points: row-length points of the compact table (default 16).
        progress: show a progress bar.

    Returns:
        :class:`Thresholds` (with a ``"calibrated"`` sdc table).

    Raises:
        ValueError: ``k < 1``, an unknown placement, a model without layer/head counts, or calibration text with no
        row longer than ``k``.
    """
    check_int("k", k)
    check_choice("placement", placement, PLACEMENTS)
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows!r}")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "num_hidden_layers", None) is None or getattr(cfg, "num_attention_heads", None) is None:
        raise ValueError("model.config must give num_hidden_layers and num_attention_heads")
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    calibrator = Calibrator(
        model, k=k, placement=placement, dense_layers=dense_layers, topk_at_calibration=topk_at_calibration,
        max_rows=max_rows,
    )  # fmt: skip
    try:
        with calibrator, torch.no_grad():
            for batch in tqdm(batches, desc=f"calibrating (k={k})", disable=not progress, leave=False):
                model(**_as_inputs(batch, device), use_cache=False)
    finally:
        model.train(was_training)
    return calibrator.thresholds(sigma, num_points)
