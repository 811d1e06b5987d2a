"""The Triton decode kernel (kernels/decode.py) against the float64 oracle of tests/support/sa_testing.py.

Self-contained: the launcher gets normalised arguments (kernel spec) from the small helpers below, never from the
Python layers. On CPU the kernels run under TRITON_INTERPRET=1 (float32 and float16, small shapes, 16-key tiles and
forced split counts, so that several splits with uneven remainders and several tiles per split run on short caches).
bfloat16, long caches, the split count computed from the compiled kernel, every warps/stages setting and CUDA-graph
capture are GPU-marked.
"""

import math

import pytest
import torch
from sa_testing import assert_close_to_oracle, left_padding_mask, make_qkv, oracle_top_theta, quantile_theta, tolerance
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_attention.kernels import config, decode
from sparse_attention.kernels.common import unsupported_reason
from sparse_attention.kernels.decode import DeviceLimits, choose_num_splits, resident_ctas_per_sm, top_theta_decode

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H100 = DeviceLimits(sm_count=132, regs_per_sm=65536, smem_per_sm=233472, threads_per_sm=2048, max_ctas_per_sm=32)


# ---------------------------------------------------------------------------------------------------------------
# Normalising arguments the way the ops layer does (kernel spec, "Normalised arguments")
# ---------------------------------------------------------------------------------------------------------------


def key_padding_of(mask: torch.Tensor):
    """``(mask [B, Lk], prefix [B, Lk + 1], bounds [B, 2])`` of a boolean ``[B, Lk]`` key mask, with device ops
    only (no host sync): what the ops layer computes once per decode step and shares between layers."""
    b, lk = mask.shape
    prefix = torch.zeros(b, lk + 1, dtype=torch.int32, device=mask.device)
    prefix[:, 1:] = mask.cumsum(1)
    idx = torch.arange(lk, device=mask.device)
    # Sentinel columns keep the reductions defined when Lk = 0.
    first = torch.cat([torch.where(mask, idx, lk), torch.full((b, 1), lk, device=mask.device)], 1).amin(1)
    last = torch.cat([torch.where(mask, idx + 1, 0), torch.zeros(b, 1, device=mask.device, dtype=idx.dtype)], 1)
    seen = prefix[:, -1] > 0
    bounds = torch.stack([torch.where(seen, first, 0), torch.where(seen, last.amax(1), 0)], 1).to(torch.int32)
    return mask, prefix, bounds


def _table(table, hq: int, device):
    if table is None:
        return None
    t = torch.as_tensor(table, dtype=torch.float32)
    t = t.reshape(1, 1) if t.dim() == 0 else t[:, None] if t.dim() == 1 else t
    return t.expand(hq, t.shape[1]).contiguous().to(device)


def run_decode(q, k, v, theta=None, *, sdc_table=None, sinks=None, attn_mask=None, kp_mask=None, k_dense=0,
               sm_scale=None, softcap=0.0, causal=True, q_offset=None, placement="pre", sdc="exact", sdc_scale=1.0,
               cap=0, vmc=False, num_splits=None, block_n=16, out=None):  # fmt: skip
    """The launcher on normalised arguments with a NaN-poisoned output buffer; returns its DecodeResult."""
    b, hq, lq, _ = q.shape
    lk, dv = k.shape[2], v.shape[3]
    if out is None:
        out = torch.full((b, hq, lq, dv), float("nan"), dtype=q.dtype, device=q.device)
    result = top_theta_decode(
        q, k, v, theta=_table(theta, hq, q.device), sdc_table=_table(sdc_table, hq, q.device),
        sinks=None if sinks is None else sinks.float().contiguous().to(q.device),
        attn_mask=None if attn_mask is None else attn_mask.to(q.device).expand(b, hq, lq, lk),
        key_padding=None if kp_mask is None else key_padding_of(kp_mask.to(q.device)),
        k_dense=k_dense, sm_scale=q.shape[-1] ** -0.5 if sm_scale is None else sm_scale, softcap=softcap,
        causal=causal, q_offset=lk - lq if q_offset is None else q_offset, placement=placement, sdc=sdc,
        sdc_scale=sdc_scale, cap=cap, vmc=vmc, return_stats=True, out=out, num_splits=num_splits, block_n=block_n,
    )  # fmt: skip
    assert result.out is out
    return result


def _oracle(q, k, v, theta, *, kp_mask=None, attn_mask=None, sm_scale=None, softcap=0.0, cap=0, **kw):
    for name in ("num_splits", "block_n", "out"):
        kw.pop(name, None)
    mask = kp_mask[:, None, None, :] if kp_mask is not None else attn_mask
    return oracle_top_theta(q, k, v, theta, attn_mask=mask, scale=sm_scale, softcap=softcap or None, cap=cap or None,
                            **kw)  # fmt: skip


