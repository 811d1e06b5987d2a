"""The Triton decode kernel (kernels/decode.py) against the reference and the float64 oracle.

On CPU the kernels run under TRITON_INTERPRET=1 (float32 and float16, small shapes, forced split counts and small
tiles so that several splits with uneven remainders and several tiles per split are exercised on short keys).
bfloat16, long caches and the automatic split count run in the GPU-marked tests.
"""

import pytest
import torch
from sa_testing import assert_close_to_oracle, left_padding_mask, make_qkv, oracle_top_theta, quantile_theta

from sparse_attention import reference, top_theta_attention
from sparse_attention.kernels import config
from sparse_attention.kernels.decode import top_theta_decode
from sparse_attention.validation import prepare_call

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _decode(q, k, v, theta=None, *, num_splits=None, block_n=None, **kw):
    """Run the launcher on a prepared call with a NaN-poisoned output; return (out, kept, visible, kept_v_rows)."""
    call = prepare_call(q, k, v, theta, return_stats=True, **kw)
    out = torch.full_like(q, float("nan"))
    result = top_theta_decode(
        call.query, call.key, call.value, call.theta, call.sdc_table, call.attn_mask,
        k_dense=call.k_dense, scale=call.scale, causal=call.causal, q_offset=call.q_offset,
        placement=call.placement, sdc=call.sdc, vmc=call.vmc, return_stats=True,
        out=out, num_splits=num_splits, block_n=block_n,
    )  # fmt: skip
    assert result[0] is out
    return result


def _check_all(q, k, v, theta=None, *, num_splits=None, block_n=None, what="", **kw):
    """Kernel vs reference (counts exactly, output tightly) and vs the float64 oracle (tolerance rule, V rows)."""
    out, kept, visible, kv_rows = _decode(q, k, v, theta, num_splits=num_splits, block_n=block_n, **kw)
    ref, stats = reference.top_theta_attention(q, k, v, theta, return_stats=True, **kw)
    out64, kept64, visible64, kv_rows64 = oracle_top_theta(q, k, v, theta, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.equal(visible.long().cpu(), visible64), what
    assert torch.equal(kept.long().cpu(), kept64), what
    assert torch.equal(kept.cpu(), stats.kept.cpu()), what
    assert torch.equal(kv_rows.long().cpu(), kv_rows64), what
    mask = kw.get("attn_mask")
    scale = kw.get("scale")
    assert_close_to_oracle(out, out64, q, k, v, mask, scale, causal=kw.get("causal", True),
                           q_offset=kw.get("q_offset"), what=what)  # fmt: skip
    # The reference computes the same float32 quantities in another order: only rounding may differ.
    atol = 2e-6 if q.dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=1e-3, msg=what)
    return out, kept, visible, kv_rows


def _theta_table(q, k, keep_fraction, t_len):
    """Pre-softmax thresholds ``[Hq, T]`` that vary with the row length, so the ``min(n, T) - 1`` lookup matters."""
    # Offset from the quantile, which can coincide with a score exactly (a tie that rounding would decide).
    base = quantile_theta(q.cpu(), k.cpu(), keep_fraction) + 1e-3
    return (base[:, None] + 0.5 * torch.arange(t_len)[None, :].float() / t_len).to(q.device)


def _post_theta(hq, lk, device):
    """Probability thresholds around 1/n, which keep roughly half of each row."""
    return (torch.linspace(0.5, 1.5, hq)[:, None] / torch.arange(1, lk + 1)[None, :]).to(device)


# (B, Hq, Hkv, Lq, Lk, D): Lk from 1 up, GQA 1/2/4/8, head dims that need padding, Lq > 1 (speculative decoding).
SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 4, 2, 1, 77, 32),
    (1, 8, 1, 1, 50, 64),
    (2, 2, 2, 1, 33, 24),
    (1, 4, 1, 3, 40, 32),
    (1, 8, 2, 2, 29, 16),
]


