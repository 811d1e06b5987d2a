"""The reference path against the independent float64 oracle, rule by rule (DESIGN.md "The semantics")."""

import pytest
import torch
from sa_testing import assert_close_to_oracle, left_padding_mask, make_qkv, oracle_top_theta, quantile_theta

from sparse_attention.ops import reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

# (B, Hq, Hkv, Lq, Lk, D): odd lengths, Lq < Lk, Lq == 1 decode, GQA 1/2/4.
SHAPES = [
    (2, 4, 4, 7, 7, 16),
    (1, 4, 2, 5, 13, 16),
    (2, 8, 2, 1, 19, 32),
    (1, 4, 1, 9, 9, 8),
]


def _id(shape, dtype):
    b, hq, hkv, lq, lk, d = shape
    return f"B{b}-Hq{hq}-Hkv{hkv}-Lq{lq}-Lk{lk}-D{d}-{dtype}"


CASES = [pytest.param(s, dt, id=_id(s, dt)) for s in SHAPES for dt in DTYPES]
MODES = [
    pytest.param(dict(placement="pre", sdc="exact"), id="pre-exact"),
    pytest.param(dict(placement="pre", sdc="none"), id="pre-none"),
    pytest.param(dict(placement="pre", sdc="threshold"), id="pre-threshold"),
    pytest.param(dict(placement="pre", sdc="calibrated"), id="pre-calibrated"),
    pytest.param(dict(placement="pre", sdc="exact", vmc=True), id="pre-exact-vmc"),
    pytest.param(dict(placement="pre", sdc="threshold", vmc=True, k_dense=3), id="pre-threshold-vmc-kdense3"),
    pytest.param(dict(placement="post", sdc="exact"), id="post-exact"),
    pytest.param(dict(placement="post", sdc="exact", vmc=True, k_dense=2), id="post-vmc-kdense2"),
]


def _theta(q, k, mode, lk):
    hq = q.shape[1]
    if mode.get("placement") == "post":
        # Probabilities around 1/n keep roughly half the row.
        return torch.linspace(0.5, 1.5, hq)[:, None] / torch.arange(1, lk + 1)[None, :]
    base = quantile_theta(q, k, 0.4)
    # A per-length table that actually varies with n, so the lookup index matters.
    return base[:, None] + 0.05 * torch.arange(lk)[None, :].float()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,dtype", CASES)
def test_matches_oracle(shape, dtype, mode):
    b, hq, hkv, lq, lk, d = shape
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, DTYPES[dtype], spread=2.0, seed=lq * 31 + lk)
    kw = dict(mode)
    theta = _theta(q, k, kw, lk)
    if kw.get("sdc") == "calibrated":
        kw["sdc_table"] = torch.rand(hq, lk) * 3
    mask = left_padding_mask([lk - (i * 3) % lk for i in range(b)], lk)
    out, stats = reference.top_theta_attention(q, k, v, theta, attn_mask=mask, return_stats=True, **kw)
    out64, kept, visible, kept_v = oracle_top_theta(q, k, v, theta, attn_mask=mask, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.equal(stats.visible.long(), visible)
    assert torch.equal(stats.kept.long(), kept)
    if lq == 1:
        assert torch.equal(stats.kept_v_rows.long(), kept_v)
    else:
        assert stats.kept_v_rows is None
    assert_close_to_oracle(out, out64, q, k, v, mask, what=str(kw))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("q_offset", [None, 0, 3, -2], ids=lambda o: f"qoff{o}")
def test_offsets_and_causality(causal, q_offset):
    q, k, v = make_qkv(1, 2, 1, 6, 10, 16, seed=5)
    theta = quantile_theta(q, k, 0.5)
    out, stats = reference.top_theta_attention(
        q, k, v, theta, causal=causal, q_offset=q_offset, sdc="threshold", vmc=True, return_stats=True
    )
    out64, kept, visible, _ = oracle_top_theta(
        q, k, v, theta, causal=causal, q_offset=q_offset, sdc="threshold", vmc=True
    )
    assert torch.equal(stats.visible.long(), visible) and torch.equal(stats.kept.long(), kept)
    assert_close_to_oracle(out, out64, q, k, v, causal=causal, q_offset=q_offset)


def test_empty_rows_are_zero_and_never_nan():
    q, k, v = make_qkv(2, 2, 2, 4, 6, 16)
    mask = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    mask[0, :, 1] = False  # a row that sees nothing
    for kw in (dict(), dict(vmc=True), dict(sdc="none"), dict(placement="post")):
        theta = 0.1 if kw.get("placement") == "post" else 0.0
        out, stats = reference.top_theta_attention(q, k, v, theta, attn_mask=mask, return_stats=True, **kw)
        assert not out.isnan().any()
        assert torch.equal(out[0, :, 1], torch.zeros_like(out[0, :, 1]))
        assert int(stats.visible[0, 0, 1]) == 0 and int(stats.kept[0, 0, 1]) == 0
    # q_offset < 0 makes the first rows see no key at all under causal masking.
    out = reference.top_theta_attention(q, k, v, q_offset=-2, vmc=True)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))