def check(q, k, v, theta=None, *, what="", may_be_nan=None, **kw):
    """Kernel vs the float64 oracle: counts exactly (rows that read a NaN excepted), output by the tolerance rule,
    every NaN row NaN in all columns. Rows in ``may_be_nan`` ([B, Hq, Lq] bool) may also be NaN in every column
    (decision 5: a row whose tile loads a NaN V row that it does not keep). Returns ``(result, oracle)``."""
    result = run_decode(q, k, v, theta, **kw)
    out64, kept64, visible64, kv_rows64 = oracle = _oracle(q, k, v, theta, **kw)
    out, kept = result.out.cpu(), result.kept.long().cpu()
    assert out.dtype == q.dtype and out.shape == out64.shape, what
    assert torch.equal(result.visible.long().cpu(), visible64), what
    nan_rows = kept64 == -1
    assert torch.equal(kept[~nan_rows], kept64[~nan_rows]), what
    if not nan_rows.any():
        assert torch.equal(result.kept_v_rows.long().cpu(), kv_rows64), what
    assert torch.isnan(out[nan_rows]).all(), f"{what}: a row that reads a NaN is not NaN everywhere"
    finite = ~nan_rows
    if may_be_nan is not None:
        came_nan = may_be_nan & finite & torch.isnan(out).any(-1)
        assert torch.isnan(out[came_nan]).all(), f"{what}: a row with a NaN column is not NaN everywhere"
        finite = finite & ~came_nan
    assert not torch.isnan(out[finite]).any(), f"{what}: NaN in a row that reads none"
    # The tolerance rule (sa_testing.tolerance) on the rows that read no NaN, with PyTorch's own error measured on
    # NaN-free copies of the inputs (tests poison keys and values that must not be read).
    mask = kw["kp_mask"][:, None, None, :] if kw.get("kp_mask") is not None else kw.get("attn_mask")
    clean = [torch.nan_to_num(t) for t in (q, k, v)]
    err = float((out[finite].double() - out64[finite]).abs().max()) if finite.any() else 0.0
    magnitude = float(out64[finite].abs().max()) if finite.any() else 0.0
    tol = tolerance(*clean, mask, scale=kw.get("sm_scale"), causal=kw.get("causal", True),
                    q_offset=kw.get("q_offset"), magnitude=magnitude)  # fmt: skip
    assert err <= tol, f"{what}: max abs error {err:.3e} exceeds tolerance {tol:.3e}"
    return result, oracle


def theta_table(q, k, keep_fraction, t_len):
    """Pre-softmax thresholds ``[Hq, T]`` that vary with the row length, so the ``min(n, T) - 1`` lookup matters;
    offset from the quantile, which can coincide with a score exactly (a tie that rounding would decide)."""
    base = quantile_theta(q.float().cpu(), k.float().cpu(), keep_fraction) + 1e-3
    return base[:, None] + 0.5 * torch.arange(t_len)[None, :].float() / t_len


def post_theta(hq, lk):
    """Probability thresholds around 1/n, which keep roughly half of each row."""
    return torch.linspace(0.5, 1.5, hq)[:, None] / torch.arange(1, lk + 1)[None, :]


