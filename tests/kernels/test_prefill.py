"""The Triton prefill kernel (kernels/prefill.py) against the reference and the float64 oracle.

On CPU the kernel runs under TRITON_INTERPRET=1 (float32 and float16, small shapes, 32x16 tiles so that lengths that
are not tile multiples give partial, diagonal and fully visible tiles). bfloat16, longer sequences and every autotune
config run in the GPU-marked tests. Thresholds are moved off the scores (and, for "post", off the probabilities) by
a clear gap, so that the kernel and the reference, which round differently, must agree on every keep decision.
"""

import math

import pytest
import torch
from sa_testing import assert_close_to_oracle, left_padding_mask, make_qkv, oracle_top_theta

from sparse_attention import reference, top_theta_attention
from sparse_attention.kernels import config, prefill
from sparse_attention.kernels.prefill import top_theta_prefill
from sparse_attention.validation import prepare_call

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _prefill(q, k, v, theta=None, *, block_config=None, **kw):
    """Run the launcher on a prepared call with a NaN-poisoned output; return (out, kept, visible, skipped, total)."""
    call = prepare_call(q, k, v, theta, return_stats=True, **kw)
    out = torch.full_like(q, float("nan"))
    result = top_theta_prefill(
        call.query, call.key, call.value, call.theta, call.sdc_table, call.attn_mask,
        k_dense=call.k_dense, scale=call.scale, causal=call.causal, q_offset=call.q_offset,
        placement=call.placement, sdc=call.sdc, vmc=call.vmc, return_stats=True, out=out, block_config=block_config,
    )  # fmt: skip
    assert result[0] is out
    return result


