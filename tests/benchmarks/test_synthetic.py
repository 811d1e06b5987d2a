"""The benchmark inputs (benchmarks/synthetic.py): shapes, determinism, and that the structure is really there."""

import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))  # the benchmark scripts import each other as top-level modules

import synthetic  # noqa: E402

# Small enough for a CPU: one batch, 4 query heads over 2 kv heads, D=64.
B, HQ, HKV, L, D = 1, 4, 2, 512, 64
K = 16


@pytest.fixture(scope="module")
def structured():
    return synthetic.structured_qkv(B, HQ, HKV, L, D, dtype=torch.float32, seed=0)


@pytest.fixture(scope="module")
def gaussian():
    return synthetic.gaussian_qkv(B, HQ, HKV, L, D, dtype=torch.float32, seed=0)


def test_shapes_dtype_and_determinism():
    a = synthetic.structured_qkv(2, 4, 2, 96, 32, num_queries=3, dtype=torch.bfloat16, seed=1)
    assert a.query.shape == (2, 4, 3, 32) and a.key.shape == (2, 2, 96, 32) and a.value.shape == (2, 2, 96, 32)
    assert a.query.dtype == a.key.dtype == a.value.dtype == torch.bfloat16
    b = synthetic.structured_qkv(2, 4, 2, 96, 32, num_queries=3, dtype=torch.bfloat16, seed=1)
    c = synthetic.structured_qkv(2, 4, 2, 96, 32, num_queries=3, dtype=torch.bfloat16, seed=2)
    assert torch.equal(a.query, b.query) and torch.equal(a.key, b.key) and torch.equal(a.value, b.value)
    assert not torch.equal(a.key, c.key)
    assert a.nbytes == sum(t.numel() * 2 for t in (a.query, a.key, a.value))
    assert a.info["source"] == "synthetic" and a.info["sink_positions"] == [0, 1, 2, 3]
    assert len(a.info["heavy_positions_b0_h0"]) == synthetic.DEFAULT_STRUCTURE.n_heavy


def test_cache_does_not_depend_on_the_number_of_queries():
    # A decode benchmark's cache is exactly the keys and values a prefill of the same seed would see.
    full = synthetic.structured_qkv(2, 2, 2, 128, 32, dtype=torch.float32, seed=3)
    last = synthetic.structured_qkv(2, 2, 2, 128, 32, num_queries=1, dtype=torch.float32, seed=3)
    assert torch.equal(full.key, last.key) and torch.equal(full.value, last.value)
    assert synthetic.decode_scores(last.query, last.key).shape == (2, 2, 128)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(head_dim=16), "head_dim"),
        (dict(q_heads=3), "multiple"),
        (dict(num_queries=0), "num_queries"),
    ],
)
def test_rejects_bad_arguments(kwargs, error):
    args = dict(batch=1, q_heads=4, kv_heads=2, length=64, head_dim=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=error):
        synthetic.structured_qkv(**args)


def test_attention_is_peaky_unlike_gaussian(structured, gaussian):
    # The k largest scores of a row hold most of its softmax mass; for Gaussian inputs they hold little.
    peaky_mass = synthetic.topk_mass(structured.query, structured.key, K)
    flat_mass = synthetic.topk_mass(gaussian.query, gaussian.key, K)
    assert peaky_mass > 0.7 and flat_mass < 0.45 and peaky_mass > 2 * flat_mass
    # Covering 90% of the mass takes a small share of the elements; Gaussian rows need most of theirs.
    peaky = synthetic.mass_cover_fraction(structured.query, structured.key, 0.9, min_visible=64)
    flat = synthetic.mass_cover_fraction(gaussian.query, gaussian.key, 0.9, min_visible=64)
    assert peaky < 0.3 * flat


def test_calibrated_threshold_keeps_about_k_and_most_of_the_mass(structured, gaussian):
    for qkv, min_mass, max_mass in ((structured, 0.6, 1.0), (gaussian, 0.0, 0.4)):
        theta = synthetic.calibrate_theta(qkv.query, qkv.key, K)
        assert theta.shape == (HQ, L) and theta.dtype == torch.float32
        keep = synthetic.keep_mask(qkv.query, qkv.key, theta, k_dense=K)
        n = torch.arange(1, L + 1)
        long_rows = n > 4 * K
        kept = keep.sum(-1)[..., long_rows].float().mean()
        assert K / 3 < kept < 3 * K
        s, vis, p = synthetic._causal_probs(qkv.query, qkv.key)
        mass = (p * keep).sum(-1)[..., long_rows].mean()
        assert min_mass <= mass <= max_mass
    # The same kept fraction skips P·V tiles only where the kept keys cluster.
    tiles = {}
    for name, qkv in (("structured", structured), ("gaussian", gaussian)):
        theta = synthetic.calibrate_theta(qkv.query, qkv.key, K)
        tiles[name] = synthetic.tile_skip_fraction(synthetic.keep_mask(qkv.query, qkv.key, theta, K), 32, 32)
    assert tiles["structured"] > tiles["gaussian"] + 0.1