def test_fully_pruned_rows():
    q, k, v = make_qkv(1, 2, 1, 5, 5, 16)
    big = torch.full((2,), 1e9)
    for sdc in ("exact", "none", "threshold", "calibrated"):
        table = torch.ones(2, 5) if sdc == "calibrated" else None
        out, stats = reference.top_theta_attention(q, k, v, big, sdc=sdc, sdc_table=table, return_stats=True)
        assert int(stats.kept.sum()) == 0
        assert torch.equal(out, torch.zeros_like(out)), sdc
        out_vmc = reference.top_theta_attention(q, k, v, big, sdc=sdc, sdc_table=table, vmc=True)
        # Nothing kept: the output is exactly the mean of the visible V rows.
        means = torch.cumsum(v[0, 0], 0) / torch.arange(1, 6)[:, None]
        torch.testing.assert_close(out_vmc[0, 0], means)


def test_fully_kept_rows_equal_dense_sdpa():
    q, k, v = make_qkv(2, 4, 2, 9, 9, 16)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )
    for sdc in ("exact", "none", "threshold"):
        out, stats = reference.top_theta_attention(q, k, v, float("-inf"), sdc=sdc, vmc=True, return_stats=True)
        assert torch.equal(stats.kept, stats.visible)
        torch.testing.assert_close(out, dense, atol=2e-6, rtol=0)
    out = reference.top_theta_attention(q, k, v)
    torch.testing.assert_close(out, dense, atol=2e-6, rtol=0)


def test_k_dense_rows_are_never_pruned():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16)
    _, stats = reference.top_theta_attention(q, k, v, 1e9, k_dense=5, return_stats=True)
    n = stats.visible[0, 0]
    assert torch.equal(stats.kept[0, 0][n <= 5], n[n <= 5])
    assert int(stats.kept[0, 0][n > 5].sum()) == 0


def test_extreme_scores_stay_finite():
    q, k, v = make_qkv(1, 2, 1, 6, 6, 16, spread=400.0)
    for kw in (dict(sdc="threshold"), dict(sdc="none", vmc=True), dict(placement="post")):
        theta = 1e-3 if kw.get("placement") == "post" else 0.0
        out = reference.top_theta_attention(q, k, v, theta, **kw)
        out64, *_ = oracle_top_theta(q, k, v, theta, **kw)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), out64, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k_top", [1, 3, 50], ids=lambda x: f"k{x}")
def test_topk_attention_keeps_exactly_k(k_top):
    q, k, v = make_qkv(2, 4, 2, 7, 11, 16)
    mask = left_padding_mask([11, 8], 11)
    out, stats = reference.topk_attention(q, k, v, k_top, attn_mask=mask, return_stats=True)
    assert torch.equal(stats.kept, stats.visible.clamp(max=k_top))
    # Independent check: top-k attention equals Top-θ with a per-row threshold just below the k-th score.
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 16**-0.5
    vis = torch.ones(7, 11, dtype=torch.bool).tril(4) & mask
    s = s.masked_fill(~vis, float("-inf"))
    kth = s.topk(min(k_top, 11), -1).values[..., -1:]
    keep = (s >= kth) & vis
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
    expected = p @ v.double().repeat_interleave(2, 1)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)