def _id(shape, dtype):
    b, hq, hkv, lq, lk, d = shape
    return f"B{b}-Hq{hq}-Hkv{hkv}-Lq{lq}-Lk{lk}-D{d}-{dtype}"


@pytest.mark.parametrize(
    "shape,dtype",
    [pytest.param(s, "fp32", id=_id(s, "fp32")) for s in SHAPES]
    + [pytest.param(s, "fp16", id=_id(s, "fp16")) for s in SHAPES[1::2]],
)
def test_shapes_match_reference_and_oracle(shape, dtype):
    b, hq, hkv, lq, lk, d = shape
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, DTYPES[dtype], DEVICE, spread=2.0, seed=lk + 7 * lq)
    theta = _theta_table(q, k, 0.4, max(1, lk // 2))
    _check_all(q, k, v, theta, num_splits=3, block_n=16, sdc="threshold", what=_id(shape, dtype))


MODES = [
    pytest.param(dict(), id="pre-exact"),
    pytest.param(dict(sdc="none"), id="pre-none"),
    pytest.param(dict(sdc="threshold"), id="pre-threshold"),
    pytest.param(dict(sdc="calibrated"), id="pre-calibrated"),
    pytest.param(dict(sdc="exact", vmc=True), id="pre-exact-vmc"),
    pytest.param(dict(sdc="threshold", vmc=True, k_dense=20), id="pre-threshold-vmc-kdense20"),
    pytest.param(dict(sdc="none", k_dense=100), id="pre-none-kdense-all"),
    pytest.param(dict(placement="post"), id="post-exact"),
    pytest.param(dict(placement="post", vmc=True, k_dense=10), id="post-vmc-kdense10"),
    pytest.param(dict(dense=True, vmc=True), id="dense-vmc"),
]


@pytest.mark.parametrize("mode", MODES)
def test_modes(mode):
    # Lq = 2 with left padding: rows of one head have different n, hence different thresholds and k_dense decisions.
    b, hq, hkv, lq, lk, d = 2, 2, 1, 2, 45, 32
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, torch.float32, DEVICE, spread=2.0, seed=3)
    kw = dict(mode)
    if kw.pop("dense", False):
        theta = None
    elif kw.get("placement") == "post":
        theta = _post_theta(hq, lk, DEVICE)
    else:
        theta = _theta_table(q, k, 0.4, 30)
    if kw.get("sdc") == "calibrated":
        # A table shorter than theta's: each is looked up with its own length.
        kw["sdc_table"] = (torch.rand(hq, 7) * 3).to(DEVICE)
    mask = left_padding_mask([lk, 20], lk, DEVICE)
    _check_all(q, k, v, theta, attn_mask=mask, num_splits=2, block_n=32, what=str(mode), **kw)


@pytest.mark.parametrize("num_splits", [1, 3, 5, 8], ids=lambda s: f"splits{s}")
def test_split_counts(num_splits):
    # Lk = 77 with 16-key tiles: the splits have uneven remainders, and 8 splits leave some of them empty.
    q, k, v = make_qkv(1, 2, 1, 1, 77, 32, torch.float32, DEVICE, spread=2.0, seed=11)
    theta = quantile_theta(q.cpu(), k.cpu(), 0.3).to(DEVICE)
    _check_all(q, k, v, theta, num_splits=num_splits, block_n=16, sdc="threshold", vmc=True, what=f"S{num_splits}")


def test_automatic_split_count_and_tile():
    q, k, v = make_qkv(2, 4, 2, 1, 300, 64, torch.float16, DEVICE, spread=2.0, seed=12)
    theta = quantile_theta(q.cpu(), k.cpu(), 0.3).to(DEVICE)
    _check_all(q, k, v, theta, sdc="calibrated", sdc_table=torch.full((4,), 0.5, device=DEVICE))


def test_left_padding_and_static_cache():
    # HF generate with a static cache: Lk is the cache size, the valid prefix ends at q_offset; batches are left
    # padded (the last one fully), so each batch has its own key range and some rows see nothing.
    b, hq, hkv, lk, d = 4, 2, 1, 96, 32
    q, k, v = make_qkv(b, hq, hkv, 1, lk, d, torch.float16, DEVICE, spread=2.0, seed=13)
    pos = 60
    lengths = torch.tensor([61, 30, 1, 0])
    mask = torch.arange(lk)[None, :] >= (pos + 1 - lengths)[:, None]  # [B, Lk], True up to the cache end
    mask = mask[:, None, None, :].to(DEVICE)
    theta = _theta_table(q, k, 0.5, 64)
    out, _, visible, kv_rows = _check_all(
        q, k, v, theta, attn_mask=mask, q_offset=pos, num_splits=3, block_n=32, sdc="threshold", vmc=True
    )
    assert visible[:, :, 0].tolist() == [[61] * hq, [30] * hq, [1] * hq, [0] * hq]
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    assert kv_rows[3].tolist() == [0]


def test_general_masks_and_noncausal():
    # A full per-head, per-row mask (no broadcast) and a batch-broadcast one, with and without causality.
    b, hq, hkv, lq, lk, d = 2, 4, 2, 2, 37, 16
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, torch.float32, DEVICE, spread=2.0, seed=14)
    gen = torch.Generator().manual_seed(1)
    full = (torch.rand(b, hq, lq, lk, generator=gen) > 0.3).to(DEVICE)
    full[0, 1, 0] = False  # one row sees nothing at all
    heads = (torch.rand(1, hq, 1, lk, generator=gen) > 0.5).to(DEVICE)
    theta = _theta_table(q, k, 0.5, 40)
    for mask, causal in ((full, True), (heads, False)):
        _check_all(q, k, v, theta, attn_mask=mask, causal=causal, num_splits=2, block_n=16,
                   sdc="none", vmc=True, what=f"mask{tuple(mask.shape)}-causal{causal}")  # fmt: skip