def _qkv(b, hq, hkv, lq, lk, d, dtype="fp32", *, dv=None, spread=2.0, seed=0, device=DEVICE):
    return make_qkv(b, hq, hkv, lq, lk, d, DTYPES[dtype], device, dv=dv, spread=spread, seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# Shapes, modes, splits
# ---------------------------------------------------------------------------------------------------------------

# (B, Hq, Hkv, Lq, Lk, D, Dv, dtype): Lk = 1 and odd lengths, GQA / MQA / MHA, head dims that need padding, Dv != D,
# Lq up to the decode limit (speculative decoding).
SHAPES = [
    (1, 1, 1, 1, 1, 16, 16, "fp32"),
    (2, 8, 2, 1, 77, 64, 64, "fp16"),
    (1, 8, 1, 1, 50, 32, 32, "fp32"),
    (2, 2, 2, 1, 33, 24, 24, "fp32"),
    (1, 4, 1, 3, 40, 32, 16, "fp32"),
    (1, 8, 2, config.DECODE_MAX_Q, 29, 16, 48, "fp16"),
]


def _id(b, hq, hkv, lq, lk, d, dv, dtype):
    return f"B{b}-Hq{hq}-Hkv{hkv}-Lq{lq}-Lk{lk}-D{d}" + (f"-Dv{dv}" if dv != d else "") + f"-{dtype}"


@pytest.mark.parametrize("shape", [pytest.param(s, id=_id(*s)) for s in SHAPES])
def test_shapes(shape):
    b, hq, hkv, lq, lk, d, dv, dtype = shape
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, dv=dv, seed=lk + 7 * lq)
    check(q, k, v, theta_table(q, k, 0.4, max(1, lk // 2)), num_splits=3, sdc="threshold", what=_id(*shape))


MODES = [
    pytest.param(dict(), id="pre-exact"),
    pytest.param(dict(sdc="none"), id="pre-none"),
    pytest.param(dict(sdc="threshold"), id="pre-threshold"),
    pytest.param(dict(sdc="calibrated"), id="pre-calibrated"),
    pytest.param(dict(vmc=True), id="pre-exact-vmc"),
    pytest.param(dict(sdc="threshold", vmc=True, k_dense=20), id="pre-threshold-vmc-kdense20"),
    pytest.param(dict(sdc="none", k_dense=100), id="pre-none-kdense-all"),
    pytest.param(dict(placement="post"), id="post"),
    pytest.param(dict(placement="post", vmc=True, k_dense=10), id="post-vmc-kdense10"),
    pytest.param(dict(dense=True, vmc=True), id="dense-vmc"),
]


@pytest.mark.parametrize("mode", MODES)
def test_modes(mode):
    # Lq = 2 with left padding: rows of one head have different n, hence different thresholds and k_dense decisions.
    b, hq, hkv, lq, lk, d = 2, 2, 1, 2, 45, 32
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, seed=3)
    kw = dict(mode)
    if kw.pop("dense", False):
        theta = None
    elif kw.get("placement") == "post":
        theta = post_theta(hq, lk)
    else:
        theta = theta_table(q, k, 0.4, 30)
    if kw.get("sdc") == "calibrated":
        kw["sdc_table"] = torch.rand(hq, 7, generator=torch.Generator().manual_seed(0)) * 3  # shorter than theta
    kp_mask = left_padding_mask([lk, 20], lk)[:, 0, 0]
    check(q, k, v, theta, kp_mask=kp_mask, num_splits=2, block_n=32, what=str(mode), **kw)


def test_forced_split_counts_agree():
    # Lk = 120 in 16-key tiles (8 tiles, the last one partial): 1 split, uneven splits, one tile per split, more
    # splits than tiles (some splits empty).
    q, k, v = _qkv(1, 4, 1, 1, 120, 16, seed=11)
    theta = quantile_theta(q, k, 0.3)
    outs = []
    for num_splits in (1, 2, 7, 8, 13):
        result, _ = check(q, k, v, theta, num_splits=num_splits, sdc="threshold", vmc=True, what=f"S{num_splits}")
        outs.append(result.out)
    for other in outs[1:]:
        # Only the order of the float32 merge differs.
        torch.testing.assert_close(other, outs[0], atol=1e-6, rtol=1e-5)


def test_automatic_split_count_and_tile():
    # 64-key tiles for D = 64 in fp16, and under the interpreter 4 splits (4 tiles, 2 programs, 8 nominal slots).
    q, k, v = _qkv(1, 4, 2, 1, 200, 64, "fp16", seed=12)
    check(q, k, v, quantile_theta(q, k, 0.3), num_splits=None, block_n=None, sdc="calibrated",
          sdc_table=torch.full((4,), 0.5))  # fmt: skip


def test_row_blocks(monkeypatch):
    # A kv group wider than DECODE_MAX_BLOCK_M rows (8 heads x 3 rows = 24 > 16) runs as two row blocks; kept_v_rows
    # is still the union over them.
    monkeypatch.setattr(config, "DECODE_MAX_BLOCK_M", 16)
    q, k, v = _qkv(1, 8, 1, 3, 41, 16, seed=18)
    check(q, k, v, theta_table(q, k, 0.3, 41), num_splits=2, block_n=32, sdc="threshold")


# ---------------------------------------------------------------------------------------------------------------
# Masks and offsets
# ---------------------------------------------------------------------------------------------------------------


def test_key_padding_left_padding_and_static_cache():
    # HF generate with a static cache: Lk is the cache size and the valid prefix ends at q_offset; batches are left
    # padded (the last one fully), so each batch has its own key range and some rows see nothing.
    b, hq, hkv, lk, d = 4, 2, 1, 96, 32
    q, k, v = _qkv(b, hq, hkv, 1, lk, d, "fp16", seed=13)
    pos = 60
    lengths = torch.tensor([61, 30, 1, 0])
    kp_mask = torch.arange(lk)[None, :] >= (pos + 1 - lengths)[:, None]  # [B, Lk], True up to the cache end
    # The unwritten cache tail and the padding are garbage: never read, so never a NaN in the output.
    k[:, :, pos + 1 :] = float("nan")
    k[1, :, :31] = float("nan")
    theta = theta_table(q, k.nan_to_num(), 0.5, 64)
    kw = dict(q_offset=pos, num_splits=3, block_n=32, sdc="threshold", vmc=True)
    result, _ = check(q, k, v, theta, kp_mask=kp_mask, **kw)
    assert result.visible[:, :, 0].tolist() == [[61] * hq, [30] * hq, [1] * hq, [0] * hq]
    assert torch.equal(result.out[3], torch.zeros_like(result.out[3]))
    assert result.kept_v_rows[3].tolist() == [0]
    # The same mask as a general [B, 1, 1, Lk] attn_mask (the slow path) gives the same result.
    general = run_decode(q, k, v, theta, attn_mask=kp_mask[:, None, None, :], **kw)
    torch.testing.assert_close(general.out, result.out, atol=0, rtol=0)
    assert torch.equal(general.kept, result.kept) and torch.equal(general.kept_v_rows, result.kept_v_rows)


def test_general_masks():
    # A full per-head, per-row mask (no broadcast) with causality, and a head-only mask without it.
    b, hq, hkv, lq, lk, d = 1, 4, 2, 2, 37, 16
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, seed=14)
    gen = torch.Generator().manual_seed(1)
    full = torch.rand(b, hq, lq, lk, generator=gen) > 0.3
    full[0, 1, 0] = False  # one row sees nothing at all
    heads = torch.rand(1, hq, 1, lk, generator=gen) > 0.5
    theta = theta_table(q, k, 0.5, 40)
    for mask, causal in ((full, True), (heads, False)):
        check(q, k, v, theta, attn_mask=mask, causal=causal, num_splits=2, sdc="none", vmc=True,
              what=f"mask{tuple(mask.shape)}-causal{causal}")  # fmt: skip


@pytest.mark.parametrize("q_offset", [-2, 5, 60], ids=lambda o: f"qoff{o}")
def test_query_offsets(q_offset):
    # Negative offsets give rows with no visible key (zeros, never NaN); offsets past Lk clamp n at Lk.
    q, k, v = _qkv(1, 2, 1, 3, 20, 16, seed=15)
    result, _ = check(q, k, v, quantile_theta(q, k, 0.5), q_offset=q_offset, num_splits=2, sdc="threshold", vmc=True)
    if q_offset < 0:
        assert torch.equal(result.out[:, :, :2], torch.zeros_like(result.out[:, :, :2]))


# ---------------------------------------------------------------------------------------------------------------
# Thresholds, compensation, score transforms
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sdc,vmc", [("threshold", False), ("exact", True)], ids=["threshold", "exact-vmc"])
def test_infinite_thresholds(sdc, vmc):
    # Head 0 keeps none (+inf: with "threshold" an infinite denominator and a zero output, never NaN), head 1 keeps
    # every visible key (-inf), heads 2-3 are ordinary; k_dense keeps short rows dense whatever theta says; batch 1
    # sees nothing (nothing dropped: D_miss is exactly 0, never 0 · inf).
    q, k, v = _qkv(2, 4, 2, 2, 30, 16, "fp16", seed=16)
    theta = quantile_theta(q, k, 0.4)
    theta[0], theta[1] = float("inf"), float("-inf")
    kp_mask = torch.ones(2, 30, dtype=torch.bool)
    kp_mask[1] = False
    result, (_, kept64, visible64, _) = check(q, k, v, theta, kp_mask=kp_mask, q_offset=3, k_dense=4, num_splits=2,
                                              sdc=sdc, vmc=vmc)  # fmt: skip
    assert kept64[0, 0].tolist() == [4, 0]  # the short row (n = 4) is dense, the other fully pruned
    assert torch.equal(kept64[0, 1], visible64[0, 1])
    assert torch.equal(result.out[1], torch.zeros_like(result.out[1]))
    if not vmc:
        assert torch.equal(result.out[0, 0, 1], torch.zeros_like(result.out[0, 0, 1]))


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_softcap(placement):
    q, k, v = _qkv(1, 4, 2, 1, 40, 32, seed=22, spread=4.0)
    theta = post_theta(4, 40) if placement == "post" else torch.full((4,), 1.0)  # capped scores lie in (-3, 3)
    check(q, k, v, theta, softcap=3.0, placement=placement, sdc="exact" if placement == "post" else "threshold",
          num_splits=2)  # fmt: skip


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_sinks(placement):
    # The sink joins the row max and both denominators, is never counted, and leaves rows with nothing visible at
    # zero (q_offset = -1: the first query row sees nothing).
    q, k, v = _qkv(1, 4, 2, 2, 36, 16, seed=23)
    sinks = torch.tensor([3.0, -1.0, 0.5, 8.0])
    theta = post_theta(4, 36) if placement == "post" else quantile_theta(q, k, 0.3)
    kw = dict(sdc="exact") if placement == "post" else dict(sdc="threshold")
    result, _ = check(q, k, v, theta, sinks=sinks, placement=placement, vmc=True, q_offset=-1, num_splits=3, **kw)
    assert torch.equal(result.out[:, :, 0], torch.zeros_like(result.out[:, :, 0]))


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_cap(placement):
    # Of the threshold-kept keys only the cap most recent stay kept, across split boundaries (5 splits of one 16-key
    # tile each); the first query row (n = 69 <= k_dense) is neither pruned nor capped.
    q, k, v = _qkv(1, 4, 2, 2, 70, 16, seed=24)
    theta = post_theta(4, 70) * 0.3 if placement == "post" else quantile_theta(q, k, 0.5)
    sdc = "exact" if placement == "post" else "threshold"
    result, (_, kept64, visible64, _) = check(q, k, v, theta, cap=6, k_dense=69, placement=placement, sdc=sdc,
                                              num_splits=5)  # fmt: skip
    assert (kept64[0, :, 1] == 6).all() and torch.equal(kept64[0, :, 0], visible64[0, :, 0])


@pytest.mark.parametrize("sdc_scale", [0.0, 0.5, 2.0], ids=lambda s: f"scale{s}")
@pytest.mark.parametrize("sdc", ["exact", "threshold", "calibrated"])
def test_sdc_scale(sdc, sdc_scale):
    q, k, v = _qkv(1, 2, 1, 1, 33, 16, seed=25)
    theta = quantile_theta(q, k, 0.3)
    if sdc == "threshold":
        theta[1] = float("inf")  # an infinite D_miss: 0 · inf counts as 0 at sdc_scale = 0
    table = torch.tensor([0.7, 1.3]) if sdc == "calibrated" else None
    check(q, k, v, theta, sdc=sdc, sdc_table=table, sdc_scale=sdc_scale, num_splits=2)


def test_post_theta_zero_keeps_keys_whose_probability_underflows():
    # Decision 2 / issue D6: placement "post" keeps j iff log p_j > log θ, so θ <= 0 keeps every visible key even where
    # p_j underflows float32 (scores spread over thousands), and a tiny positive θ still decides in log space.
    q, k, v = _qkv(1, 3, 1, 1, 40, 16, seed=26, spread=60.0)
    theta = torch.tensor([0.0, -0.5, 1e-30])
    result, (_, kept64, visible64, _) = check(q, k, v, theta, placement="post", num_splits=2)
    assert torch.equal(kept64[0, :2], visible64[0, :2]) and kept64[0, 2, 0] < visible64[0, 2, 0]


def test_nan_propagation():
    # Decision 5: a NaN in a query row, or in a key row a query row sees, makes that row NaN in every column; a NaN
    # in a V row makes the rows that keep it NaN; rows that read no NaN stay finite and exact.
    b, hq, hkv, lq, lk, d = 1, 4, 2, 2, 40, 16
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, seed=27)
    q[0, 0, 1, 3] = float("nan")  # head 0, row 1
    k[0, 1, lk - 1, 0] = float("nan")  # kv head 1's last key: seen by row 1 (causal) of heads 2, 3, not by row 0
    theta = quantile_theta(q.nan_to_num(), k.nan_to_num(), 0.5)
    theta[1] = float("-inf")  # head 1 keeps every visible key, so it keeps kv head 0's V row 5 ...
    v[0, 0, 5, 2] = float("nan")  # ... which head 0 sees too: its row 0 may come out NaN, never finite garbage
    may_be_nan = torch.zeros(b, hq, lq, dtype=torch.bool)
    may_be_nan[0, 0, 0] = True
    # sdc "none": a NaN score is not kept (NaN > θ is false), so only the NaN-propagating row max makes the row NaN.
    _, (out64, *_) = check(q, k, v, theta, sdc="none", num_splits=3, may_be_nan=may_be_nan)
    nan_rows = torch.isnan(out64).all(-1)[0]
    assert nan_rows[0, 1] and nan_rows[1].all() and nan_rows[2:, 1].all() and not nan_rows[2:, 0].any()


