"""Threshold calibration: run a model on calibration text and record, per (layer, head, row length n), the
(k+1)-th largest visible score of each sampled row (placement "post": probability).

θ for a row length is ``mean + sigma · std`` of the records, pooled into ``num_points`` row-length bins spaced
geometrically from ``k + 1`` to the longest row seen. ``k`` is one int for all layers or one per layer (the authors'
``--layerk``); a layer's ``k_dense`` is its k. With ``topk_at_calibration`` (default) each pruned layer applies exact
top-k attention while calibrating, so deeper layers see already-pruned inputs, exactly as the inference of the
placement computes it: placement "pre" renormalises the softmax over the top-k, placement "post" sets the other
probabilities to zero without renormalising and adds the V-mean term when ``vmc`` is on. The ``"calibrated"``
denominator table records the mean mass that top-k drops, ``Σ_{j not in top-k} exp(s_j - m)``.

Scores are soft-capped, sinks join the row max and the softmax, and a value head dim of its own is carried, all as
the model's own attention computes them.

Under ``torch.distributed`` (``process_group``, see :mod:`sparse_attention.ops.distributed`) each process calibrates
on its own batches and the records (per-(layer, head, n) counts, sums, sums of squares and dropped mass, float64) are
summed across processes before they are pooled, so every process ends with the same thresholds, those of one process
calibrating on the union of the batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import torch

from ..ops import distributed, reference
from ..ops.contract import DEFAULT_DENSE_LAYERS, DEFAULT_SIGMA, PLACEMENTS, AttentionCall, check_choice, check_int
from ..ops.thresholds import Thresholds
from .backend import ModelContext, language_model

_RECORDS = ("count", "total", "total_sq", "dropped")


class Calibrator(ModelContext):
    """Takes over the attention of a model while calibrating (see :func:`calibrate`)."""

    def __init__(self, model, *, k, placement: str, dense_layers, topk_at_calibration: bool, max_rows, vmc: bool):
        super().__init__(model, switch=True)
        _, cfg = language_model(model)
        self.config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.ks = layer_ks(k, self.num_layers)
        self.placement = placement
        self.dense_layers = tuple(dense_layers)
        self.topk = topk_at_calibration
        self.max_rows = max_rows
        self.vmc = vmc
        self._cap = 0
        shape = (self.num_layers, self.num_heads, 0)
        for name in _RECORDS:
            setattr(self, name, torch.zeros(shape, dtype=torch.float64))

    def grow(self, n_max: int) -> None:
        """Make room for records of rows up to ``n_max`` keys (capacity a power of two, at least 64)."""
        if n_max < self._cap:
            return
        cap = max(64, 1 << math.ceil(math.log2(n_max + 1)))
        pad = cap - self._cap
        for name in _RECORDS:
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, t.new_zeros(self.num_layers, self.num_heads, pad)], dim=-1))
        self._cap = cap

    def _record(self, layer: int, k: int, n: torch.Tensor, value: torch.Tensor, dropped: torch.Tensor) -> None:
        """Add per-row records; all arguments ``[B, Hq, M]``, only rows with ``n > k`` count."""
        sel = n > k
        if not bool(sel.any()):
            return
        self.grow(int(n.max()))
        heads = torch.arange(self.num_heads, device=n.device)[None, :, None].expand_as(n)
        h, nn_ = heads[sel].cpu(), n[sel].cpu().long()
        val, drop = value[sel].double().cpu(), dropped[sel].double().cpu()
        flat = h * self._cap + nn_
        for name, src in zip(_RECORDS, (torch.ones_like(val), val, val * val, drop), strict=True):
            getattr(self, name)[layer].view(-1).index_add_(0, flat, src)

    def attend(self, module, call: AttentionCall):
        """Record this layer's rows and return its attention output (exact top-k or dense)."""
        layer = module.layer_idx
        k = self.ks[layer]
        lq = call.query.shape[2]
        sample = None
        if self.max_rows is not None and lq > self.max_rows:
            sample = torch.zeros(lq, dtype=torch.bool, device=call.query.device)
            sample[torch.linspace(0, lq - 1, self.max_rows, device=call.query.device).round().long()] = True

        def observe(st: reference.RowState, keep: torch.Tensor) -> None:
            chunk = st.chunk
            top = keep if pruned else reference.topk_mask(chunk.scores, chunk.visible, k)
            if self.placement == "pre":
                rec = reference.kth_largest_visible(chunk.scores, chunk.visible, k + 1)
            else:
                p = st.e / st.d_all.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
                rec = reference.kth_largest_visible(p, chunk.visible, k + 1)
            dropped = st.e.masked_fill(top, 0.0).sum(-1)
            n = chunk.n
            if sample is not None:
                n = n.masked_fill(~sample[chunk.start : chunk.stop][None, None, :], 0)
            self._record(layer, k, n, rec, dropped)

        pruned = self.topk and layer not in self.dense_layers
        call = replace(call, placement=self.placement, vmc=self.vmc and pruned)
        if pruned:
            out, stats = reference.topk(call, k, observe=observe)
        else:
            out, stats = reference.attend(call, observe=observe)
        return out, stats, not pruned

    def merge(self, group) -> None:
        """Sum the records of every process of ``group`` into this one's (a collective: every process of the group
        calls it; nothing for ``group=None``)."""
        if group is None:
            return
        cap = int(distributed.all_reduce(torch.tensor([self._cap], dtype=torch.int64), group, "max"))
        if cap == 0:
            return  # no process recorded anything; thresholds() says so on every process
        self.grow(cap - 1)  # capacities are powers of two >= 64: this grows to exactly ``cap``
        summed = distributed.all_reduce(torch.stack([getattr(self, name) for name in _RECORDS]), group)
        for name, total in zip(_RECORDS, summed.unbind(0), strict=True):
            setattr(self, name, total.contiguous())

    def state(self) -> dict[str, torch.Tensor]:
        """The records, ``[L, Hq, capacity]`` float64 each (``count``, ``total``, ``total_sq``, ``dropped``)."""
        return {name: getattr(self, name) for name in _RECORDS}

    def thresholds(self, sigma: float, num_points: int) -> Thresholds:
        """Pool the records into ``num_points`` row-length bins and build the :class:`Thresholds`."""
        seen = (self.count.sum(dim=(0, 1)) > 0).nonzero().flatten()
        if seen.numel() == 0:
            raise ValueError(
                f"calibration saw no row longer than k={min(self.ks)}: use longer calibration sequences or a smaller k"
            )
        lo, hi = int(seen.min()), int(seen.max())
        pts = torch.unique(torch.logspace(math.log10(lo), math.log10(hi), num_points).round().long().clamp(lo, hi))
        # Each observed length goes to the nearest point in log space.
        nearest = (seen.double().log()[:, None] - pts.double().log()[None, :]).abs().argmin(1)
        pooled = {}
        for name in _RECORDS:
            src = getattr(self, name)[..., seen]
            pooled[name] = torch.zeros(self.num_layers, self.num_heads, pts.numel(), dtype=torch.float64)
            pooled[name].index_add_(2, nearest, src)
        # Points no record went to (sampled rows skip some lengths) are not points.
        used = pooled["count"].sum(dim=(0, 1)) > 0
        pts = pts[used]
        pooled = {name: t[..., used] for name, t in pooled.items()}
        cnt = pooled["count"].clamp_min(1)
        mean = pooled["total"] / cnt
        var = (pooled["total_sq"] / cnt - mean * mean).clamp_min(0)
        theta = _fill_empty(mean + sigma * var.sqrt(), pooled["count"] > 0)
        pooled["dropped"] = _fill_empty(pooled["dropped"] / cnt, pooled["count"] > 0, 0.0) * cnt
        ks = self.ks if len(set(self.ks)) > 1 else self.ks[0]
        return Thresholds(
            n_points=pts,
            theta=theta.float(),
            k=ks,
            placement=self.placement,
            dense_layers=self.dense_layers,
            sdc_table=(pooled["dropped"] / cnt).float(),
            sigma=sigma,
            model_type=getattr(self.config, "model_type", None),
        )