@pytest.mark.parametrize("q_offset", [-2, 0, 5, 60], ids=lambda o: f"qoff{o}")
def test_query_offsets(q_offset):
    # Negative offsets give rows with no visible key (zeros, never NaN); large ones clamp n at Lk.
    q, k, v = make_qkv(1, 2, 1, 3, 20, 16, torch.float32, DEVICE, spread=2.0, seed=15)
    theta = quantile_theta(q.cpu(), k.cpu(), 0.5).to(DEVICE)
    out, _, visible, _ = _check_all(
        q, k, v, theta, q_offset=q_offset, num_splits=2, block_n=16, sdc="threshold", vmc=True
    )
    if q_offset < 0:
        assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))


@pytest.mark.parametrize("sdc,vmc", [("none", False), ("threshold", False), ("exact", True)], ids=str)
def test_fully_pruned_rows(sdc, vmc):
    # θ = +inf prunes everything: zeros (plus the V mean with vmc), never NaN, and no V row is read.
    q, k, v = make_qkv(1, 4, 2, 1, 30, 16, torch.float16, DEVICE, seed=16)
    theta = torch.full((4,), float("inf"), device=DEVICE)
    out, kept, _, kv_rows = _check_all(q, k, v, theta, num_splits=2, block_n=16, sdc=sdc, vmc=vmc)
    assert int(kept.sum()) == 0 and int(kv_rows.sum()) == 0
    if not vmc:
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("vmc", [False, True], ids=["novmc", "vmc"])
def test_pruned_v_rows_are_never_read(vmc):
    # V rows that no head of the group keeps are NaN: reading one (even to multiply it by 0) would poison the output.
    # With vmc the visible rows are all read for the V mean, so only invisible rows may be poisoned then.
    b, hq, hkv, lk, d = 2, 4, 2, 64, 32
    q, k, v = make_qkv(b, hq, hkv, 1, lk, d, torch.float32, DEVICE, spread=3.0, seed=17)
    theta = quantile_theta(q.cpu(), k.cpu(), 0.15).to(DEVICE)
    mask = left_padding_mask([64, 40], lk, DEVICE)
    call = prepare_call(q, k, v, theta, attn_mask=mask, return_stats=True)
    _, stats = reference.top_theta_attention(q, k, v, theta, attn_mask=mask, return_stats=True)
    s = reference.grouped_scores(q, k, call.scale)[:, :, 0]  # [B, Hq, Lk]
    vis = mask[:, 0, 0, None, :].expand(b, hq, lk)
    kept = vis & (s > theta[None, :, None])
    needed = (vis if vmc else kept).reshape(b, hkv, hq // hkv, lk).any(2)  # [B, Hkv, Lk]
    assert (~needed).any() and needed.any()
    poisoned = v.masked_fill(~needed[..., None], float("nan"))
    out, kept_n, _, kv_rows = _decode(q, k, poisoned, theta, attn_mask=mask, num_splits=2, block_n=16, vmc=vmc)
    assert not torch.isnan(out).any()
    assert torch.equal(kv_rows, kept.reshape(b, hkv, hq // hkv, lk).any(2).sum(-1).to(torch.int32))
    assert torch.equal(kept_n, stats.kept)


def test_row_blocks_share_kept_v_rows(monkeypatch):
    # A kv group wider than DECODE_MAX_BLOCK_M rows runs as several row blocks; kept_v_rows is still the union.
    monkeypatch.setattr(config, "DECODE_MAX_BLOCK_M", 16)
    q, k, v = make_qkv(1, 8, 1, 3, 41, 16, torch.float32, DEVICE, spread=2.0, seed=18)
    theta = _theta_table(q, k, 0.3, 41)
    _check_all(q, k, v, theta, num_splits=2, block_n=32, sdc="threshold")


def test_strided_inputs_and_output():
    # K/V as views of a [B, Lk, Hkv, D] cache (HF layout), query and output with non-contiguous strides.
    b, hq, hkv, lk, d = 2, 4, 2, 25, 16
    q, k, v = make_qkv(b, hq, hkv, 1, lk, d, torch.float32, DEVICE, spread=2.0, seed=19)
    k_view = k.transpose(1, 2).contiguous().transpose(1, 2)
    v_view = v.transpose(1, 2).contiguous().transpose(1, 2)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not k_view.is_contiguous() and torch.equal(k_view, k)
    theta = quantile_theta(q, k, 0.4)
    call = prepare_call(q_view, k_view, v_view, theta)
    out = torch.full((b, 1, hq, d), float("nan"), device=DEVICE).transpose(1, 2)
    top_theta_decode(
        call.query, call.key, call.value, call.theta, None, None, k_dense=0, scale=call.scale, causal=True,
        q_offset=call.q_offset, placement="pre", sdc="exact", vmc=False, return_stats=False, out=out, num_splits=2,
    )  # fmt: skip
    torch.testing.assert_close(out, reference.top_theta_attention(q, k, v, theta), atol=2e-6, rtol=1e-4)


def test_long_cache_single_case():
    # A few thousand keys, one cheap head, through the automatic split count.
    q, k, v = make_qkv(1, 1, 1, 1, 2048, 16, torch.float32, DEVICE, spread=3.0, seed=20)
    theta = quantile_theta(q, k, 0.05)
    _check_all(q, k, v, theta, sdc="threshold")


def test_functional_backend_dispatch():
    # top_theta_attention(backend="triton") reaches this kernel for Lq <= DECODE_MAX_Q and exposes kept_v_rows.
    q, k, v = make_qkv(1, 4, 2, 1, 30, 16, torch.float32, DEVICE, spread=2.0, seed=21)
    theta = quantile_theta(q, k, 0.4)
    out, stats = top_theta_attention(q, k, v, theta, backend="triton", return_stats=True)
    ref, ref_stats = reference.top_theta_attention(q, k, v, theta, return_stats=True)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-4)
    assert torch.equal(stats.kept_v_rows, ref_stats.kept_v_rows)


def _args(q, k, v, **over):
    kw = dict(k_dense=0, scale=0.25, causal=True, q_offset=0, placement="pre", sdc="exact", vmc=False,
              return_stats=False)  # fmt: skip
    kw.update(over)
    theta = kw.pop("theta", None)
    table = kw.pop("sdc_table", None)
    mask = kw.pop("attn_mask", None)
    return (q, k, v, theta, table, mask), kw


BAD = [
    pytest.param(
        dict(
            q=torch.zeros(1, 2, 1, 16).double(),
            k=torch.zeros(1, 2, 5, 16).double(),
            v=torch.zeros(1, 2, 5, 16).double(),
        ),
        TypeError,
        "float16",
        id="float64",
    ),  # fmt: skip
    pytest.param(dict(k=torch.zeros(1, 2, 5, 16, dtype=torch.float16)), TypeError, "dtype", id="mixed-dtypes"),
    pytest.param(dict(q=torch.zeros(1, 3, 1, 16)), ValueError, "multiple", id="heads-do-not-group"),
    pytest.param(
        dict(q=torch.zeros(1, 2, 1, 8), k=torch.zeros(1, 2, 5, 8), v=torch.zeros(1, 2, 5, 8)),
        ValueError,
        "head dim",
        id="head-dim-8",
    ),  # fmt: skip
    pytest.param(dict(v=torch.zeros(1, 2, 4, 16)), ValueError, "shape", id="value-length"),
    pytest.param(dict(q=torch.zeros(2, 16)), ValueError, "rank", id="rank2"),
    pytest.param(dict(theta=torch.zeros(2)), TypeError, "Hq, T", id="theta-1d"),
    pytest.param(dict(theta=torch.zeros(3, 4)), ValueError, "theta", id="theta-heads"),
    pytest.param(dict(placement="middle"), ValueError, "placement", id="placement"),
    pytest.param(dict(sdc="approx"), ValueError, "sdc", id="sdc"),
    pytest.param(dict(placement="post", sdc="none"), ValueError, "post", id="post-none"),
    pytest.param(dict(theta=torch.zeros(2, 4), sdc="calibrated"), ValueError, "sdc_table", id="missing-table"),
    pytest.param(dict(attn_mask=torch.ones(1, 1, 1, 5)), TypeError, "bool", id="float-mask"),
    pytest.param(dict(attn_mask=torch.ones(1, 1, 1, 6, dtype=torch.bool)), ValueError, "broadcast", id="mask-shape"),
    pytest.param(dict(out=torch.zeros(1, 2, 2, 16)), ValueError, "out", id="out-shape"),
    pytest.param(dict(out=torch.zeros(1, 2, 1, 16, dtype=torch.float16)), ValueError, "out", id="out-dtype"),
    pytest.param(dict(num_splits=0), ValueError, "num_splits", id="zero-splits"),
    pytest.param(dict(block_n=48), ValueError, "block_n", id="block-n"),
]


@pytest.mark.parametrize("over,error,match", BAD)
def test_bad_input(over, error, match):
    tensors = dict(q=torch.zeros(1, 2, 1, 16), k=torch.zeros(1, 2, 5, 16), v=torch.zeros(1, 2, 5, 16))
    for name in ("q", "k", "v"):
        if name in over:
            tensors[name] = over.pop(name)
    args, kw = _args(tensors["q"], tensors["k"], tensors["v"], **over)
    with pytest.raises(error, match=match):
        top_theta_decode(*args, **kw)


def test_empty_keys_give_zeros():
    q, k, v = make_qkv(1, 2, 1, 1, 0, 16, torch.float32, DEVICE)
    out, kept, visible, kv_rows = _decode(q, k, v, torch.zeros(2, device=DEVICE), vmc=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert int(kept.sum()) == int(visible.sum()) == int(kv_rows.sum()) == 0


# ---------------------------------------------------------------------------------------------------------------
# GPU: bfloat16, long caches, automatic split counts, wide groups.
# ---------------------------------------------------------------------------------------------------------------

GPU_SHAPES = [
    (1, 8, 8, 1, 1, 64),
    (4, 32, 8, 1, 1531, 128),
    (2, 16, 2, 1, 4096, 64),
    (1, 32, 4, 4, 777, 128),
    (3, 8, 1, 1, 2500, 256),
    (2, 71, 1, 1, 300, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape,dtype", [pytest.param(s, dt, id=_id(s, dt)) for s in GPU_SHAPES for dt in ("bf16", "fp16", "fp32")]
)
@pytest.mark.parametrize("mode", [dict(sdc="threshold"), dict(sdc="exact", vmc=True), dict(placement="post")],
                         ids=["pre-threshold", "pre-exact-vmc", "post"])  # fmt: skip
def test_gpu_against_oracle(shape, dtype, mode):
    b, hq, hkv, lq, lk, d = shape
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, DTYPES[dtype], "cuda", spread=2.0, seed=lk)
    kw = dict(mode)
    theta = _post_theta(hq, lk, "cuda") if kw.get("placement") == "post" else _theta_table(q, k, 0.3, lk)
    mask = left_padding_mask([lk - (3 * i) % max(lk, 1) for i in range(b)], lk, "cuda")
    out, kept, visible, kv_rows = _decode(q, k, v, theta, attn_mask=mask, **kw)
    out64, kept64, visible64, kv_rows64 = oracle_top_theta(q, k, v, theta, attn_mask=mask, **kw)
    assert torch.equal(visible.long().cpu(), visible64)
    # Over millions of scores one may fall within rounding of θ; allow a handful of flipped keep decisions.
    assert int((kept.long().cpu() - kept64).abs().sum()) <= 4
    assert int((kv_rows.long().cpu() - kv_rows64).abs().sum()) <= 4
    assert_close_to_oracle(out, out64, q, k, v, mask, what=str(mode))


@pytest.mark.gpu
@pytest.mark.parametrize("lk", [8192, 32768], ids=lambda n: f"Lk{n}")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gpu_long_cache_against_reference(lk, dtype):
    q, k, v = make_qkv(2, 32, 8, 1, lk, 128, DTYPES[dtype], "cuda", spread=2.0, seed=5)
    theta = quantile_theta(q, k, 0.1)
    mask = left_padding_mask([lk, lk // 3], lk, "cuda")
    out, kept, visible, kv_rows = _decode(q, k, v, theta, attn_mask=mask, sdc="threshold")
    ref, stats = reference.top_theta_attention(q, k, v, theta, attn_mask=mask, sdc="threshold", return_stats=True)
    assert not torch.isnan(out).any()
    assert torch.equal(visible, stats.visible)
    assert int((kept - stats.kept).abs().sum()) <= 8
    assert int((kv_rows - stats.kept_v_rows).abs().sum()) <= 8
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3, 17, 64], ids=lambda s: f"splits{s}")
def test_gpu_forced_splits_agree(num_splits):
    q, k, v = make_qkv(2, 16, 4, 1, 3001, 128, torch.float16, "cuda", spread=2.0, seed=6)
    theta = quantile_theta(q, k, 0.2)
    out, kept, _, kv_rows = _decode(q, k, v, theta, num_splits=num_splits, sdc="threshold", vmc=True)
    ref, stats = reference.top_theta_attention(q, k, v, theta, sdc="threshold", vmc=True, return_stats=True)
    assert int((kept - stats.kept).abs().sum()) <= 4
    assert int((kv_rows - stats.kept_v_rows).abs().sum()) <= 4
    torch.testing.assert_close(out.float(), ref.float(), atol=5e-3, rtol=5e-3)
