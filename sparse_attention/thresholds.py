"""Calibrated Top-θ thresholds: compact per-(layer, head) tables over row length, their storage and lookup.

A :class:`Thresholds` holds sorted row lengths ``n_points [P]`` and ``theta [L, Hq, P]`` (plus, optionally, the
``"calibrated"`` softmax-denominator table of the same shape). For a row of length n the threshold is linearly
interpolated between the points and clamped at both ends. Attention kernels consume dense per-length tables
``[Hq, T]`` (``T = n_points[-1]``), expanded once per (layer, device) by :meth:`Thresholds.table`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .validation import PLACEMENTS, check_choice, check_int

FORMAT_VERSION = 1


@dataclass
class Thresholds:
    """Per-(layer, head) thresholds as a function of the row length n.

    Attributes:
        n_points: int64 ``[P]``, strictly increasing row lengths >= 1.
        theta: float32 ``[L, Hq, P]``: scores (placement "pre") or probabilities ("post") at those lengths.
        k: the top-k target the thresholds were calibrated for; rows with ``n <= k`` are never pruned.
        placement: ``"pre"`` or ``"post"``.
        dense_layers: layers that are never pruned.
        sdc_table: optional float32 ``[L, Hq, P]``: calibration mean of the dropped mass ``Σ exp(s - m)``.
        sigma: the ``mean + sigma · std`` factor used at calibration (recorded for reference).
        model_type, num_layers, num_heads: what model the thresholds were calibrated on (for checks).
    """

    n_points: torch.Tensor
    theta: torch.Tensor
    k: int
    placement: str = "pre"
    dense_layers: tuple[int, ...] = (0, 1)
    sdc_table: torch.Tensor | None = None
    sigma: float = 0.1
    model_type: str | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.n_points = torch.as_tensor(self.n_points, dtype=torch.int64).cpu()
        self.theta = torch.as_tensor(self.theta, dtype=torch.float32).cpu()
        if self.sdc_table is not None:
            self.sdc_table = torch.as_tensor(self.sdc_table, dtype=torch.float32).cpu()
        check_choice("placement", self.placement, PLACEMENTS)
        check_int("k", self.k)
        if self.n_points.dim() != 1 or self.n_points.numel() == 0:
            raise ValueError(f"n_points must be a non-empty 1-D tensor, got shape {tuple(self.n_points.shape)}")
        if (self.n_points < 1).any() or (self.n_points[1:] <= self.n_points[:-1]).any():
            raise ValueError("n_points must be strictly increasing row lengths >= 1")
        if self.theta.dim() != 3 or self.theta.shape[2] != self.n_points.numel():
            raise ValueError(
                f"theta must be [L, Hq, P] with P = len(n_points) = {self.n_points.numel()}, "
                f"got {tuple(self.theta.shape)}"
            )
        if torch.isnan(self.theta).any():
            raise ValueError("theta contains NaN")
        if self.sdc_table is not None and self.sdc_table.shape != self.theta.shape:
            raise ValueError(
                f"sdc_table shape {tuple(self.sdc_table.shape)} must equal theta's {tuple(self.theta.shape)}"
            )
        self.dense_layers = tuple(int(i) for i in self.dense_layers)

    @property
    def num_layers(self) -> int:
        return self.theta.shape[0]

    @property
    def num_heads(self) -> int:
        return self.theta.shape[1]

    def is_dense(self, layer: int) -> bool:
        return layer in self.dense_layers

    def _expand(self, values: torch.Tensor) -> torch.Tensor:
        """Interpolate ``[Hq, P]`` point values to ``[Hq, T]`` for ``n = 1..T``, clamped at the ends."""
        pts = self.n_points.double()
        n = torch.arange(1, int(self.n_points[-1]) + 1, dtype=torch.float64)
        if pts.numel() == 1:
            return values.double()[:, :1].expand(-1, n.numel()).float().contiguous()
        idx = torch.searchsorted(pts, n).clamp(1, pts.numel() - 1)
        lo, hi = pts[idx - 1], pts[idx]
        w = ((n - lo) / (hi - lo)).clamp(0.0, 1.0)
        v = values.double()
        out = v[:, idx - 1] * (1 - w) + v[:, idx] * w
        return out.float().contiguous()

    def table(self, layer: int, device=None) -> torch.Tensor:
        """Dense threshold table ``[Hq, T]`` of ``layer`` for the kernels (cached per device)."""
        return self._cached("theta", layer, device, self.theta)

    def sdc(self, layer: int, device=None) -> torch.Tensor:
        """Dense ``"calibrated"`` compensation table ``[Hq, T]`` of ``layer``; raises when there is none."""
        if self.sdc_table is None:
            raise ValueError("these thresholds have no sdc table; calibrate again to use sdc='calibrated'")
        return self._cached("sdc", layer, device, self.sdc_table)

    def _cached(self, what: str, layer: int, device, source: torch.Tensor) -> torch.Tensor:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range for thresholds of {self.num_layers} layers")
        key = (what, layer, str(torch.device(device) if device is not None else "cpu"))
        if key not in self._cache:
            self._cache[key] = self._expand(source[layer]).to(device or "cpu")
        return self._cache[key]

    def value_at(self, layer: int, head: int, n: int) -> float:
        """Threshold of one (layer, head) at row length ``n`` (interpolated and clamped)."""
        t = self.table(layer)
        return float(t[head, min(max(n, 1), t.shape[1]) - 1])

    # ---- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serialisable form (stored in ``model.config.top_theta["thresholds"]``)."""
        d = {
            "version": FORMAT_VERSION,
            "k": self.k,
            "placement": self.placement,
            "dense_layers": list(self.dense_layers),
            "sigma": self.sigma,
            "model_type": self.model_type,
            "n_points": self.n_points.tolist(),
            "theta": self.theta.tolist(),
        }
        if self.sdc_table is not None:
            d["sdc_table"] = self.sdc_table.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Thresholds:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on a malformed or newer-format dict."""
        if not isinstance(d, dict) or "theta" not in d or "n_points" not in d:
            raise ValueError("not a Top-θ thresholds record (missing 'theta' or 'n_points')")
        if d.get("version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"thresholds format version {d['version']} is newer than this package supports")
        return cls(
            n_points=torch.tensor(d["n_points"], dtype=torch.int64),
            theta=torch.tensor(d["theta"], dtype=torch.float32),
            k=int(d["k"]),
            placement=d.get("placement", "pre"),
            dense_layers=tuple(d.get("dense_layers", ())),
            sdc_table=None if d.get("sdc_table") is None else torch.tensor(d["sdc_table"], dtype=torch.float32),
            sigma=float(d.get("sigma", 0.1)),
            model_type=d.get("model_type"),
        )

    def save(self, path) -> Path:
        """Write a ``.safetensors`` file: the tables as tensors, the settings as JSON metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {k: v for k, v in self.to_dict().items() if k not in ("n_points", "theta", "sdc_table")}
        tensors = {"n_points": self.n_points.contiguous(), "theta": self.theta.contiguous()}
        if self.sdc_table is not None:
            tensors["sdc_table"] = self.sdc_table.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"top_theta": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path) -> Thresholds:
        """Read a file written by :meth:`save`; raises ``ValueError`` when it is missing or not a thresholds file."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"thresholds file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("top_theta", "null"))
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
        if not isinstance(meta, dict) or "theta" not in tensors or "n_points" not in tensors:
            raise ValueError(f"{path} is not a Top-θ thresholds file (no 'top_theta' metadata or tables)")
        return cls.from_dict({**meta, **{k: v.tolist() for k, v in tensors.items()}})

    def check_model(self, config) -> None:
        """Raise ``ValueError`` when these thresholds do not fit a model with this Hugging Face ``config``."""
        layers = getattr(config, "num_hidden_layers", None)
        heads = getattr(config, "num_attention_heads", None)
        if layers is not None and layers != self.num_layers:
            raise ValueError(f"thresholds are for {self.num_layers} layers but the model has {layers}")
        if heads is not None and heads != self.num_heads:
            raise ValueError(f"thresholds are for {self.num_heads} heads per layer but the model has {heads}")
        mt = getattr(config, "model_type", None)
        if self.model_type and mt and mt != self.model_type:
            raise ValueError(f"thresholds were calibrated on a {self.model_type!r} model, not {mt!r}")