def test_sinks_heavy_hitters_and_local_window(structured):
    _, vis, p = synthetic._causal_probs(structured.query, structured.key)
    column_mass = p.mean((0, 1, 2))  # [L]: average probability each key receives
    uniform = column_mass.median()
    sinks = structured.info["sink_positions"]
    assert column_mass[sinks].mean() > 20 * uniform
    heavy = structured.info["heavy_positions_b0_h0"]
    kv0 = p[0, : HQ // HKV].mean((0, 1))  # query heads of kv head 0, where the recorded heavy hitters live
    assert kv0[heavy].mean() > 3 * kv0.median()
    # Local window: on average a query gives its near neighbours far more than keys a few windows back.
    s = torch.stack([p[..., i, i - 8 : i + 1].mean() for i in range(256, L)])
    far = torch.stack([p[..., i, i - 256 : i - 192].mean() for i in range(256, L)])
    assert s.mean() > 5 * far.mean()


def test_smooth_noise_is_unit_variance_and_correlated():
    gen = torch.Generator().manual_seed(0)
    x = synthetic.smooth_noise(4096, 16, 32, gen, "cpu")
    assert x.shape == (4096, 16)
    assert 0.8 < float(x.var()) < 1.2
    near = float((x[1:] * x[:-1]).mean())
    far = float((x[128:] * x[:-128]).mean())
    assert near > 0.8 and abs(far) < 0.1


def test_theta_for_kept_v_fraction_hits_targets():
    qkv = synthetic.structured_qkv(2, 4, 2, 512, 64, num_queries=1, dtype=torch.float32, seed=0)
    previous = 0.0
    for target in (0.1, 0.3, 0.6):
        theta, achieved = synthetic.theta_for_kept_v_fraction(qkv.query, qkv.key, target)
        assert theta.shape == (4, 1)
        assert abs(achieved - target) < 0.02
        assert achieved > previous
        previous = achieved
        scores = synthetic.decode_scores(qkv.query, qkv.key)
        assert synthetic.kept_v_fraction(scores, theta[:, 0], 2) == pytest.approx(achieved)
        # Never exactly on a score: the keep decision must not hinge on rounding.
        assert not (scores == theta[None, :, :]).any()
    theta, achieved = synthetic.theta_for_kept_v_fraction(qkv.query, qkv.key, 1.0)
    assert achieved == 1.0
    with pytest.raises(ValueError, match="target"):
        synthetic.theta_for_kept_v_fraction(qkv.query, qkv.key, 0.0)


def test_calibrate_theta_offsets_and_errors():
    qkv = synthetic.structured_qkv(1, 2, 1, 256, 64, num_queries=17, dtype=torch.float32, seed=0)
    theta = synthetic.calibrate_theta(qkv.query[:, :, :-1], qkv.key, 8, q_offset=256 - 17)
    assert theta.shape[0] == 2 and theta.shape[1] >= 255
    assert torch.isfinite(theta).all()
    with pytest.raises(ValueError, match="more than k"):
        synthetic.calibrate_theta(qkv.query[:, :, :4], qkv.key[:, :, :4], 8, q_offset=0)


def test_tile_skip_fraction_counts_causal_tiles():
    lq = lk = 64
    keep = torch.zeros(1, 1, lq, lk, dtype=torch.bool)
    # 16x16 tiles of a causal 64x64 mask: 4 + 3 + 2 + 1 = 10 walked tiles.
    assert synthetic.tile_skip_fraction(keep, 16, 16) == 1.0
    keep[..., 0, 0] = True
    assert synthetic.tile_skip_fraction(keep, 16, 16) == pytest.approx(9 / 10)
    full = torch.tril(torch.ones(lq, lk, dtype=torch.bool))[None, None]
    assert synthetic.tile_skip_fraction(full, 16, 16) == 0.0
    assert synthetic.tile_skip_fraction(torch.zeros(1, 1, 8, 8, dtype=torch.bool), 16, 16, causal=False) == 1.0


def test_captured_qkv_from_the_default_model():
    try:
        qkv = synthetic.captured_qkv(600, 1, dtype=torch.float32, max_windows=4)
    except synthetic.ModelUnavailable as exc:
        pytest.skip(str(exc))
    heads = qkv.query.shape[1]
    assert qkv.query.shape[0] == 1 and qkv.query.shape[2] == 600 and qkv.key.shape == qkv.value.shape
    assert qkv.key.shape[:3] == (1, heads, 600)
    assert qkv.info["source"] == "model" and qkv.info["windows"] == 2
    # Real attention is peakier than Gaussian attention of the same shape (if less so than the generator's).
    q, k = qkv.query[:, :, :512], qkv.key[:, :, :512]
    flat = synthetic.gaussian_qkv(1, heads, heads, 512, q.shape[-1], dtype=torch.float32)
    assert synthetic.topk_mass(q, k, K) > 1.2 * synthetic.topk_mass(flat.query, flat.key, K)
