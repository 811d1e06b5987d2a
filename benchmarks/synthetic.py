"""Benchmark inputs whose attention has real structure, and the thresholds the benchmarks prune them with.

Random Gaussian queries and keys give nearly uniform attention (every score is noise of the same size), which no
threshold can prune without losing most of the softmax mass; timing Top-θ on them says nothing about real models.
This module provides two sources of structured attention:

- :func:`structured_qkv`, a documented synthetic generator. In score units (after the ``D**-0.5`` scale), the
  score of query position i against key position j of one head is the sum of

  - a **local window**: ``A · mean_f cos(ω_f (i - j))`` over ``F`` frequencies log-spaced from ``1/window`` to
    ``OMEGA_MAX`` rad per token, so it equals ``A`` at ``i = j`` and decays to ripples of size ``~A/sqrt(F)`` beyond
    ``~window`` tokens (rotary-style position features);
  - **attention sinks**: ``+S`` on the first ``n_sinks`` keys;
  - **heavy hitters**: ``n_heavy`` random key positions per (batch, kv head) score ``+H · w`` against every query,
    ``w ~ U(0.25, 1)`` per (query, heavy-hitter feature);
  - **segments**: the sequence is cut into segments of random length around ``segment_len`` (documents, files,
    topics); a query and a key of the same segment score ``+G``, of different segments ``~N(0, G²/m)``;
  - **noise**: ``N(0, noise_std²)``, from query and key noise features of which a share ``smooth_share`` varies
    smoothly along the sequence (correlation lengths ``query_corr_len`` and ``key_corr_len``) and the rest is white.
    Neighbouring tokens of real text have similar hidden states, so nearby queries favour the same keys and favoured
    keys come in short runs; with white noise instead, every row would keep its own scattered keys and no tiled
    kernel could skip anything at any threshold.

  Each query head scales ``A, S, H, G`` by its own factor ``U(1 - head_jitter, 1 + head_jitter)``, so heads differ
  as in real models. Every component is an inner product of features, so the scores come out of an ordinary
  ``Q·Kᵀ``: the features fill the head dim and a random orthogonal rotation per kv head (shared by its query heads)
  spreads them over all coordinates. Values are Gaussian (their structure does not change the work).
- :func:`captured_qkv`: queries, keys and values captured from one layer of the shipped default model (a small
  GPT-2, ``n_positions`` 512) on held-out text, its 512-token windows laid side by side to reach the wanted length
  (as in packed training batches) and stacked over heads.

Thresholds, two documented ways:

- :func:`calibrate_theta` is the package's calibration rule applied to the inputs themselves: for sampled query rows,
  the (k+1)-th largest visible score; rows grouped by length into points; θ = mean + sigma · std per (head, point),
  interpolated over the row length n by :class:`sparse_attention.Thresholds`.
- :func:`theta_for_kept_v_fraction` (decode) bisects one per-head quantile level so that the kept V-row fraction
  ``f_v`` (a key counts when any query head of its kv group keeps it) hits a target, to sweep ``f_v``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparse_attention.ops.reference import grouped_scores, kth_largest_visible
from sparse_attention.ops.thresholds import Thresholds

# Highest local-window frequency (rad/token): neighbours one token apart still score ~cos(0.5) of the peak.
OMEGA_MAX = 0.5
# Smallest head dim the generator can lay its features out in (each component needs a few coordinates).
MIN_HEAD_DIM = 32
# At most head_dim / LOCAL_DIM_SHARE local-window frequencies (two coordinates each) and head_dim / SEGMENT_DIM_SHARE
# segment coordinates, so that noise keeps a good share of the head dim.
LOCAL_DIM_SHARE = 5
SEGMENT_DIM_SHARE = 5
# Heavy-hitter query weights are drawn from U(HEAVY_WEIGHT_MIN, 1).
HEAVY_WEIGHT_MIN = 0.25
# Segment lengths are drawn from U(1 - SEGMENT_SPREAD, 1 + SEGMENT_SPREAD) · segment_len.
SEGMENT_SPREAD = 0.5
# Default number of calibration rows sampled per call, and of row-length points of the threshold table.
CALIBRATION_ROWS = 256
CALIBRATION_POINTS = 16
# Score elements computed at once (per batch entry) by calibration and decode scoring: 2**26 float32 = 256 MiB.
SCORE_CHUNK_ELEMENTS = 1 << 26
# Bisection steps of theta_for_kept_v_fraction: 2**-30 of the quantile range, far below one key.
BISECTION_STEPS = 30
# The shipped model's context length: captured windows are this long.
MODEL_WINDOW = 512


@dataclass(frozen=True)
class StructureConfig:
    """Strengths are in score units (after the ``D**-0.5`` scale); see the module docstring."""

    n_sinks: int = 4
    sink_strength: float = 8.0
    window: int = 64
    local_strength: float = 5.0
    local_freqs: int = 12
    n_heavy: int = 16
    heavy_strength: float = 6.0
    heavy_dims: int = 4
    segment_len: int = 1024
    segment_strength: float = 2.0
    segment_dims: int = 12
    noise_std: float = 1.0
    smooth_share: float = 0.75
    query_corr_len: int = 128
    key_corr_len: int = 32
    head_jitter: float = 0.5

    def as_dict(self) -> dict:
        """The settings, for benchmark records."""
        return dict(self.__dict__)


DEFAULT_STRUCTURE = StructureConfig()


@dataclass
class QKV:
    """Benchmark inputs: ``query [B, Hq, Lq, D]`` (the last Lq positions), ``key`` and ``value [B, Hkv, L, D]``.

    ``info`` describes the source (for records): generator settings or capture details.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    info: dict

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.query, self.key, self.value))