def _check_all(q, k, v, theta=None, *, block_config=None, oracle=True, what="", **kw):
    """Kernel vs reference (counts exactly, output up to rounding) and vs the float64 oracle (tolerance rule)."""
    out, kept, visible, skipped, total = _prefill(q, k, v, theta, block_config=block_config, **kw)
    ref, stats = reference.top_theta_attention(q, k, v, theta, return_stats=True, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape, what
    assert not torch.isnan(out).any(), f"{what}: NaN in output (unwritten or 0/0)"
    assert torch.equal(visible, stats.visible), what
    assert torch.equal(kept, stats.kept), what
    assert 0 <= int(skipped) <= int(total), what
    if oracle:
        out64, kept64, visible64, _ = oracle_top_theta(q, k, v, theta, **kw)
        assert torch.equal(visible.long().cpu(), visible64), what
        assert torch.equal(kept.long().cpu(), kept64), what
        assert_close_to_oracle(
            out, out64, q, k, v, kw.get("attn_mask"), kw.get("scale"), causal=kw.get("causal", True),
            q_offset=kw.get("q_offset"), what=what,
        )  # fmt: skip
    atol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[q.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=1e-3, msg=what)
    return out, kept, visible, skipped, total


def _scores64(q, k, scale=None):
    """``scale · q kᵀ`` in float64 on the CPU, ``[B, Hq, Lq, Lk]`` (GQA keys repeated)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kk = k.detach().double().cpu().repeat_interleave(q.shape[1] // k.shape[1], 1)
    return scale * q.detach().double().cpu() @ kk.transpose(-1, -2)


def _visible64(q, k, *, causal=True, q_offset=None, attn_mask=None):
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    q_offset = lk - lq if q_offset is None else q_offset
    vis = torch.ones(b, hq, lq, lk, dtype=torch.bool)
    if causal:
        vis &= torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + q_offset
    if attn_mask is not None:
        vis &= attn_mask.cpu()
    return vis


def _off_the_points(value: float, points: torch.Tensor, gap: float) -> float:
    """The point nearest ``value`` that lies at least ``gap / 2`` from every entry of ``points`` (sorted float64)."""
    if not math.isfinite(value) or points.numel() == 0:
        return value
    inf = torch.tensor([math.inf], dtype=torch.float64)
    edges = torch.cat([-inf, points, inf])
    lo, hi = edges[:-1] + gap / 2, edges[1:] - gap / 2
    wide = lo <= hi
    nearest = torch.minimum(torch.maximum(torch.tensor(value, dtype=torch.float64), lo[wide]), hi[wide])
    return float(nearest[(nearest - value).abs().argmin()])


def _theta(q, k, fractions, *, placement="pre", causal=True, q_offset=None, attn_mask=None, scale=None):
    """A threshold table ``[Hq, T]`` keeping about ``fractions[h][t]`` of head h's visible scores, each entry moved
    off that head's visible scores (log-probabilities for "post") by a gap that float32 rounding cannot cross.
    A fraction of 0 gives +inf (nothing kept), 1 gives -inf ("pre") or 0 ("post") (everything kept)."""
    s = _scores64(q, k, scale)
    vis = _visible64(q, k, causal=causal, q_offset=q_offset, attn_mask=attn_mask)
    if placement == "post":
        s = torch.log_softmax(s.masked_fill(~vis, -math.inf), -1)
    table = torch.zeros(len(fractions), len(fractions[0]), dtype=torch.float64)
    for h, row in enumerate(fractions):
        points = s[:, h][vis[:, h]].sort().values
        for t, frac in enumerate(row):
            if frac <= 0:
                table[h, t] = math.inf
            elif frac >= 1:
                table[h, t] = -math.inf
            else:
                table[h, t] = _off_the_points(float(torch.quantile(points, 1 - frac)), points, 2e-3)
    if placement == "post":
        table = table.exp()  # log-probability cut -> probability threshold; -inf -> 0 keeps everything
    return table.float().to(q.device)


def _qkv(b, hq, hkv, lq, lk, d, dtype, *, spread=1.0, seed=0):
    return make_qkv(b, hq, hkv, lq, lk, d, DTYPES[dtype], DEVICE, spread=spread, seed=seed)


def _id(shape, dtype):
    b, hq, hkv, lq, lk, d = shape
    return f"B{b}-Hq{hq}-Hkv{hkv}-Lq{lq}-Lk{lk}-D{d}-{dtype}"


# Shapes x modes: odd lengths, Lq < Lk and Lq == Lk, GQA 1/2/4/8, padded and unpadded head dims, each with a different
# mix of placement, compensation, vmc, k_dense and masks (the full product would not fit the CPU time budget).
CASES = [
    ((1, 2, 2, 37, 37, 16), "fp32", dict(fractions="dense")),
    ((1, 4, 2, 33, 50, 32), "fp16", dict(sdc="exact", k_dense=5)),
    ((1, 8, 1, 21, 45, 16), "fp32", dict(sdc="none", vmc=True)),
    ((2, 4, 1, 40, 40, 64), "fp16", dict(sdc="threshold", vmc=True, padding=True)),
    ((1, 2, 1, 19, 70, 24), "fp32", dict(sdc="calibrated", general_mask=True)),
    ((1, 4, 2, 35, 35, 64), "fp32", dict(placement="post", vmc=True)),
    ((2, 2, 1, 26, 31, 16), "fp16", dict(placement="post", padding=True, k_dense=3)),
    ((1, 2, 2, 33, 33, 128), "fp32", dict(sdc="threshold", vmc=True, general_mask=True)),
    ((1, 4, 4, 29, 29, 16), "fp16", dict(sdc="none", causal=False, padding=True, vmc=True)),
    ((1, 2, 1, 24, 40, 32), "fp32", dict(placement="post", causal=False, general_mask=True)),
    ((1, 2, 1, 30, 36, 16), "fp32", dict(sdc="calibrated", vmc=True, q_offset=-7)),
    ((1, 2, 2, 20, 27, 16), "fp16", dict(sdc="exact", vmc=True, q_offset=12, padding=True)),
]


def _case_kwargs(q, k, spec):
    """Turn a CASES spec into (theta, call kwargs) for inputs q, k."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    kw = {key: spec[key] for key in ("sdc", "vmc", "k_dense", "placement", "causal", "q_offset") if key in spec}
    if spec.get("padding"):
        lengths = [lk - 3 * i - 5 for i in range(b)]
        lengths[-1] = lk // 3 if b > 1 else lengths[-1]
        kw["attn_mask"] = left_padding_mask(lengths, lk, q.device)
    if spec.get("general_mask"):
        gen = torch.Generator().manual_seed(1)
        mask = torch.rand(b, 1, lq, lk, generator=gen) > 0.35
        mask[:, :, lq // 2] = False  # an empty row
        kw["attn_mask"] = mask.to(q.device)
    if spec.get("fractions") == "dense":
        return None, kw
    # Per head: a few keep fractions along the row-length axis, one head keeping nothing at long rows and one head
    # keeping everything, so that all-pruned and all-kept rows appear next to partly pruned ones.
    fractions = [[0.3, 0.5, 0.2, 0.7][h % 4] for h in range(hq)]
    table = [[f, 0.6 * f, 1.2 * f] for f in fractions]
    table[0][2] = 0.0
    table[-1] = [1.0, 1.0, 1.0]
    mask_kw = {key: kw[key] for key in ("causal", "q_offset", "attn_mask") if key in kw}
    if "q_offset" not in mask_kw:
        mask_kw["q_offset"] = lk - lq
    theta = _theta(q, k, table, placement=kw.get("placement", "pre"), **mask_kw)
    # Row lengths spread the lookup over all three entries: T = max(Lk // 3, 1) entries with the three levels.
    t_len = max(lk // 3, 1)
    levels = torch.arange(t_len, device=q.device) * 3 // t_len
    theta = theta[:, levels]
    if kw.get("sdc") == "calibrated":
        kw["sdc_table"] = torch.linspace(0.0, 2.0, hq * 5, device=q.device).reshape(hq, 5)
    return theta, kw


@pytest.mark.parametrize(
    "shape, dtype, spec",
    CASES,
    ids=[f"{_id(s, d)}-{'-'.join(f'{k}={v}' for k, v in spec.items())}" for s, d, spec in CASES],
)
def test_matches_reference_and_oracle(shape, dtype, spec):
    q, k, v = _qkv(*shape, dtype)
    theta, kw = _case_kwargs(q, k, spec)
    _check_all(q, k, v, theta, what=_id(shape, dtype), **kw)


@pytest.mark.parametrize("sdc", ["exact", "none", "threshold", "calibrated"])
@pytest.mark.parametrize("vmc", [False, True], ids=["novmc", "vmc"])
def test_every_compensation_mode(sdc, vmc):
    q, k, v = _qkv(1, 4, 2, 23, 29, 16, "fp32", seed=3)
    theta = _theta(q, k, [[0.4], [0.15], [0.0], [0.8]])
    table = torch.tensor([[0.5], [1.5], [3.0], [0.0]], device=DEVICE) if sdc == "calibrated" else None
    _check_all(q, k, v, theta, sdc=sdc, sdc_table=table, vmc=vmc, k_dense=2, what=f"{sdc}-{vmc}")


@pytest.mark.parametrize(
    "block_config", [(16, 16, 4, 1), (16, 32, 4, 1), (64, 16, 4, 1)], ids=lambda c: f"M{c[0]}N{c[1]}"
)
def test_tile_shapes_and_skipped_tile_count(block_config):
    """Tiles taller or wider than each other: same results, and the skip count is exactly the walked tiles in which
    nothing is kept (computed here from float64 scores and the tiles' visible key ranges)."""
    block_m, block_n = block_config[:2]
    q, k, v = _qkv(2, 2, 1, 45, 61, 16, "fp32", spread=2.0, seed=5)
    mask = left_padding_mask([61, 40], 61, DEVICE)
    # Head 0 keeps a handful of scores (most of its tiles are skipped), head 1 a fifth of them.
    theta = _theta(q, k, [[0.004], [0.2]], attn_mask=mask, q_offset=16)
    _, kept, _, skipped, total = _check_all(
        q, k, v, theta, block_config=block_config, oracle=False, attn_mask=mask, what=str(block_config)
    )
    s = _scores64(q, k)
    vis = _visible64(q, k, q_offset=16, attn_mask=mask)
    keep = vis & (s > theta.cpu().double()[None, :, None, :])
    assert torch.equal(keep.sum(-1).int(), kept.cpu())
    expected_total = expected_skipped = 0
    for b in range(2):
        first = int(mask[b, 0, 0].int().argmax())
        for m0 in range(0, 45, block_m):
            m1 = min(m0 + block_m, 45)
            hi = min(61, 16 + m1)
            for n0 in range(first // block_n * block_n, hi, block_n):
                for h in range(2):
                    expected_total += 1
                    expected_skipped += not bool(keep[b, h, m0:m1, n0 : n0 + block_n].any())
    assert int(total) == expected_total
    assert int(skipped) == expected_skipped
    assert 0 < expected_skipped < expected_total


def test_nothing_kept_skips_every_tile_and_gives_v_mean():
    q, k, v = _qkv(1, 2, 1, 40, 40, 16, "fp32")
    theta = torch.full((2, 1), math.inf, device=DEVICE)
    out, kept, visible, skipped, total = _check_all(q, k, v, theta, sdc="none", vmc=True)
    assert int(kept.sum()) == 0
    assert int(skipped) == int(total) > 0
    v_mean = v.float().cumsum(2) / torch.arange(1, 41, device=DEVICE)[:, None]
    torch.testing.assert_close(out[0, 1].float(), v_mean[0, 0], atol=1e-5, rtol=1e-5)
    out, *_, skipped, total = _check_all(q, k, v, theta, sdc="none", vmc=False)
    assert not out.any() and int(skipped) == int(total)


def test_everything_kept_skips_nothing_and_equals_dense():
    q, k, v = _qkv(1, 2, 1, 33, 40, 32, "fp32")
    theta = torch.full((2, 3), -math.inf, device=DEVICE)
    out, kept, visible, skipped, total = _check_all(q, k, v, theta, sdc="none")
    assert torch.equal(kept, visible) and int(skipped) == 0 and int(total) > 0
    dense, *_ = _prefill(q, k, v)
    torch.testing.assert_close(out, dense, atol=1e-6, rtol=1e-5)


def test_empty_rows_are_zero_and_never_nan():
    """Rows before the first key (negative q_offset), rows whose mask is all False, and a fully padded sequence."""
    q, k, v = _qkv(2, 2, 1, 24, 30, 16, "fp16")
    mask = torch.ones(2, 2, 24, 30, dtype=torch.bool, device=DEVICE)
    mask[0, :, 20:] = False
    mask[1] = False
    for vmc in (False, True):
        theta = _theta(q, k, [[0.3], [0.6]], q_offset=-5, attn_mask=mask)
        out, kept, visible, *_ = _check_all(q, k, v, theta, q_offset=-5, attn_mask=mask, vmc=vmc, sdc="threshold")
        assert int(visible[0, :, :5].sum()) == 0 and int(visible[1].sum()) == 0
        assert not out[0, :, :5].any() and not out[0, :, 20:].any() and not out[1].any()
    padding = left_padding_mask([30, 0], 30, DEVICE)
    out, _, visible, _, _ = _check_all(q, k, v, None, attn_mask=padding, vmc=True)
    assert int(visible[1].sum()) == 0 and not out[1].any()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_extreme_scores_stay_finite(dtype):
    q, k, v = _qkv(1, 2, 1, 35, 35, 32, dtype, spread=40.0, seed=7)
    theta = _theta(q, k, [[0.2], [0.5]])
    for sdc in ("none", "threshold"):
        out, *_ = _check_all(q, k, v, theta, sdc=sdc, vmc=True, what=f"{dtype}-{sdc}")
        assert torch.isfinite(out).all()


def test_small_query_counts_through_the_launcher():
    """The launcher handles any Lq >= 1, including the decode-sized calls the public API sends elsewhere."""
    for lq, lk in ((1, 37), (3, 20), (4, 4)):
        q, k, v = _qkv(1, 4, 2, lq, lk, 16, "fp32", seed=lq)
        theta = _theta(q, k, [[0.5], [0.2], [0.0], [1.0]])
        _check_all(q, k, v, theta, sdc="threshold", vmc=True, what=f"Lq{lq}-Lk{lk}")


def test_strided_inputs_and_output():
    """[B, L, H, D] tensors transposed to [B, H, L, D] views, and an output buffer that is such a view too."""
    b, hq, hkv, lq, lk, d = 1, 4, 2, 27, 33, 32
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(b, lq, hq, d, generator=gen).to(DEVICE).transpose(1, 2)
    k = torch.randn(b, lk, hkv, d, generator=gen).to(DEVICE).transpose(1, 2)
    v = torch.randn(b, lk, hkv, 2 * d, generator=gen).to(DEVICE)[..., ::2].transpose(1, 2)
    theta = _theta(q, k, [[0.3], [0.5], [0.1], [0.9]])
    call = prepare_call(q, k, v, theta, vmc=True, sdc="threshold")
    out = torch.full((b, lq, hq, d), float("nan"), device=DEVICE).transpose(1, 2)
    got, *_ = top_theta_prefill(
        q, k, v, call.theta, None, None, k_dense=0, scale=call.scale, causal=True, q_offset=lk - lq,
        placement="pre", sdc="threshold", vmc=True, return_stats=False, out=out,
    )  # fmt: skip
    assert got is out
    ref = reference.top_theta_attention(q, k, v, theta, vmc=True, sdc="threshold")
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-4)


def test_stats_off_returns_no_counts():
    q, k, v = _qkv(1, 2, 1, 20, 20, 16, "fp32")
    call = prepare_call(q, k, v, 0.1)
    out, kept, visible, skipped, total = top_theta_prefill(
        q, k, v, call.theta, None, None, k_dense=0, scale=call.scale, causal=True, q_offset=0,
        placement="pre", sdc="exact", vmc=False, return_stats=False,
    )  # fmt: skip
    assert kept is None and visible is None and int(total) > 0
    torch.testing.assert_close(out, reference.top_theta_attention(q, k, v, 0.1), atol=2e-6, rtol=1e-4)


def test_public_api_triton_backend():
    q, k, v = _qkv(2, 4, 2, 9, 25, 16, "fp32")
    mask = left_padding_mask([25, 18], 25, DEVICE)
    theta = _theta(q, k, [[0.3], [0.5], [0.2], [0.7]], attn_mask=mask)
    kw = dict(attn_mask=mask, sdc="threshold", vmc=True, return_stats=True)
    out, stats = top_theta_attention(q, k, v, theta, backend="triton", **kw)
    ref, ref_stats = top_theta_attention(q, k, v, theta, backend="reference", **kw)
    assert torch.equal(stats.kept, ref_stats.kept) and torch.equal(stats.visible, ref_stats.visible)
    assert isinstance(stats.skipped_tiles, int) and 0 <= stats.skipped_tiles <= stats.total_tiles
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-4)


def test_tile_configs_collapse_to_one_under_the_interpreter():
    configs = prefill.tile_configs()
    assert len(configs) >= 1
    if config.INTERPRET:
        assert configs == (config.PREFILL_INTERPRET_CONFIG,)


def _args(q, k, v, **kw):
    base = dict(
        k_dense=0, scale=0.25, causal=True, q_offset=0, placement="pre", sdc="exact", vmc=False, return_stats=False
    )
    base.update(kw)
    return (q, k, v, None, None, None), base


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(d=8), ValueError, "head dim 8"),
        (dict(d=320), ValueError, "head dim 320"),
        (dict(dtype=torch.int32), TypeError, "query has dtype torch.int32"),
        (dict(dtype=torch.float64), TypeError, "float64"),
        (dict(key_device="meta"), ValueError, "key is on meta"),
        (dict(value_dtype=torch.float16), TypeError, "value has dtype"),
        (dict(placement="middle"), ValueError, "placement"),
        (dict(sdc="post-hoc"), ValueError, "sdc"),
        (dict(out_shape=(1, 2, 5, 16)), ValueError, "out must"),
        (dict(mask_dtype=torch.int64), TypeError, "attn_mask"),
    ],
    ids=["head-dim-8", "head-dim-320", "int32", "float64", "key-device", "value-dtype", "placement", "sdc", "out-shape",
         "mask-dtype"],
)  # fmt: skip
def test_bad_input_names_the_argument(change, error, words):
    d = change.get("d", 16)
    q = torch.zeros(1, 2, 4, d, device=DEVICE).to(change.get("dtype", torch.float32))
    k = torch.zeros(1, 1, 4, d, device=change.get("key_device", DEVICE)).to(q.dtype)
    v = torch.zeros(1, 1, 4, d, device=DEVICE).to(change.get("value_dtype", q.dtype))
    args, kw = _args(q, k, v)
    for name in ("placement", "sdc"):
        if name in change:
            kw[name] = change[name]
    if "out_shape" in change:
        kw["out"] = torch.zeros(change["out_shape"], device=DEVICE)
    if "mask_dtype" in change:
        args = (*args[:5], torch.ones(1, 2, 4, 4, dtype=change["mask_dtype"], device=DEVICE))
    with pytest.raises(error, match=words):
        top_theta_prefill(*args, **kw)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(config, "INTERPRET", False)
    q = torch.zeros(1, 1, 4, 16)
    args, kw = _args(q, q, q)
    with pytest.raises(ValueError, match="query is on cpu"):
        top_theta_prefill(*args, **kw)


