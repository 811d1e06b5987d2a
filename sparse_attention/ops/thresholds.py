"""Calibrated Top-θ thresholds and the ``config.top_theta`` schema: tables over row length, storage and lookup.

A :class:`Thresholds` holds sorted row lengths ``n_points [P]`` and ``theta [L, Hq, P]`` (plus, optionally, the
``"calibrated"`` softmax-denominator table of the same shape). For a row of length n the threshold is linearly
interpolated between the points and clamped at both ends; an infinite point is exact at its own n and dominates the
open interval next to it (``0 · ∞ = 0``), so an infinite table never produces NaN. Attention kernels consume dense
per-length tables ``[Hq, T]`` (``T = n_points[-1]``), expanded once per (layer, device) by :meth:`Thresholds.table`.

:class:`TopThetaSettings` is what ``model.config.top_theta`` holds: the thresholds and the inference settings
(``sdc``, ``sdc_scale``, ``cap``, ``vmc``, ``backend``). Both parse strictly: a malformed field raises a ``ValueError``
that names the field (and the file, when there is one), never a bare ``KeyError`` at the first forward.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .contract import BACKENDS, DEFAULT_DENSE_LAYERS, DEFAULT_SIGMA, PLACEMENTS, SDC_MODES
from .files import check_target, write_file

FORMAT_VERSION = 2
# Longest row length a table may name, and most points: the kernels read dense [Hq, n_points[-1]] tables, so these
# bound the memory a (malformed) file can ask for (2**20 rows x 128 heads x 4 bytes = 512 MiB per layer at most).
MAX_ROW_LENGTH = 1 << 20
MAX_POINTS = 4096


def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}" if where else msg)


def _int(where: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        _fail(where, f"'{name}' must be an int >= {minimum}, got {value!r}")
    return int(value)


def _table(where: str, name: str, value, shape: tuple[int, ...] | None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            _fail(where, f"'{name}' must hold real numbers, got dtype {value.dtype}")
        t = value.detach().to("cpu", torch.float32)
    else:
        try:
            t = torch.as_tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            _fail(where, f"'{name}' must be a rectangular nested list of numbers, got {str(value)[:60]!r}")
    if shape is not None and tuple(t.shape) != shape:
        _fail(where, f"'{name}' must have shape {list(shape)}, got {list(t.shape)}")
    return t.contiguous()


@dataclass
class Thresholds:
    """Per-(layer, head) thresholds as a function of the row length n.

    Attributes:
        n_points: int64 ``[P]``, strictly increasing row lengths >= 1.
        theta: float32 ``[L, Hq, P]``: scores (placement "pre") or probabilities ("post") at those lengths; ``-inf``
            keeps every key, ``+inf`` none; never NaN.
        k: the top-k target the thresholds were calibrated for, an int or one int per layer (a tuple of length L or a
            mapping layer → k); rows with ``n <= k`` of their layer are never pruned.
        placement: ``"pre"`` or ``"post"``.
        dense_layers: layers that are never pruned.
        sdc_table: optional float32 ``[L, Hq, P]``, finite and >= 0: calibration mean of the dropped mass
            ``Σ exp(s - m)``.
        sigma: the ``mean + sigma · std`` factor used at calibration (recorded for reference).
        model_type: the ``config.model_type`` of the model calibrated on (for checks).
    """

    n_points: torch.Tensor
    theta: torch.Tensor
    k: int | tuple[int, ...]
    placement: str = "pre"
    dense_layers: tuple[int, ...] = DEFAULT_DENSE_LAYERS
    sdc_table: torch.Tensor | None = None
    sigma: float = DEFAULT_SIGMA
    model_type: str | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self._validate("")

    def _validate(self, where: str) -> None:
        if not isinstance(self.n_points, torch.Tensor) or self.n_points.dtype.is_floating_point:
            try:
                pts = torch.as_tensor(self.n_points)
            except (TypeError, ValueError, RuntimeError):
                _fail(where, f"'n_points' must be a list of ints, got {str(self.n_points)[:60]!r}")
            if pts.dtype.is_floating_point or pts.dtype == torch.bool or pts.is_complex():
                _fail(where, f"'n_points' must hold ints, got dtype {pts.dtype}")
            self.n_points = pts
        self.n_points = self.n_points.to("cpu", torch.int64).contiguous()
        pts = self.n_points
        if pts.dim() != 1 or pts.numel() == 0 or pts.numel() > MAX_POINTS:
            _fail(where, f"'n_points' must be a list of 1..{MAX_POINTS} row lengths, got shape {list(pts.shape)}")
        if (pts < 1).any() or (pts[1:] <= pts[:-1]).any():
            _fail(where, "'n_points' must be strictly increasing row lengths >= 1")
        if int(pts[-1]) > MAX_ROW_LENGTH:
            _fail(where, f"'n_points' ends at {int(pts[-1])}, beyond the supported {MAX_ROW_LENGTH} keys per row")
        self.theta = _table(where, "theta", self.theta, None)
        if self.theta.dim() != 3 or self.theta.shape[2] != pts.numel() or 0 in self.theta.shape[:2]:
            _fail(where, f"'theta' must be [L, Hq, P] with P = len(n_points) = {pts.numel()}, got "
                  f"{list(self.theta.shape)}")  # fmt: skip
        if torch.isnan(self.theta).any():
            _fail(where, "'theta' contains NaN; use -inf to keep every key, +inf to keep none")
        layers = self.theta.shape[0]
        if self.sdc_table is not None:
            self.sdc_table = _table(where, "sdc_table", self.sdc_table, tuple(self.theta.shape))
            if not torch.isfinite(self.sdc_table).all() or (self.sdc_table < 0).any():
                _fail(where, "'sdc_table' must be finite and >= 0 (a mean mass of exponentials)")
        if self.placement not in PLACEMENTS:
            _fail(where, f"'placement' must be one of {PLACEMENTS}, got {self.placement!r}")
        self.k = self._normalise_k(where, self.k, layers)
        if isinstance(self.dense_layers, (str, bytes)) or not hasattr(self.dense_layers, "__iter__"):
            _fail(where, f"'dense_layers' must be a list of layer indices, got {self.dense_layers!r}")
        self.dense_layers = tuple(sorted({_int(where, "dense_layers", i, 0) for i in self.dense_layers}))
        if self.dense_layers == DEFAULT_DENSE_LAYERS:
            # The default, "the first two layers", of a model with fewer layers.
            self.dense_layers = tuple(i for i in DEFAULT_DENSE_LAYERS if i < layers)
        if self.dense_layers and self.dense_layers[-1] >= layers:
            _fail(where, f"'dense_layers' has layer {self.dense_layers[-1]} but the thresholds have {layers} layers")
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, numbers.Real) or not math.isfinite(self.sigma):
            _fail(where, f"'sigma' must be a finite number, got {self.sigma!r}")
        self.sigma = float(self.sigma)
        if self.model_type is not None and not isinstance(self.model_type, str):
            _fail(where, f"'model_type' must be a string or null, got {self.model_type!r}")
        self._cache.clear()

    @staticmethod
    def _normalise_k(where: str, k, layers: int) -> int | tuple[int, ...]:
        if isinstance(k, Mapping):
            missing = [i for i in range(layers) if i not in k]
            if missing or any(not isinstance(i, int) or not 0 <= i < layers for i in k):
                _fail(where, f"'k' as a mapping must give every layer 0..{layers - 1} a k; missing {missing}")
            k = tuple(k[i] for i in range(layers))
        if isinstance(k, (list, tuple)):
            if len(k) != layers:
                _fail(where, f"'k' lists {len(k)} layers but the thresholds have {layers}")
            ks = tuple(_int(where, "k", x, 1) for x in k)
            return ks[0] if len(set(ks)) == 1 else ks
        return _int(where, "k", k, 1)

    @property
    def num_layers(self) -> int:
        return self.theta.shape[0]

    @property
    def num_heads(self) -> int:
        return self.theta.shape[1]

    def k_of(self, layer: int) -> int:
        """The top-k target of ``layer`` (its ``k_dense``)."""
        return self.k if isinstance(self.k, int) else self.k[layer]

    def is_dense(self, layer: int) -> bool:
        return layer in self.dense_layers

    def _expand(self, values: torch.Tensor) -> torch.Tensor:
        """Interpolate ``[Hq, P]`` point values to ``[Hq, T]`` for ``n = 1..T``, clamped at the ends, with
        ``0 · ∞ = 0`` (between two infinite points of opposite sign, the nearer point's value)."""
        pts = self.n_points.double()
        n = torch.arange(1, int(self.n_points[-1]) + 1, dtype=torch.float64)
        v = values.double()
        if pts.numel() == 1:
            return v[:, :1].expand(-1, n.numel()).float().contiguous()
        idx = torch.searchsorted(pts, n).clamp(1, pts.numel() - 1)
        lo, hi = pts[idx - 1], pts[idx]
        w = ((n - lo) / (hi - lo)).clamp(0.0, 1.0)
        v_lo, v_hi = v[:, idx - 1], v[:, idx]
        zero = torch.zeros((), dtype=torch.float64)
        out = torch.where(w == 1, zero, v_lo * (1 - w)) + torch.where(w == 0, zero, v_hi * w)
        out = torch.where(torch.isnan(out), torch.where(w < 0.5, v_lo, v_hi), out)
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
        device = torch.device(device if device is not None else "cpu")
        key = (what, layer, str(device))
        table = self._cache.get(key)
        if table is None:
            table = self._cache[key] = self._expand(source[layer]).to(device)
        return table

    def value_at(self, layer: int, head: int, n: int) -> float:
        """Threshold of one (layer, head) at row length ``n`` (interpolated and clamped)."""
        t = self.table(layer)
        return float(t[head, min(max(n, 1), t.shape[1]) - 1])

    # ---- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serialisable form (stored in ``model.config.top_theta["thresholds"]``); infinities as strings."""
        d = {
            "version": FORMAT_VERSION,
            "k": self.k if isinstance(self.k, int) else list(self.k),
            "placement": self.placement,
            "dense_layers": list(self.dense_layers),
            "sigma": self.sigma,
            "model_type": self.model_type,
            "n_points": self.n_points.tolist(),
            "theta": _json_floats(self.theta),
        }
        if self.sdc_table is not None:
            d["sdc_table"] = self.sdc_table.tolist()
        return d

    @classmethod
    def from_dict(cls, d, where: str = "") -> Thresholds:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming ``where`` and the field on a malformed record."""
        if not isinstance(d, Mapping):
            _fail(where, f"a thresholds record must be a dict, got {type(d).__name__}")
        for name in ("n_points", "theta", "k"):
            if name not in d:
                _fail(where, f"not a Top-θ thresholds record: the field '{name}' is missing")
        version = d.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int):
            _fail(where, f"'version' must be an int, got {version!r}")
        if version > FORMAT_VERSION:
            _fail(where, f"thresholds format version {version} is newer than this package reads ({FORMAT_VERSION})")
        unknown = set(d) - {"version", "k", "placement", "dense_layers", "sigma", "model_type", "n_points", "theta",
                            "sdc_table"}  # fmt: skip
        if unknown:
            _fail(where, f"unknown thresholds fields {sorted(unknown)}")
        dense = d.get("dense_layers", list(DEFAULT_DENSE_LAYERS))
        if not isinstance(dense, (list, tuple)):
            _fail(where, f"'dense_layers' must be a list of layer indices, got {dense!r}")
        k = d["k"]
        if isinstance(k, Mapping):
            try:
                k = {int(i): v for i, v in k.items()}
            except ValueError:
                _fail(where, f"'k' as a mapping must map layer indices to ints, got {k!r}")
        obj = cls.__new__(cls)
        obj.n_points = d["n_points"]
        obj.theta = _parse_floats(where, "theta", d["theta"])
        obj.k = k
        obj.placement = d.get("placement", "pre")
        obj.dense_layers = dense
        obj.sdc_table = None if d.get("sdc_table") is None else d["sdc_table"]
        obj.sigma = d.get("sigma", DEFAULT_SIGMA)
        obj.model_type = d.get("model_type")
        obj._cache = {}
        obj._validate(where)
        return obj

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write a ``.safetensors`` file (the tables as tensors, the settings as JSON metadata), atomically.

        Raises ``ValueError`` when ``path`` exists and is not a thresholds file, unless ``overwrite``.
        """
        from safetensors.torch import save_file

        path = check_target(path, folder=False, ours=is_thresholds_file, what="thresholds file", overwrite=overwrite)
        meta = {k: v for k, v in self.to_dict().items() if k not in ("n_points", "theta", "sdc_table")}
        tensors = {"n_points": self.n_points.contiguous(), "theta": self.theta.contiguous()}
        if self.sdc_table is not None:
            tensors["sdc_table"] = self.sdc_table.contiguous()
        return write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata={"top_theta": json.dumps(meta)}))

    @classmethod
    def load(cls, path) -> Thresholds:
        """Read a file written by :meth:`save`; raises ``ValueError`` naming the file (and the field) when it is
        missing, unreadable or not a valid thresholds file."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"thresholds file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("top_theta")
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
        try:
            meta = json.loads(raw) if raw is not None else None
        except json.JSONDecodeError:
            meta = None
        if not isinstance(meta, dict) or "theta" not in tensors or "n_points" not in tensors:
            raise ValueError(f"{path} is not a Top-θ thresholds file (no 'top_theta' metadata or tables)")
        return cls.from_dict({**meta, **tensors}, where=str(path))

    def check_model(self, config, where: str = "") -> None:
        """Raise ``ValueError`` when these thresholds do not fit a model with this Hugging Face (text) ``config``."""
        layers = getattr(config, "num_hidden_layers", None)
        heads = getattr(config, "num_attention_heads", None)
        if layers is not None and layers != self.num_layers:
            _fail(where, f"the thresholds are for {self.num_layers} layers but the model has {layers}")
        if heads is not None and heads != self.num_heads:
            _fail(where, f"the thresholds are for {self.num_heads} heads per layer but the model has {heads}")
        mt = getattr(config, "model_type", None)
        if self.model_type and mt and mt != self.model_type:
            _fail(where, f"the thresholds were calibrated on a {self.model_type!r} model, not {mt!r}")


def _json_floats(t: torch.Tensor):
    """Nested lists with ±inf written as the strings "inf" / "-inf" (JSON has no infinities)."""
    if not torch.isinf(t).any():
        return t.tolist()

    def conv(x):
        if isinstance(x, list):
            return [conv(y) for y in x]
        return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")

    return conv(t.tolist())


def _parse_floats(where: str, name: str, value):
    if isinstance(value, torch.Tensor):
        return value

    def conv(x):
        if isinstance(x, list):
            return [conv(y) for y in x]
        if x in ("inf", "-inf", "Infinity", "-Infinity"):
            return float("inf") if not x.startswith("-") else float("-inf")
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            _fail(where, f"'{name}' must hold numbers, got {x!r}")
        return x

    return conv(value)


def is_thresholds_file(path) -> bool:
    """Whether ``path`` is a thresholds file written by :meth:`Thresholds.save` (the overwrite check)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return "top_theta" in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