def test_topk_rejects_bad_k():
    q, k, v = make_qkv(1, 2, 2, 3, 3, 16)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            reference.topk_attention(q, k, v, bad)


def test_gpt2_sized_batch_memory_is_bounded():
    # A 1024-token GPT-2-sized call: chunking keeps each score temporary at 64 MiB.
    q, k, v = make_qkv(2, 12, 12, 1024, 1024, 64)
    out, stats = reference.top_theta_attention(q, k, v, 0.5, return_stats=True)
    assert out.shape == q.shape and not out.isnan().any()
    assert int(stats.visible[0, 0, -1]) == 1024
    chunks = list(reference.row_chunks(2, 12, 1024, 1024))
    assert len(chunks) > 1 and max(stop - start for start, stop in chunks) * 2 * 12 * 1024 <= 1 << 24


def test_kth_largest_visible():
    s = torch.tensor([[3.0, 1.0, 2.0, 5.0]])
    vis = torch.tensor([[True, True, True, False]])
    assert reference.kth_largest_visible(s, vis, 1).item() == 3.0
    assert reference.kth_largest_visible(s, vis, 3).item() == 1.0
    assert reference.kth_largest_visible(s, vis, 4).item() == float("-inf")
    assert reference.kth_largest_visible(s, vis, 5).item() == float("-inf")


# ---- the score transforms and options of every decoder (issue 12) ------------------------------------------------

FEATURES = [
    pytest.param(dict(softcap=2.0), id="softcap"),
    pytest.param(dict(softcap=0.5, placement="post"), id="softcap-post"),
    pytest.param(dict(sinks="rand"), id="sinks"),
    pytest.param(dict(sinks="rand", vmc=True, sdc="threshold"), id="sinks-vmc-threshold"),
    pytest.param(dict(sinks="rand", placement="post", vmc=True), id="sinks-post-vmc"),
    pytest.param(dict(dv=24), id="dv24"),
    pytest.param(dict(dv=8, vmc=True, sdc="none"), id="dv8-vmc"),
    pytest.param(dict(sdc_scale=0.5, sdc="threshold"), id="sdc-scale-threshold"),
    pytest.param(dict(sdc_scale=2.0, sdc="exact"), id="sdc-scale-exact"),
    pytest.param(dict(sdc_scale=0.7, sdc="calibrated"), id="sdc-scale-calibrated"),
    pytest.param(dict(cap=2), id="cap2"),
    pytest.param(dict(cap=3, sdc="threshold", vmc=True, k_dense=4), id="cap3-threshold-vmc-kdense4"),
    pytest.param(dict(cap=1, placement="post"), id="cap1-post"),
    pytest.param(dict(cap=2, sinks="rand", softcap=3.0, dv=12, sdc_scale=0.3, sdc="threshold"), id="everything"),
]


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("shape", [(2, 4, 2, 7, 11, 16), (1, 4, 1, 1, 13, 16)], ids=["B2-Hq4-Hkv2-L7-11", "decode"])
def test_features_match_oracle(shape, feature):
    b, hq, hkv, lq, lk, d = shape
    kw = dict(feature)
    dv = kw.pop("dv", None)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dv=dv, spread=2.0, seed=7)
    if kw.get("sinks") == "rand":
        kw["sinks"] = torch.randn(hq) * 2
    theta = _theta(q, k, kw, lk)
    if kw.get("sdc") == "calibrated":
        kw["sdc_table"] = torch.rand(hq, lk) * 3
    mask = left_padding_mask([lk - (i * 3) % lk for i in range(b)], lk)
    out, stats = reference.top_theta_attention(q, k, v, theta, attn_mask=mask, return_stats=True, **kw)
    out64, kept, visible, kept_v = oracle_top_theta(q, k, v, theta, attn_mask=mask, **kw)
    assert out.shape == (b, hq, lq, v.shape[-1])
    assert torch.equal(stats.visible.long(), visible) and torch.equal(stats.kept.long(), kept)
    if lq == 1:
        assert torch.equal(stats.kept_v_rows.long(), kept_v)
    assert_close_to_oracle(out, out64, q, k, v, mask, what=str(feature))