# ----------------------------------------------------------------------------------------------------------- GPU only


GPU_CASES = [
    ((2, 8, 2, 130, 130, 64), "bf16", dict(sdc="threshold", vmc=True, padding=True)),
    ((1, 4, 1, 97, 160, 128), "bf16", dict(placement="post", k_dense=8)),
    ((2, 4, 4, 120, 120, 128), "fp16", dict(sdc="calibrated", general_mask=True, vmc=True)),
    ((1, 8, 8, 100, 100, 256), "fp16", dict(sdc="none", causal=False)),
    ((1, 4, 2, 111, 111, 80), "fp32", dict(sdc="exact", vmc=True)),
    ((1, 2, 1, 140, 150, 64), "bf16", dict(placement="post", general_mask=True, vmc=True)),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape, dtype, spec",
    GPU_CASES,
    ids=[f"{_id(s, d)}-{'-'.join(f'{k}={v}' for k, v in spec.items())}" for s, d, spec in GPU_CASES],
)
def test_gpu_matches_reference_and_oracle(shape, dtype, spec):
    q, k, v = _qkv(*shape, dtype)
    theta, kw = _case_kwargs(q, k, spec)
    _check_all(q, k, v, theta, what=_id(shape, dtype), **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("lq, lk", [(513, 513), (700, 1500), (1024, 2048)])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gpu_long_sequences_against_reference(lq, lk, dtype):
    """Autotuned launches at lengths in different buckets. The oracle is too slow here, and so many scores leave no
    clear gap for a threshold, so q and k are small integers and the scale a power of two: every score is an exact
    multiple of 1/16 in any summation order, and thresholds halfway between two multiples can never tie."""
    gen = torch.Generator().manual_seed(lq)
    q = torch.randint(-2, 3, (2, 8, lq, 128), generator=gen).to(DEVICE, DTYPES[dtype])
    k = torch.randint(-2, 3, (2, 2, lk, 128), generator=gen).to(DEVICE, DTYPES[dtype])
    v = torch.randn(2, 2, lk, 128, generator=gen).to(DEVICE, DTYPES[dtype])
    scale = 1.0 / 16
    scores = _scores64(q, k, scale)
    levels = torch.tensor(
        [0.6, 0.9, 0.97, 0.995], dtype=torch.float64
    )  # quantiles: keep about 40% .. 0.5% of the scores
    cuts = torch.quantile(scores[:, :, ::7, ::7].transpose(0, 1).reshape(8, -1), levels, dim=1).T  # [Hq, 4]
    theta = ((cuts * 16).floor() + 0.5) / 16
    theta = theta[:, torch.arange(64) * 4 // 64].float().to(DEVICE)  # T = 64, four levels along the row length
    mask = left_padding_mask([lk, lk // 2], lk, DEVICE)
    kw = dict(scale=scale, attn_mask=mask, sdc="threshold", vmc=True)
    _, kept, visible, skipped, total = _check_all(q, k, v, theta, oracle=False, what=f"{lq}x{lk}-{dtype}", **kw)
    assert int(total) > 0 and 0 < int(kept.sum()) < int(visible.sum())


@pytest.mark.gpu
@pytest.mark.parametrize("block", config.PREFILL_CONFIGS, ids=lambda c: "M{}-N{}-W{}-S{}".format(*c))
@pytest.mark.parametrize("dtype, d", [("fp16", 64), ("bf16", 128), ("fp32", 64)])
def test_gpu_every_autotune_config(block, dtype, d):
    shared = prefill._device_shared_memory(torch.device(DEVICE))
    if not prefill.config_fits(block, d, DTYPES[dtype].itemsize, shared):
        pytest.skip("pruned at launch: does not fit this device's shared memory")
    q, k, v = _qkv(2, 4, 2, 150, 211, d, dtype, seed=11)
    specs = [dict(sdc="threshold", vmc=True, padding=True), dict(placement="post", general_mask=True)]
    for spec in specs[:1] if dtype == "fp32" else specs:  # float32 kernels are slow to compile: one variant
        theta, kw = _case_kwargs(q, k, spec)
        _check_all(q, k, v, theta, block_config=block, oracle=False, what=f"{block}-{dtype}-{spec}", **kw)