def _layout(head_dim: int, cfg: StructureConfig) -> tuple[int, int, int, int]:
    """Feature counts ``(local freqs F, heavy dims, segment dims m, noise dims r)`` for ``head_dim``."""
    if head_dim < MIN_HEAD_DIM:
        raise ValueError(f"head_dim must be >= {MIN_HEAD_DIM} for the structured generator, got {head_dim}")
    freqs = max(2, min(cfg.local_freqs, head_dim // LOCAL_DIM_SHARE))
    heavy = max(1, min(cfg.heavy_dims, head_dim // 16))
    seg = max(2, min(cfg.segment_dims, head_dim // SEGMENT_DIM_SHARE))
    noise = head_dim - 2 * freqs - 1 - heavy - seg
    return freqs, heavy, seg, noise


def _segment_ids(length: int, cfg: StructureConfig, gen: torch.Generator) -> torch.Tensor:
    """Segment index of every position, segments of random length around ``cfg.segment_len``."""
    ids = torch.empty(length, dtype=torch.long)
    pos, seg = 0, 0
    while pos < length:
        u = float(torch.rand((), generator=gen))
        span = max(1, int(cfg.segment_len * (1 - SEGMENT_SPREAD + 2 * SEGMENT_SPREAD * u)))
        ids[pos : pos + span] = seg
        pos += span
        seg += 1
    return ids


def smooth_noise(length: int, dims: int, corr_len: int, gen: torch.Generator, device) -> torch.Tensor:
    """Unit-variance noise ``[length, dims]`` correlated over ``~corr_len`` positions: linear interpolation between
    independent Gaussian points ``corr_len`` apart, at a random phase (so no tile boundary is favoured), rescaled
    to unit variance at every position."""
    corr_len = max(1, corr_len)
    f32 = dict(dtype=torch.float32, device=device)
    points = torch.randn(length // corr_len + 3, dims, generator=gen, **f32)  # the last position may reach i0 + 1
    phase = float(torch.rand((), generator=gen, **f32))
    coarse = torch.arange(length, **f32) / corr_len + phase
    i0 = coarse.floor().long()
    t = (coarse - i0)[:, None]
    return ((1 - t) * points[i0] + t * points[i0 + 1]) / torch.sqrt((1 - t) ** 2 + t**2)


def _noise(length: int, dims: int, corr_len: int, share: float, gen: torch.Generator, device) -> torch.Tensor:
    white = torch.randn(length, dims, generator=gen, dtype=torch.float32, device=device)
    return share**0.5 * smooth_noise(length, dims, corr_len, gen, device) + (1 - share) ** 0.5 * white


def structured_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    length: int,
    head_dim: int,
    *,
    num_queries: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    config: StructureConfig = DEFAULT_STRUCTURE,
) -> QKV:
    """Queries, keys and values with structured attention (see the module docstring).

    Args:
        batch, q_heads, kv_heads, length, head_dim: shapes; ``q_heads`` a multiple of ``kv_heads``,
            ``head_dim >= MIN_HEAD_DIM``.
        num_queries: query rows, for the last positions of the sequence (default ``length``: a full prefill;
            1 for decode).
        dtype, device: of the returned tensors. seed: everything is a function of it.
        config: the component strengths.

    Returns:
        :class:`QKV`; ``info`` holds the settings, the sink and heavy-hitter positions of batch 0, kv head 0.
    """
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    lq = length if num_queries is None else num_queries
    if not 1 <= lq <= length:
        raise ValueError(f"num_queries must be in 1..length, got {num_queries}")
    freqs, heavy_dims, seg_dims, noise_dims = _layout(head_dim, config)
    group = q_heads // kv_heads
    device = torch.device(device)
    cpu_gen = torch.Generator().manual_seed(seed)
    # Separate streams for the key side and the query side: the keys and values of a seed do not depend on how many
    # query rows are drawn, so a decode query sees exactly the cache that a prefill of the same seed would.
    key_gen = torch.Generator(device=device).manual_seed(seed + 1)
    query_gen = torch.Generator(device=device).manual_seed(seed + 2)
    f32 = dict(dtype=torch.float32, device=device)

    # Feature scale so that the kernels' scale · q·k equals the feature inner product.
    root = head_dim**0.25
    omega = torch.logspace(math.log10(1.0 / config.window), math.log10(OMEGA_MAX), freqs, **f32)
    key_pos = torch.arange(length, **f32)
    q_pos = key_pos[length - lq :]
    k_local = torch.cat([torch.cos(key_pos[:, None] * omega), torch.sin(key_pos[:, None] * omega)], -1)
    q_local = torch.cat([torch.cos(q_pos[:, None] * omega), torch.sin(q_pos[:, None] * omega)], -1) / freqs
    k_sink = (key_pos < config.n_sinks).float()[:, None]
    noise_q = noise_k = math.sqrt(config.noise_std) / max(noise_dims, 1) ** 0.25

    query = torch.empty(batch, q_heads, lq, head_dim, dtype=dtype, device=device)
    key = torch.empty(batch, kv_heads, length, head_dim, dtype=dtype, device=device)
    value = torch.randn(batch, kv_heads, length, head_dim, generator=key_gen, **f32).to(dtype)
    jitter = 1 + config.head_jitter * (2 * torch.rand(q_heads, 4, generator=cpu_gen) - 1)  # per head: A, S, H, G
    heavy_positions = None
    for b in range(batch):
        seg_ids = _segment_ids(length, config, cpu_gen).to(device)
        for g in range(kv_heads):
            n_seg = int(seg_ids[-1]) + 1
            seg_vec = (torch.randint(0, 2, (n_seg, seg_dims), generator=cpu_gen).float() * 2 - 1) / seg_dims**0.5
            seg_vec = seg_vec.to(device)
            heavy_pos = config.n_sinks + torch.randperm(max(1, length - config.n_sinks), generator=cpu_gen)
            heavy_pos = heavy_pos[: config.n_heavy].to(device)
            heavy_dim = torch.randint(0, heavy_dims, (heavy_pos.numel(),), generator=cpu_gen).to(device)
            if b == 0 and g == 0:
                heavy_positions = sorted(heavy_pos.tolist())
            k_heavy = torch.zeros(length, heavy_dims, **f32)
            k_heavy[heavy_pos, heavy_dim] = 1.0
            k_feat = torch.cat(
                [
                    k_local,
                    k_sink,
                    k_heavy,
                    seg_vec[seg_ids],
                    noise_k * _noise(length, noise_dims, config.key_corr_len, config.smooth_share, key_gen, device),
                ],
                -1,
            )
            rotation, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=key_gen, **f32))
            key[b, g] = (k_feat @ rotation * root).to(dtype)
            for h in range(g * group, (g + 1) * group):
                a, s, hv, gs = (x * j for x, j in zip(_strengths(config), jitter[h].tolist(), strict=True))
                w = HEAVY_WEIGHT_MIN + (1 - HEAVY_WEIGHT_MIN) * torch.rand(lq, heavy_dims, generator=query_gen, **f32)
                q_feat = torch.cat(
                    [
                        a * q_local,
                        torch.full((lq, 1), s, **f32),
                        hv * w,
                        gs * seg_vec[seg_ids[length - lq :]],
                        noise_q * _noise(lq, noise_dims, config.query_corr_len, config.smooth_share, query_gen, device),
                    ],
                    -1,
                )
                query[b, h] = (q_feat @ rotation * root).to(dtype)
    info = {
        "source": "synthetic",
        "generator": config.as_dict(),
        "seed": seed,
        "layout": {"local_freqs": freqs, "heavy_dims": heavy_dims, "segment_dims": seg_dims, "noise_dims": noise_dims},
        "sink_positions": list(range(min(config.n_sinks, length))),
        "heavy_positions_b0_h0": heavy_positions,
    }
    return QKV(query, key, value, info)


def _strengths(cfg: StructureConfig) -> tuple[float, float, float, float]:
    return cfg.local_strength, cfg.sink_strength, cfg.heavy_strength, cfg.segment_strength


def gaussian_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    length: int,
    head_dim: int,
    *,
    num_queries: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> QKV:
    """Unit Gaussian queries, keys and values (nearly uniform attention): the unstructured contrast case."""
    lq = length if num_queries is None else num_queries
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    f32 = dict(dtype=torch.float32, device=device)
    q = torch.randn(batch, q_heads, lq, head_dim, generator=gen, **f32).to(dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen, **f32).to(dtype)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen, **f32).to(dtype)
    return QKV(q, k, v, {"source": "gaussian", "seed": seed})


# ---- thresholds -----------------------------------------------------------------------------------------------------
def _sample_rows(lq: int, rows: int) -> torch.Tensor:
    return torch.linspace(0, lq - 1, min(rows, lq)).round().long().unique()


def calibrate_theta(
    query: torch.Tensor,
    key: torch.Tensor,
    k: int,
    *,
    sigma: float = 0.1,
    rows: int = CALIBRATION_ROWS,
    num_points: int = CALIBRATION_POINTS,
    q_offset: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Per-head threshold table ``[Hq, T]`` (float32, on the query's device) calibrated on the inputs themselves.

    The package's rule (DESIGN.md, "Thresholds and calibration"): for up to ``rows`` evenly spaced query rows with
    more than ``k`` visible keys (causal, bottom-right aligned), record the (k+1)-th largest visible score; group the
    rows by row length n into ``num_points`` points; θ = mean + sigma · std over the batch and the rows of a point;
    :class:`~sparse_attention.Thresholds` interpolates it over n = 1..T (T = the longest row).

    Raises ``ValueError`` when no sampled row has more than ``k`` visible keys.
    """
    b, hq, lq, d = query.shape
    lk = key.shape[2]
    q_offset = lk - lq if q_offset is None else q_offset
    scale = d**-0.5 if scale is None else scale
    picked = [int(i) for i in _sample_rows(lq, rows) if q_offset + int(i) + 1 > k]
    if not picked:
        raise ValueError(f"no sampled query row has more than k={k} visible keys")
    chunk = max(1, SCORE_CHUNK_ELEMENTS // (hq * lk))
    recorded = torch.empty(b, hq, len(picked), dtype=torch.float32, device=query.device)
    # One batch entry and a few rows at a time: the float32 scores (and the reference helper's float32 copy of the
    # keys) of a long decode batch would not fit at once.
    for bi in range(b):
        for start in range(0, len(picked), chunk):
            idx = torch.tensor(picked[start : start + chunk], device=query.device)
            s = grouped_scores(query[bi : bi + 1, :, idx], key[bi : bi + 1], scale)  # [1, Hq, r, Lk]
            vis = torch.arange(lk, device=query.device)[None, :] <= (idx[:, None] + q_offset)
            recorded[bi, :, start : start + idx.numel()] = kth_largest_visible(s, vis.expand_as(s), k + 1)[0]
    n = torch.tensor(picked, dtype=torch.float64) + q_offset + 1
    groups = torch.tensor_split(torch.arange(len(picked)), min(num_points, len(picked)))
    n_points, theta = [], []
    for grp in groups:
        vals = recorded[:, :, grp.to(query.device)].transpose(0, 1).reshape(hq, -1)  # [Hq, B·r]
        std = vals.std(-1, correction=0) if vals.shape[1] > 1 else torch.zeros(hq, device=vals.device)
        point = int(round(float(n[grp].mean())))
        if n_points and point <= n_points[-1]:
            continue
        n_points.append(point)
        theta.append(vals.mean(-1) + sigma * std)
    table = Thresholds(n_points=torch.tensor(n_points), theta=torch.stack(theta, -1)[None].cpu(), k=k, dense_layers=())
    full = table.table(0)
    t_len = q_offset + lq
    if full.shape[1] < t_len:  # clamp beyond the last point, as Thresholds does, up to the longest row
        full = torch.cat([full, full[:, -1:].expand(hq, t_len - full.shape[1])], -1)
    return full.contiguous().to(query.device)


def decode_scores(query: torch.Tensor, key: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Scores ``[B, Hq, Lk]`` of one decode query row per head (every key visible), float32."""
    if query.shape[2] != 1:
        raise ValueError(f"decode_scores needs one query row, got {query.shape[2]}")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    # One batch entry at a time: the reference helper makes a float32 copy of the keys it scores.
    return torch.cat([grouped_scores(query[i : i + 1], key[i : i + 1], scale)[:, :, 0] for i in range(query.shape[0])])


def kept_v_fraction(scores: torch.Tensor, theta: torch.Tensor, kv_heads: int) -> float:
    """Kept V-row fraction for decode scores ``[B, Hq, Lk]`` and per-head thresholds ``[Hq]``: a key counts once
    per (batch, kv head) when any query head of the group keeps it (``s > θ``)."""
    b, hq, lk = scores.shape
    keep = scores > theta.to(scores.device)[None, :, None]
    return float(keep.reshape(b, kv_heads, hq // kv_heads, lk).any(2).float().mean())


def theta_for_kept_v_fraction(
    query: torch.Tensor, key: torch.Tensor, target: float, *, scale: float | None = None
) -> tuple[torch.Tensor, float]:
    """Per-head decode thresholds ``[Hq, 1]`` whose kept V-row fraction is as close as possible to ``target``.

    Each head's threshold is the same quantile level τ of its own scores (over batch and keys); τ is bisected so
    that the kept V-row fraction (see :func:`kept_v_fraction`) matches ``target``. ``target >= 1`` gives thresholds
    just below every score (thresholding on, nothing pruned). Returns ``(theta, achieved fraction)``.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    scores = decode_scores(query, key, scale)
    b, hq, lk = scores.shape
    hkv = key.shape[1]
    ordered = scores.transpose(0, 1).reshape(hq, -1).sort(-1).values  # [Hq, B·Lk]
    if target >= 1.0:
        theta = ordered[:, 0] - 1.0
        return theta[:, None].contiguous(), kept_v_fraction(scores, theta, hkv)
    count = ordered.shape[1]

    def at(level: float) -> torch.Tensor:
        # Midway between two neighbouring scores, never on one: a threshold equal to a score would make the keep
        # decision hinge on the last bit of that score, which kernel and reference may round differently.
        i = min(count - 2, int(level * (count - 1)))
        return (ordered[:, i] + ordered[:, i + 1]) / 2

    lo, hi = 0.0, 1.0  # kept fraction falls as the level rises
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if kept_v_fraction(scores, at(mid), hkv) > target:
            lo = mid
        else:
            hi = mid
    candidates = [(abs(kept_v_fraction(scores, at(x), hkv) - target), x) for x in (lo, hi)]
    level = min(candidates)[1]
    theta = at(level)
    return theta[:, None].contiguous(), kept_v_fraction(scores, theta, hkv)


# ---- structure measurements (for tests and records) -----------------------------------------------------------------
def _causal(b: int, hq: int, lq: int, lk: int, device) -> torch.Tensor:
    """Bottom-right causal visibility ``[B, Hq, Lq, Lk]`` (a broadcast view)."""
    rows = torch.arange(lq, device=device)[:, None] + (lk - lq)
    return (torch.arange(lk, device=device)[None, :] <= rows).expand(b, hq, lq, lk)


def _causal_probs(query: torch.Tensor, key: torch.Tensor, scale: float | None = None):
    b, hq, lq, d = query.shape
    lk = key.shape[2]
    scale = d**-0.5 if scale is None else scale
    s = grouped_scores(query, key, scale)
    vis = _causal(b, hq, lq, lk, query.device)
    return s, vis, torch.softmax(s.masked_fill(~vis, float("-inf")), -1)


def topk_mass(query: torch.Tensor, key: torch.Tensor, k: int) -> float:
    """Mean softmax mass of each causal row's k largest scores, over rows with more than k visible keys."""
    s, vis, p = _causal_probs(query, key)
    n = vis.sum(-1)
    mass = p.topk(min(k, p.shape[-1]), -1).values.sum(-1)
    rows = n > k
    return float(mass[rows].mean())


def mass_cover_fraction(query: torch.Tensor, key: torch.Tensor, mass: float = 0.9, min_visible: int = 1) -> float:
    """Fraction of visible elements that the fewest largest probabilities covering ``mass`` of each causal row
    need, over rows with at least ``min_visible`` visible keys: low for peaky attention, near ``mass`` for uniform."""
    s, vis, p = _causal_probs(query, key)
    ordered = p.sort(-1, descending=True).values
    needed = (ordered.cumsum(-1) < mass).sum(-1) + 1
    n = vis.sum(-1)
    rows = n >= min_visible
    return float(needed[rows].float().sum() / n[rows].float().sum())


def keep_mask(query: torch.Tensor, key: torch.Tensor, theta: torch.Tensor, k_dense: int = 0) -> torch.Tensor:
    """Boolean ``[B, Hq, Lq, Lk]``: the causal elements that a threshold table ``[Hq, T]`` keeps (placement "pre")."""
    b, hq, lq, d = query.shape
    lk = key.shape[2]
    s = grouped_scores(query, key, d**-0.5)
    vis = _causal(b, hq, lq, lk, query.device)
    n = vis.sum(-1)
    idx = (n.clamp(1, theta.shape[1]) - 1).long()
    th = theta.to(s.device)[torch.arange(hq, device=s.device)[None, :, None], idx]
    return vis & ((s > th[..., None]) | (n <= k_dense)[..., None])


def tile_skip_fraction(keep: torch.Tensor, block_m: int, block_n: int, causal: bool = True) -> float:
    """Fraction of the causally visible ``block_m x block_n`` tiles of a keep mask ``[..., Lq, Lk]`` with nothing
    kept (the P·V tiles a tiled kernel with that tile shape may skip)."""
    lq, lk = keep.shape[-2:]
    pad_m, pad_n = -lq % block_m, -lk % block_n
    k = torch.nn.functional.pad(keep.float(), (0, pad_n, 0, pad_m))
    tiles = k.unflatten(-1, (-1, block_n)).unflatten(-3, (-1, block_m)).amax((-3, -1))  # [..., Tm, Tn]
    tm, tn = tiles.shape[-2:]
    walked = torch.ones(tm, tn, dtype=torch.bool, device=keep.device)
    if causal:
        first_row = torch.arange(tm, device=keep.device)[:, None] * block_m + (lk - lq)
        last_row = first_row + block_m - 1
        walked = (torch.arange(tn, device=keep.device)[None, :] * block_n) <= last_row
    total = walked.sum() * (tiles.numel() // (tm * tn))
    skipped = ((tiles == 0) & walked).sum()
    return float(skipped) / max(1, int(total))


# ---- captured from the default model --------------------------------------------------------------------------------
class ModelUnavailable(RuntimeError):
    """The shipped default model (or its held-out text) is not available here."""


def captured_qkv(
    length: int,
    slots: int,
    *,
    layer: int = -1,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    max_windows: int = 256,
) -> QKV:
    """Q/K/V of one layer of the shipped default model on held-out text, shaped ``[1, slots · H, length, Dh]``.

    The model reads 512-token windows of held-out standard-library text; ``slots x ceil(length / 512)`` windows are
    captured (cycled when the text has fewer) and, per slot, laid side by side along the sequence, as in a packed
    batch of documents; the slots are stacked over heads. Raises :class:`ModelUnavailable` when the model's files or
    the held-out text are missing.
    """
    try:
        from sparse_attention import load_default_model, load_default_tokenizer, stdlib_texts, token_windows

        model = load_default_model(device=device)
        tokenizer = load_default_tokenizer()
        texts = stdlib_texts("heldout")
        windows = token_windows(tokenizer, texts, MODEL_WINDOW, max_windows=max_windows)
    except (ValueError, OSError, ImportError) as exc:
        raise ModelUnavailable(f"default model or held-out text unavailable: {exc}") from exc
    blocks = model.transformer.h
    attn = blocks[layer].attn
    heads = model.config.n_head
    chunks = math.ceil(length / MODEL_WINDOW)
    needed = slots * chunks
    ids = windows[torch.arange(needed) % windows.shape[0]].to(device)
    captured = []

    def hook(_module, _inputs, output):
        captured.append(output.detach())

    handle = attn.c_attn.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for start in range(0, needed, 16):
                model(input_ids=ids[start : start + 16], use_cache=False)
    finally:
        handle.remove()
    qkv = torch.cat(captured, 0)  # [needed, 512, 3E]
    e = qkv.shape[-1] // 3
    dh = e // heads

    def arrange(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(slots, chunks, MODEL_WINDOW, heads, dh).permute(0, 3, 1, 2, 4)  # [S, H, C, W, Dh]
        return t.reshape(1, slots * heads, chunks * MODEL_WINDOW, dh)[:, :, :length].to(dtype).contiguous()

    q, k, v = (arrange(qkv[..., i * e : (i + 1) * e]) for i in range(3))
    info = {
        "source": "model",
        "model": "default GPT-2 (sparse_attention.DEFAULT_MODEL_DIR)",
        "layer": layer % len(blocks),
        "windows": needed,
        "distinct_windows": int(min(needed, windows.shape[0])),
    }
    return QKV(q, k, v, info)