def test_cap_keeps_the_most_recent_kept_keys():
    q, k, v = make_qkv(1, 1, 1, 1, 9, 16)
    _, full = reference.top_theta_attention(q, k, v, float("-inf"), return_stats=True)
    _, capped = reference.top_theta_attention(q, k, v, float("-inf"), cap=4, return_stats=True)
    assert int(full.kept) == 9 and int(capped.kept) == 4
    # Capped attention equals attention over the last four keys with the exact denominator of all nine.
    out = reference.top_theta_attention(q, k, v, float("-inf"), cap=4)
    s = (q.double() @ k.double().transpose(-1, -2))[0, 0, 0] / 4.0
    p = torch.softmax(s, -1)
    expected = (p[5:, None] * v.double()[0, 0, 5:]).sum(0)
    torch.testing.assert_close(out[0, 0, 0].double(), expected, atol=1e-6, rtol=0)
    _, small = reference.top_theta_attention(q, k, v, float("-inf"), cap=4, k_dense=9, return_stats=True)
    assert int(small.kept) == 9  # rows with n <= k_dense are never pruned, capped or not


def test_sinks_join_the_max_and_denominators_but_not_the_counts():
    q, k, v = make_qkv(1, 2, 2, 3, 3, 16)
    q = q * 0
    sinks = torch.tensor([0.0, float("-inf")])
    out, stats = reference.top_theta_attention(q, k, v, causal=False, sinks=sinks, return_stats=True)
    # all scores 0: head 0 splits its mass over 3 keys and the sink, head 1 (sink -inf) over the 3 keys
    torch.testing.assert_close(out[0, 0], (v[0, 0].sum(0) / 4).expand(3, -1))
    torch.testing.assert_close(out[0, 1], (v[0, 1].sum(0) / 3).expand(3, -1))
    assert torch.equal(stats.visible, torch.full_like(stats.visible, 3))
    # a row with no visible key outputs zeros even with a sink and vmc
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    empty = reference.top_theta_attention(q, k, v, attn_mask=mask, sinks=torch.zeros(2), vmc=True, causal=False)
    assert torch.equal(empty, torch.zeros_like(empty))


def test_softcap_caps_scores_before_the_keep_test():
    q, k, v = make_qkv(1, 1, 1, 1, 6, 16, spread=5.0)
    _, uncapped = reference.top_theta_attention(q, k, v, 1.5, return_stats=True)
    _, capped = reference.top_theta_attention(q, k, v, 1.5, softcap=1.0, return_stats=True)
    assert int(uncapped.kept) > 0 and int(capped.kept) == 0  # capped scores never exceed 1.0


# ---- infinities, empty inputs, NaN (issues 12 and 13) ------------------------------------------------------------


@pytest.mark.parametrize("sdc", ["exact", "none", "threshold", "calibrated"])
@pytest.mark.parametrize("vmc", [False, True], ids=["novmc", "vmc"])
def test_infinite_thresholds_never_give_nan(sdc, vmc):
    q, k, v = make_qkv(2, 2, 1, 5, 7, 16)
    theta = torch.tensor([[float("-inf")] * 3 + [float("inf")] * 4, [float("inf")] * 7])
    table = torch.ones(2, 7) if sdc == "calibrated" else None
    out, stats = reference.top_theta_attention(q, k, v, theta, sdc=sdc, sdc_table=table, vmc=vmc, return_stats=True)
    out64, kept, _, _ = oracle_top_theta(q, k, v, theta, sdc=sdc, sdc_table=table, vmc=vmc)
    assert not out.isnan().any()
    assert torch.equal(stats.kept.long(), kept)
    assert_close_to_oracle(out, out64, q, k, v)


def test_no_keys_give_zeros():
    # D1: Lk = 0 used to raise "amax(): Expected reduction dim -1 to have non-zero size".
    q, k, v = make_qkv(2, 4, 2, 3, 0, 16)
    for kw in (dict(), dict(vmc=True, sinks=torch.ones(4)), dict(placement="post")):
        out, stats = reference.top_theta_attention(q, k, v, 0.1, return_stats=True, **kw)
        assert out.shape == (2, 4, 3, 16) and torch.equal(out, torch.zeros_like(out))
        assert int(stats.visible.sum()) == 0