def test_fp32_precision_at_large_score_offsets():
    # Decision 6 / issue D7: the float32 error must not grow with the score magnitude. A common offset of 1000 on
    # every score of a row (an extra head dim with q = 1000 / scale, k = 1), and exactly representable integer
    # scores (integer q, k, scale 1) of magnitude ~1000 whose differences are small.
    b, hq, hkv, lk, d = 1, 2, 1, 48, 16
    q, k, v = _qkv(b, hq, hkv, 1, lk, d, seed=28)
    scale = d**-0.5
    q_off = torch.cat([q, torch.full((b, hq, 1, 16), 1000.0 / scale / 16)], -1)
    k_off = torch.cat([k, torch.ones(b, hkv, lk, 16)], -1)
    check(q_off, k_off, v, torch.full((hq,), 1000.0), sm_scale=scale, sdc="threshold", num_splits=2, what="offset")
    # Integer scores 1000, 1001 or 1002 (q = (250, 1, 1, 0...), k = (4, 0|1, 0|1, ...)): the softmax spreads over many
    # keys, so separately rounded exponents (s·log2e and m·log2e, errors ~1e-4) would show.
    gen = torch.Generator().manual_seed(2)
    q_int = torch.zeros(b, hq, 1, d)
    q_int[..., 0], q_int[..., 1:3] = 250.0, 1.0
    k_int = torch.zeros(b, hkv, lk, d)
    k_int[..., 0], k_int[..., 1:3] = 4.0, torch.randint(0, 2, (b, hkv, lk, 2), generator=gen).float()
    check(q_int, k_int, v, torch.full((hq,), 1000.5), sm_scale=1.0, num_splits=2, what="integer")