@dataclass
class TopThetaSettings:
    """What ``model.config.top_theta`` holds: the thresholds and the inference settings.

    Attributes:
        thresholds: the calibrated :class:`Thresholds`, or ``None`` for exact dense attention.
        sdc, sdc_scale, cap, vmc: as in :func:`sparse_attention.top_theta_attention`.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.
    """

    thresholds: Thresholds | None
    sdc: str = "exact"
    sdc_scale: float = 1.0
    cap: int | None = None
    vmc: bool = False
    backend: str = "auto"

    def __post_init__(self):
        self._validate("")

    def _validate(self, where: str) -> None:
        w = f"{where}: top_theta" if where else "top_theta"
        if self.sdc not in SDC_MODES:
            _fail(w, f"'sdc' must be one of {SDC_MODES}, got {self.sdc!r}")
        if self.backend not in BACKENDS:
            _fail(w, f"'backend' must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.vmc, bool):
            _fail(w, f"'vmc' must be true or false, got {self.vmc!r}")
        if isinstance(self.sdc_scale, bool) or not isinstance(self.sdc_scale, numbers.Real):
            _fail(w, f"'sdc_scale' must be a number, got {self.sdc_scale!r}")
        if not math.isfinite(self.sdc_scale) or self.sdc_scale < 0:
            _fail(w, f"'sdc_scale' must be a finite number >= 0, got {self.sdc_scale!r}")
        self.sdc_scale = float(self.sdc_scale)
        if self.cap is not None:
            self.cap = _int(w, "cap", self.cap, 1)
        th = self.thresholds
        if th is not None:
            if not isinstance(th, Thresholds):
                _fail(w, f"'thresholds' must be a Thresholds, got {type(th).__name__}")
            if th.placement == "post" and self.sdc != "exact":
                _fail(w, "placement 'post' always normalises by the full softmax denominator; 'sdc' must be 'exact'")
            if self.sdc == "calibrated" and th.sdc_table is None:
                _fail(w, "'sdc' is 'calibrated' but the thresholds carry no sdc table")

    def to_dict(self) -> dict:
        return {
            "sdc": self.sdc,
            "sdc_scale": self.sdc_scale,
            "cap": self.cap,
            "vmc": self.vmc,
            "backend": self.backend,
            "thresholds": None if self.thresholds is None else self.thresholds.to_dict(),
        }

    @classmethod
    def from_dict(cls, d, where: str = "") -> TopThetaSettings:
        """Parse ``config.top_theta``; ``ValueError`` naming ``where`` (e.g. the config file) and the field."""
        w = f"{where}: top_theta" if where else "top_theta"
        if not isinstance(d, Mapping):
            _fail(w, f"must be a dict, got {type(d).__name__}")
        unknown = set(d) - {"sdc", "sdc_scale", "cap", "vmc", "backend", "thresholds"}
        if unknown:
            _fail(w, f"unknown fields {sorted(unknown)}")
        raw = d.get("thresholds")
        obj = cls.__new__(cls)
        obj.thresholds = None if raw is None else Thresholds.from_dict(raw, where=f"{w}.thresholds")
        obj.sdc = d.get("sdc", "exact")
        obj.sdc_scale = d.get("sdc_scale", 1.0)
        obj.cap = d.get("cap")
        obj.vmc = d.get("vmc", False)
        obj.backend = d.get("backend", "auto")
        obj._validate(where)
        return obj