def test_post_with_theta_zero_keeps_every_visible_key():
    # D6: placement "post" with θ = 0 keeps keys whose probability underflows (exact arithmetic: p > 0).
    q, k, v = make_qkv(1, 1, 1, 1, 40, 16, spread=60.0)
    _, stats = reference.top_theta_attention(q, k, v, 0.0, placement="post", return_stats=True)
    p = torch.softmax((q @ k.transpose(-1, -2)).float() / 4, -1)
    assert bool((p == 0).any())  # some probabilities do underflow in float32
    assert int(stats.kept) == 40


def test_nan_in_reaches_the_rows_it_touches():
    # D4: NaN in, NaN out, in the rows that read it; the other rows stay exact.
    q, k, v = make_qkv(1, 2, 1, 6, 6, 16)
    k_nan = k.clone()
    k_nan[0, 0, 3] = float("nan")
    out = reference.top_theta_attention(q, k_nan, v, 0.0)
    rows_nan = out.isnan().all(-1)[0, 0]
    assert rows_nan.tolist() == [False, False, False, True, True, True]  # causal: rows 3.. see key 3
    clean = reference.top_theta_attention(q, k, v, 0.0)
    torch.testing.assert_close(out[:, :, :3], clean[:, :, :3])
    q_nan = q.clone()
    q_nan[0, 1, 2] = float("nan")
    out = reference.top_theta_attention(q_nan, k, v, 0.0)
    assert out[0, 1, 2].isnan().all() and not out[0, 0].isnan().any()


@pytest.mark.parametrize("sinks", [None, 0.5], ids=["nosink", "sink"])
@pytest.mark.parametrize("vmc", [False, True], ids=["novmc", "vmc"])
def test_no_compensation_at_sdc_scale_zero_even_for_infinite_thresholds(sinks, vmc):
    # Found by tests/ops/test_properties.py: sdc="threshold", sdc_scale=0 and θ = +inf gave 0 · ∞ = NaN rows; a
    # scale of 0 means no compensation at all, the denominator of sdc="none".
    q, k, v = make_qkv(1, 2, 1, 3, 6, 16)
    sinks = None if sinks is None else torch.full((2,), sinks)
    kw = dict(vmc=vmc, sinks=sinks)
    out = reference.top_theta_attention(q, k, v, float("inf"), sdc="threshold", sdc_scale=0.0, **kw)
    none = reference.top_theta_attention(q, k, v, float("inf"), sdc="none", **kw)
    assert not out.isnan().any()
    assert torch.equal(out, none)
    out64, _, _, _ = oracle_top_theta(q, k, v, float("inf"), sdc="threshold", sdc_scale=0.0, **kw)
    assert_close_to_oracle(out, out64, q, k, v)


@pytest.mark.parametrize("sdc", ["none", "calibrated"])
def test_a_nan_input_makes_a_row_nan_even_when_it_keeps_nothing(sdc):
    # Found by tests/ops/test_properties.py: with sdc "none" (or "calibrated") a pruned row that keeps nothing has a
    # denominator without the NaN score, and came out as finite zeros instead of NaN.
    q, k, v = make_qkv(1, 1, 1, 4, 4, 16)
    table = torch.ones(1, 4) if sdc == "calibrated" else None
    k_nan = k.clone()
    k_nan[0, 0, 1] = float("nan")
    out = reference.top_theta_attention(q, k_nan, v, float("inf"), sdc=sdc, sdc_table=table)
    assert out.isnan().all(-1)[0, 0].tolist() == [False, True, True, True]  # causal: rows 1.. see key 1
    q_nan = q.clone()
    q_nan[0, 0, 2, 5] = float("nan")
    out = reference.top_theta_attention(q_nan, k, v, float("inf"), sdc=sdc, sdc_table=table)
    assert out.isnan().all(-1)[0, 0].tolist() == [False, False, True, False]