@pytest.mark.parametrize("vmc", [False, True], ids=["novmc", "vmc"])
def test_pruned_v_rows_are_never_read(vmc):
    # V rows that no head of the group keeps are NaN: reading one (even to multiply it by 0) would poison the output.
    # With vmc every visible row is read for the V mean, so then only invisible rows may be poisoned.
    b, hq, hkv, lk, d = 2, 4, 2, 64, 16
    q, k, v = _qkv(b, hq, hkv, 1, lk, d, seed=17, spread=3.0)
    theta = quantile_theta(q, k, 0.15)
    kp_mask = left_padding_mask([64, 40], lk)[:, 0, 0]
    clean, (_, _, _, kv_rows64) = check(q, k, v, theta, kp_mask=kp_mask, num_splits=2, vmc=vmc)
    s = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double(), k.repeat_interleave(hq // hkv, 1).double()) * d**-0.5
    kept = kp_mask[:, None, :] & (s > theta[None, :, None])  # [B, Hq, Lk]
    needed = (kp_mask[:, None, :].expand(b, hq, lk) if vmc else kept).reshape(b, hkv, hq // hkv, lk).any(2)
    assert (~needed).any() and needed.any()
    assert torch.equal(kv_rows64, kept.reshape(b, hkv, hq // hkv, lk).any(2).sum(-1))
    result = run_decode(q, k, v.masked_fill(~needed[..., None], float("nan")), theta, kp_mask=kp_mask,
                        num_splits=2, vmc=vmc)  # fmt: skip
    assert torch.equal(result.out, clean.out) and torch.equal(result.kept_v_rows, clean.kept_v_rows)


def test_strided_inputs_and_output():
    # K/V as views of a [B, Lk, Hkv, D] cache (HF layout), query and output with non-contiguous strides.
    b, hq, hkv, lk, d = 2, 4, 2, 25, 16
    q, k, v = _qkv(b, hq, hkv, 1, lk, d, seed=19)
    k_view, v_view, q_view = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v, q))
    assert not k_view.is_contiguous() and torch.equal(k_view, k)
    theta = quantile_theta(q, k, 0.4)
    out = torch.full((b, 1, hq, d), float("nan"), device=DEVICE).transpose(1, 2)
    result = run_decode(q_view, k_view, v_view, theta, out=out, num_splits=2)
    contiguous = run_decode(q, k, v, theta, num_splits=2)
    assert result.out is out and torch.equal(out, contiguous.out)


def test_empty_calls():
    # Lk = 0 and B·Hq·Lq = 0: outputs of the right shape, zeros, stats zeros; nothing is launched.
    for b, hq, lq, lk in ((1, 2, 1, 0), (0, 2, 1, 5), (1, 2, 0, 5)):
        q, k, v = _qkv(b, hq, 1, lq, lk, 16, seed=0)
        result = run_decode(q, k, v, torch.zeros(hq), vmc=True, kp_mask=torch.ones(b, lk, dtype=torch.bool))
        assert result.out.shape == (b, hq, lq, 16) and not result.out.any()
        assert not result.kept.any() and not result.visible.any() and not result.kept_v_rows.any()


class _NoHostSync(TorchDispatchMode):
    """Fails on the operators a host sync goes through (``.item()``, ``bool(t)``, ``torch.nonzero``...)."""

    FORBIDDEN = ("_local_scalar_dense", "is_nonzero", "nonzero", "item", "equal")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.FORBIDDEN:
            raise AssertionError(f"the launcher made a host sync through {func}")
        return func(*args, **(kwargs or {}))


def test_launcher_makes_no_host_sync():
    q, k, v = _qkv(1, 4, 2, 1, 40, 16, seed=29)
    kp = key_padding_of(left_padding_mask([30], 40)[:, 0, 0].to(DEVICE))
    theta = _table(post_theta(4, 40), 4, DEVICE)
    with _NoHostSync():
        result = top_theta_decode(q, k, v, theta=theta, sinks=torch.zeros(4, device=DEVICE), key_padding=kp,
                                  sm_scale=0.25, q_offset=39, placement="post", cap=3, vmc=True, return_stats=True,
                                  num_splits=None)  # fmt: skip
    assert result.kept.shape == (1, 4, 1)


# ---------------------------------------------------------------------------------------------------------------
# What the kernels refuse, and the split-count model (pure functions)
# ---------------------------------------------------------------------------------------------------------------

REFUSED = [
    pytest.param(dict(dtype=torch.float64), "dtype", id="float64"),
    pytest.param(dict(d=8), "head dim", id="head-dim-8"),
    pytest.param(dict(dv=512), "head dim", id="value-head-dim-512"),
]
if config.INTERPRET:
    REFUSED.append(pytest.param(dict(dtype=torch.bfloat16), "bfloat16", id="bf16-interpreter"))


@pytest.mark.parametrize("over,match", REFUSED)
def test_unsupported_inputs_are_refused(over, match):
    d, dv, dtype = over.get("d", 16), over.get("dv", over.get("d", 16)), over.get("dtype", torch.float32)
    q = torch.zeros(1, 2, 1, d, dtype=dtype, device=DEVICE)
    k = torch.zeros(1, 2, 5, d, dtype=dtype, device=DEVICE)
    v = torch.zeros(1, 2, 5, dv, dtype=dtype, device=DEVICE)
    reason = unsupported_reason("decode", q, k, v)
    assert reason is not None and match in reason
    with pytest.raises(ValueError, match=match):
        top_theta_decode(q, k, v, sm_scale=0.25, q_offset=4)


@pytest.mark.parametrize("over", [dict(num_splits=0), dict(num_splits=True), dict(block_n=48), dict(block_n=8)],
                         ids=["splits0", "splits-bool", "block-n-48", "block-n-8"])  # fmt: skip
def test_bad_tuning_knobs(over):
    q, k, v = _qkv(1, 2, 1, 1, 5, 16)
    with pytest.raises(ValueError, match=next(iter(over))):
        top_theta_decode(q, k, v, sm_scale=0.25, q_offset=4, **over)


@pytest.mark.parametrize(
    "regs,shared,warps,expected",
    [
        (148, 38912, 4, 3),  # the split kernel before this change (w4, s2): registers allow 3
        (118, 54272, 4, 4),  # now (BLOCK_N 32, w4, s4): 4 by registers and by shared memory
        (145, 71680, 4, 3),  # 64-key tiles at 3 stages: 3 by both
        (128, 0, 4, 4),  # 128 registers: 4 warps of 4096 per scheduler partition
        (129, 0, 4, 3),  # one more register rounds up to 136 per thread
        (80, 0, 4, 6),
        (32, 0, 4, 16),  # the thread limit: 2048 / 128
        (32, 0, 1, 32),  # the CTA limit
        (64, 116736, 4, 1),  # half the shared memory of an SM (plus the reserve) fits once
        (255, 0, 8, 1),  # 256 per thread after rounding: 2 warps per partition
        (256, 0, 4, 0),  # more than a thread can have
    ],
)
def test_resident_ctas_per_sm(regs, shared, warps, expected):
    assert resident_ctas_per_sm(regs, shared, warps, H100) == expected


def test_choose_num_splits():
    slots = 4 * H100.sm_count  # 528: 4 resident programs per SM
    # B = 1, 8 kv heads, 8k keys in 32-key tiles: up to 66 splits fit one wave, and 64 (the cap) is the fewest splits
    # with 4 tiles each.
    assert choose_num_splits(8, 256, slots, 64, 2) == 64
    # B = 16 (128 programs): 4 splits fill 512 of 528 slots; 5 would need a second wave for 52 instead of 64 tiles.
    assert choose_num_splits(128, 256, slots, 64, 2) == 4
    # Short caches, a single tile, and the cap.
    assert choose_num_splits(8, 3, slots, 64, 2) == 3
    assert choose_num_splits(8, 1, slots, 64, 2) == 1
    assert choose_num_splits(1, 10**6, slots, 64, 2) == 64
    # B = 16 with 128k keys: 33 splits (8 full waves) are predicted 1 % faster than 4 (one wave 97 % full); within the
    # 2 % margin the fewer splits win.
    assert choose_num_splits(128, 4096, slots, 64, 2) == 33
    assert choose_num_splits(128, 4096, slots, 64, 2, 0.02) == 4
    # The model itself: no split count does better, and ties go to fewer splits.
    for programs, tiles in ((8, 256), (32, 1000), (100, 77), (600, 500), (1024, 4096)):
        best = choose_num_splits(programs, tiles, slots, 64, 2)
        cost = [math.ceil(programs * s / slots) * (math.ceil(tiles / s) + 2) for s in range(1, 65)]
        assert cost[best - 1] == min(cost) and cost.index(min(cost)) == best - 1


# ---------------------------------------------------------------------------------------------------------------
# GPU: bfloat16, long caches, the compiled kernel's split count, every warps/stages setting, CUDA graphs
# ---------------------------------------------------------------------------------------------------------------

GPU_SHAPES = [
    (1, 8, 8, 1, 1, 64, 64),
    (4, 32, 8, 1, 1531, 128, 128),
    (2, 16, 2, 1, 4096, 64, 64),
    (1, 32, 4, 4, 777, 128, 128),
    (3, 8, 1, 1, 2500, 256, 128),
    (2, 71, 1, 1, 300, 64, 64),
]
GPU_MODES = {
    "pre-threshold-kp": dict(sdc="threshold", kp=True),
    "pre-exact-vmc": dict(vmc=True),
    "post-kp": dict(placement="post", kp=True),
    "pre-cap-sinks-softcap": dict(sdc="threshold", cap=64, sinks=True, softcap=30.0),
}


def _gpu_case(shape, dtype, mode, seed):
    b, hq, hkv, lq, lk, d, dv = shape
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, dv=dv, seed=seed, device=DEVICE)
    kw = dict(mode)
    if kw.pop("kp", False):
        kw["kp_mask"] = left_padding_mask([lk - (3 * i) % max(lk, 1) for i in range(b)], lk, DEVICE)[:, 0, 0]
    if kw.pop("sinks", False):
        kw["sinks"] = torch.linspace(-2.0, 6.0, hq)
    theta = post_theta(hq, lk) if kw.get("placement") == "post" else theta_table(q, k, 0.3, lk)
    return q, k, v, theta, kw


def _gpu_check(q, k, v, theta, what="", **kw):
    result = run_decode(q, k, v, theta, **{"block_n": None, **kw})
    out64, kept64, visible64, kv_rows64 = _oracle(q, k, v, theta, **kw)
    assert torch.equal(result.visible.long().cpu(), visible64), what
    # Over millions of scores one may fall within rounding of θ; allow a handful of flipped keep decisions.
    assert int((result.kept.long().cpu() - kept64).abs().sum()) <= 4, what
    assert int((result.kept_v_rows.long().cpu() - kv_rows64).abs().sum()) <= 4, what
    mask = kw["kp_mask"][:, None, None, :] if kw.get("kp_mask") is not None else None
    assert_close_to_oracle(result.out, out64, q, k, v, mask, causal=True, what=what)
    return result


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(GPU_MODES))
@pytest.mark.parametrize(
    "shape,dtype", [pytest.param(s, dt, id=_id(*s, dt)) for s in GPU_SHAPES for dt in ("bf16", "fp16", "fp32")]
)
def test_gpu_against_oracle(shape, dtype, mode):
    q, k, v, theta, kw = _gpu_case(shape, dtype, GPU_MODES[mode], seed=shape[4])
    _gpu_check(q, k, v, theta, what=f"{mode}", num_splits=None, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gpu_32k_cache(dtype):
    # The headline shape (Hq 32, Hkv 8, D 128) with a 32k cache, left padding and the automatic split count.
    q, k, v, theta, kw = _gpu_case((2, 32, 8, 1, 32768, 128, 128), dtype, GPU_MODES["pre-threshold-kp"], seed=5)
    _gpu_check(q, k, v, theta, num_splits=None, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 2, 7, 17, 64], ids=lambda s: f"splits{s}")