def _fill_empty(values: torch.Tensor, has: torch.Tensor, none_value: float = float("-inf")) -> torch.Tensor:
    """Give each (layer, head, point) without records the value of its nearest point with records (in index), and
    ``none_value`` where a (layer, head) has no record at all (a layer whose k exceeds every row: keep every key)."""
    p = values.shape[-1]
    idx = torch.arange(p)
    dist = (idx[:, None] - idx[None, :]).abs().double()  # [P, P]
    dist = torch.where(has[..., None, :], dist, torch.full_like(dist, float("inf")))  # [L, H, P, P]
    nearest = dist.argmin(-1)
    filled = values.gather(-1, nearest)
    return torch.where(has.any(-1, keepdim=True), filled, torch.full_like(values, none_value))


def layer_ks(k, num_layers: int) -> tuple[int, ...]:
    """One k per layer from an int or a mapping layer → k (which must name every layer)."""
    if isinstance(k, Mapping):
        missing = [i for i in range(num_layers) if i not in k]
        extra = [i for i in k if not isinstance(i, int) or not 0 <= i < num_layers]
        if missing or extra:
            raise ValueError(
                f"k as a mapping must give each layer 0..{num_layers - 1} a k; missing {missing}, unknown {extra}"
            )
        return tuple(check_int(f"k[{i}]", k[i]) for i in range(num_layers))
    return (check_int("k", k),) * num_layers


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
    k,
    placement: str = "pre",
    sigma: float = DEFAULT_SIGMA,
    dense_layers=DEFAULT_DENSE_LAYERS,
    topk_at_calibration: bool = True,
    vmc: bool = False,
    max_rows: int | None = None,
    num_points: int = 16,
    progress: bool = True,
    process_group="auto",
) -> Thresholds:
    """Calibrate Top-θ thresholds for ``model`` on ``batches``.

    Args:
        model: a Hugging Face causal LM whose attention goes through ``AttentionInterface`` (GPT-2, Llama, ...), or a
            multimodal wrapper (its language model is calibrated).
        batches: iterable of ``input_ids`` tensors ``[B, L]`` (or ``[L]``) or dicts of model inputs (with
            ``attention_mask`` for padded batches). Under a process group: this process's share of the calibration
            batches (:func:`sparse_attention.shard` deals them out); any split works, as every record is summed.
        k: the target number of kept keys per row, an int or a mapping layer → k for every layer; rows with
            ``n <= k`` of their layer are never pruned.
        placement: ``"pre"`` (thresholds on scores) or ``"post"`` (on softmax probabilities).
        sigma: θ = mean + sigma · std of the recorded (k+1)-th largest values (default 0.1).
        dense_layers: layers never pruned (default the first two).
        topk_at_calibration: apply exact top-k in the pruned layers while calibrating (default True).
        vmc: the V-mean compensation the thresholds will be used with (placement "post" adds its term while
            calibrating, as its inference does).
        max_rows: record at most this many evenly spaced query rows per sequence (default: all rows).
        num_points: row-length points of the compact table (default 16).
        progress: show a progress bar (on the process of rank 0 only).
        process_group: ``"auto"`` (default: the default process group when ``torch.distributed`` is initialised with
            several processes, else none), ``None`` (this process alone) or a ``torch.distributed.ProcessGroup``. With
            a group, the records of all its processes are summed (one ``all_reduce``, float64) before they are pooled,
            so every process returns the same thresholds: those of a single process calibrating on the union of the
            batches (equal up to float64 summation order, i.e. to float32 rounding). Every process of the group must
            call :func:`calibrate` with the same settings. A process that passes the same batches as the others adds
            nothing but counts: mean and std are unchanged.

    Returns:
        :class:`Thresholds` (with a ``"calibrated"`` sdc table).

    Raises:
        ValueError: a bad ``k``, an unknown placement, a model without layer/head counts, or calibration text with no
        row longer than ``k`` (on every process), a bad ``process_group``. TypeError: batches of the wrong kind.
    """
    check_choice("placement", placement, PLACEMENTS)
    group = distributed.resolve_group(process_group)
    if max_rows is not None:
        check_int("max_rows", max_rows)
    check_int("num_points", num_points)
    _, cfg = language_model(model)
    if getattr(cfg, "num_hidden_layers", None) is None or getattr(cfg, "num_attention_heads", None) is None:
        raise ValueError("the model's (text) config must give num_hidden_layers and num_attention_heads")
    layer_ks(k, cfg.num_hidden_layers)
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    calibrator = Calibrator(
        model, k=k, placement=placement, dense_layers=dense_layers, topk_at_calibration=topk_at_calibration,
        max_rows=max_rows, vmc=bool(vmc),
    )  # fmt: skip
    try:
        with calibrator, torch.no_grad():
            show = progress and distributed.rank(group) == 0
            for batch in tqdm(batches, desc="calibrating", disable=not show, leave=False):
                model(**_as_inputs(batch, device), use_cache=False)
    finally:
        model.train(was_training)
    calibrator.merge(group)
    return calibrator.thresholds(sigma, num_points)