def test_gpu_forced_split_counts(num_splits):
    q, k, v, theta, kw = _gpu_case((2, 16, 4, 1, 3001, 128, 128), "bf16", GPU_MODES["pre-cap-sinks-softcap"], 6)
    _gpu_check(q, k, v, theta, num_splits=num_splits, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("warps,stages", config.DECODE_WARPS_STAGES, ids=lambda x: str(x))
@pytest.mark.parametrize("block_n", [16, 32, 64, 128])
def test_gpu_every_config(monkeypatch, warps, stages, block_n):
    monkeypatch.setattr(config, "DECODE_NUM_WARPS", warps)
    monkeypatch.setattr(config, "DECODE_NUM_STAGES", stages)
    for mode in ("pre-threshold-kp", "post-kp"):
        q, k, v, theta, kw = _gpu_case((2, 32, 8, 1, 2049, 128, 128), "bf16", GPU_MODES[mode], seed=7)
        _gpu_check(q, k, v, theta, block_n=block_n, num_splits=None, what=f"w{warps}-s{stages}-{mode}", **kw)


@pytest.mark.gpu
def test_gpu_split_count_comes_from_the_compiled_kernel():
    q, k, v, theta, kw = _gpu_case((1, 32, 8, 1, 8192, 128, 128), "bf16", GPU_MODES["pre-threshold-kp"], seed=8)
    decode._RESOURCES.clear()
    _gpu_check(q, k, v, theta, num_splits=None, **kw)
    ((n_regs, shared, warps),) = decode._RESOURCES.values()
    assert 0 < n_regs <= 255 and shared > 0 and warps == config.DECODE_NUM_WARPS
    limits = decode._device_limits(torch.cuda.current_device())
    assert resident_ctas_per_sm(n_regs, shared, warps, limits) >= 1


@pytest.mark.gpu
def test_gpu_decode_step_captures_in_a_cuda_graph():
    # No host sync and no data-dependent split count: a decode step records into a CUDA graph and replays with new
    # queries, matching eager calls.
    q, k, v, theta, kw = _gpu_case((2, 32, 8, 1, 4096, 128, 128), "bf16", GPU_MODES["pre-threshold-kp"], seed=9)
    args = dict(theta=_table(theta, 32, DEVICE), key_padding=key_padding_of(kw["kp_mask"]), sm_scale=128**-0.5,
                q_offset=4095, sdc="threshold", return_stats=True)  # fmt: skip
    static_q = q.clone()
    top_theta_decode(static_q, k, v, **args)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = top_theta_decode(static_q, k, v, **args)
    for seed in (1, 2):
        static_q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(q))
        graph.replay()
        eager = top_theta_decode(static_q, k, v, **args)
        torch.testing.assert_close(captured.out, eager.out, atol=0, rtol=0)
        assert torch.equal(captured.kept, eager.kept) and torch.equal(captured.kept_v_rows, eager.kept_v_rows)
