"""The Triton prefill kernel (kernels/prefill.py) against the float64 oracle of tests/support/sa_testing.py.

On CPU the kernel runs under TRITON_INTERPRET=1 (float32 and float16, small shapes, the interpreter's one 32x16 tile
config, so that lengths that are not tile multiples give partial, diagonal and full tiles); bfloat16, long sequences
and every shipped config run in the GPU-marked tests. The launcher gets normalised arguments from `_prefill` below
(what the ops layer will pass), and an output buffer filled with NaN so that an unwritten element shows. Thresholds
are moved off the scores (for "post", off the log-probabilities) by a gap that rounding cannot cross, so that the
kernel and the oracle agree on every keep decision and the counts can be compared exactly.

Tolerance: `sa_testing.assert_close_to_oracle`, the error PyTorch's dense SDPA makes in the same precision against
float64, twice, plus 4 eps x the output magnitude. float32 inputs run their dots in "tf32x3" on a GPU; a CPU emulation
of tf32x3 (tf32 splits rounded to nearest, exact products, float32 accumulation) stayed within this same rule in 60 of
60 random cases (D 16..128, at most 2.2x PyTorch's float32 error, inside the floor), so it is the float32 rule too;
`test_gpu_fp32_tf32x3_within_the_rule` checks it on the device. Under the interpreter every dot is plain float32.
"""

import math

import pytest
import torch
from sa_testing import assert_close_to_oracle, left_padding_mask, make_qkv, oracle_top_theta, tolerance

from sparse_attention.kernels import common, config, prefill
from sparse_attention.kernels.prefill import PrefillResult, top_theta_prefill

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SKIP_VARIANTS = ["skip_dot", "skip_load"]


# ---- normalised arguments, as the ops layer passes them ----------------------------------------------------------


def _table(values, hq: int) -> torch.Tensor:
    """A scalar, ``[Hq]`` or ``[Hq, T]`` table as the float32 contiguous ``[Hq, T]`` the launcher takes."""
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.dim() == 0:
        t = t.reshape(1, 1)
    elif t.dim() == 1:
        t = t[:, None]
    return t.expand(hq, t.shape[1]).contiguous().to(DEVICE)


def _key_padding(mask: torch.Tensor):
    """``(mask, prefix, bounds)`` of a boolean ``[B, Lk]`` key mask, as the caller computes them once per step."""
    b, lk = mask.shape
    prefix = torch.zeros(b, lk + 1, dtype=torch.int32, device=mask.device)
    prefix[:, 1:] = mask.cumsum(-1)
    idx = torch.arange(lk, device=mask.device)
    first = torch.where(mask, idx, lk).amin(-1)
    last = torch.where(mask, idx + 1, 0).amax(-1)
    attended = mask.any(-1)
    bounds = torch.stack([torch.where(attended, first, 0), torch.where(attended, last, 0)], -1).to(torch.int32)
    return mask, prefix, bounds


def _prefill(q, k, v, theta=None, *, attn_mask=None, padding=None, scale=None, q_offset=None, sdc_table=None,
             out=None, **kw) -> PrefillResult:  # fmt: skip
    """The launcher on normalised arguments (stats on, NaN-poisoned output unless ``out`` is given)."""
    b, hq, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    if out is None:
        out = torch.full((b, hq, lq, dv), float("nan"), dtype=q.dtype, device=q.device)
    kw.setdefault("return_stats", True)
    result = top_theta_prefill(
        q, k, v, theta=None if theta is None else _table(theta, hq),
        sdc_table=None if sdc_table is None else _table(sdc_table, hq),
        attn_mask=None if attn_mask is None else attn_mask.expand(b, hq, lq, lk),
        key_padding=None if padding is None else _key_padding(padding),
        sm_scale=d**-0.5 if scale is None else scale, q_offset=lk - lq if q_offset is None else q_offset,
        out=out, **kw,
    )  # fmt: skip
    assert isinstance(result, PrefillResult) and result.out is out
    return result


def _oracle(q, k, v, theta=None, *, attn_mask=None, padding=None, softcap=0.0, cap=0, **kw):
    kw = {key: val for key, val in kw.items() if key not in ("block_config", "variant", "return_stats")}
    mask = attn_mask if padding is None else padding[:, None, None, :]
    return oracle_top_theta(q, k, v, theta, attn_mask=mask, softcap=softcap or None, cap=cap or None, **kw)


def _check(q, k, v, theta=None, *, what="", **kw):
    """Kernel vs the float64 oracle: counts exactly, the output within the tolerance rule. Returns the result."""
    res = _prefill(q, k, v, theta, **kw)
    out64, kept64, visible64, _ = _oracle(q, k, v, theta, **kw)
    assert res.out.shape == out64.shape and res.out.dtype == q.dtype, what
    assert torch.equal(res.visible.long().cpu(), visible64), f"{what}: visible counts"
    assert torch.equal(res.kept.long().cpu(), kept64), f"{what}: kept counts"
    assert 0 <= int(res.skipped_tiles) <= int(res.total_tiles), what
    mask = kw.get("attn_mask") if kw.get("padding") is None else kw["padding"][:, None, None, :]
    assert_close_to_oracle(
        res.out, out64, q, k, v, mask, kw.get("scale"), causal=kw.get("causal", True), q_offset=kw.get("q_offset"),
        what=what,
    )  # fmt: skip
    return res


# ---- thresholds with a clear gap to every score ---------------------------------------------------------------------


def _scores64(q, k, scale=None, softcap=0.0):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kk = k.detach().double().cpu().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = scale * q.detach().double().cpu() @ kk.transpose(-1, -2)
    return softcap * torch.tanh(s / softcap) if softcap else s


def _visible64(q, k, *, causal=True, q_offset=None, attn_mask=None, padding=None):
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    q_offset = lk - lq if q_offset is None else q_offset
    vis = torch.ones(b, hq, lq, lk, dtype=torch.bool)
    if causal:
        vis &= torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + q_offset
    if attn_mask is not None:
        vis &= attn_mask.cpu()
    if padding is not None:
        vis &= padding.cpu()[:, None, None, :]
    return vis


def _off_the_points(value: float, points: torch.Tensor, gap: float) -> float:
    """The point nearest ``value`` at least ``gap / 2`` from every entry of ``points`` (sorted float64)."""
    if not math.isfinite(value) or points.numel() == 0:
        return value
    inf = torch.tensor([math.inf], dtype=torch.float64)
    edges = torch.cat([-inf, points, inf])
    lo, hi = edges[:-1] + gap / 2, edges[1:] - gap / 2
    wide = lo <= hi
    nearest = torch.minimum(torch.maximum(torch.tensor(value, dtype=torch.float64), lo[wide]), hi[wide])
    return float(nearest[(nearest - value).abs().argmin()])


def _theta(q, k, fractions, *, placement="pre", scale=None, softcap=0.0, sinks=None, causal=True, q_offset=None,
           attn_mask=None, padding=None, row_levels=None):  # fmt: skip
    """A ``[Hq, T]`` table keeping about ``fractions[h][t]`` of head h's visible scores (log-probabilities for "post",
    with the sink in the softmax), each entry moved off every such value by a gap float32 rounding cannot cross. A
    fraction of 0 gives +inf (nothing kept), 1 gives -inf ("pre") or 0 ("post"). With ``row_levels`` (a length),
    the entries are spread over that many row lengths."""
    s = _scores64(q, k, scale, softcap)
    vis = _visible64(q, k, causal=causal, q_offset=q_offset, attn_mask=attn_mask, padding=padding)
    if placement == "post":
        s = s.masked_fill(~vis, -math.inf)
        if sinks is not None:
            sink = torch.as_tensor(sinks, dtype=torch.float64).cpu()[None, :, None, None].expand(*s.shape[:3], 1)
            s = torch.log_softmax(torch.cat([s, sink], -1), -1)[..., :-1]
        else:
            s = torch.log_softmax(s, -1)
    table = torch.zeros(len(fractions), len(fractions[0]), dtype=torch.float64)
    for h, row in enumerate(fractions):
        points = s[:, h][vis[:, h]].sort().values
        points = points[torch.isfinite(points)]
        for t, frac in enumerate(row):
            if frac <= 0:
                table[h, t] = math.inf
            elif frac >= 1:
                table[h, t] = -math.inf
            else:
                table[h, t] = _off_the_points(float(torch.quantile(points, 1 - frac)), points, 2e-3)
    if placement == "post":
        table = table.exp()  # a log-probability cut as a probability threshold; -inf -> 0 keeps everything
    if row_levels is not None:
        t_len = max(row_levels // 3, 1)
        table = table[:, torch.arange(t_len) * table.shape[1] // t_len]
    return table.float().to(DEVICE)


def _qkv(b, hq, hkv, lq, lk, d, dtype="fp32", *, dv=None, spread=1.0, seed=0):
    return make_qkv(b, hq, hkv, lq, lk, d, DTYPES[dtype], DEVICE, dv=dv, spread=spread, seed=seed)


# ---- the main matrix ---------------------------------------------------------------------------------------------

# (B, Hq, Hkv, Lq, Lk, D, Dv), dtype, options. Odd lengths, Lq < Lk and Lq == Lk, GQA 1/2/4/8, padded and unpadded
# head dims, Dv != D; each case mixes placement, compensation, masks and the score transforms differently (the full
# product would not fit the CPU time budget). "fractions": per-head keep fractions along the row length.
CASES = [
    ((1, 2, 2, 37, 37, 16, 16), "fp32", dict(dense=True)),
    ((1, 4, 2, 20, 45, 32, 32), "fp16", dict(sdc="exact", k_dense=5)),
    ((1, 4, 1, 17, 30, 16, 16), "fp32", dict(sdc="none", vmc=True)),
    ((2, 2, 1, 24, 30, 64, 64), "fp16", dict(sdc="threshold", vmc=True, padding="left")),
    ((1, 2, 1, 19, 50, 24, 24), "fp32", dict(sdc="calibrated", general_mask=True)),
    ((1, 2, 1, 33, 33, 32, 16), "fp32", dict(placement="post", vmc=True)),
    ((2, 2, 1, 20, 31, 16, 40), "fp16", dict(placement="post", padding="holes", k_dense=3)),
    ((1, 2, 2, 26, 26, 64, 64), "fp32", dict(sdc="threshold", vmc=True, general_mask=True)),
    ((1, 2, 2, 21, 29, 16, 16), "fp16", dict(sdc="none", causal=False, padding="left", vmc=True)),
    ((1, 2, 1, 24, 33, 32, 32), "fp32", dict(placement="post", causal=False, general_mask=True, vmc=True)),
    ((1, 2, 1, 25, 36, 16, 16), "fp32", dict(sdc="calibrated", vmc=True, q_offset=-7, sdc_scale=0.5)),
    ((1, 2, 2, 20, 27, 16, 16), "fp16", dict(sdc="exact", vmc=True, q_offset=12, padding="left", sdc_scale=2.0)),
    ((1, 2, 1, 30, 34, 16, 16), "fp32", dict(softcap=2.0, sinks=[0.5, 3.0], sdc="threshold", vmc=True)),
    ((1, 2, 1, 27, 41, 32, 16), "fp16", dict(sinks=[1.0, 2.0], placement="post", softcap=4.0)),
    ((1, 2, 1, 30, 38, 16, 16), "fp32", dict(cap=5, sdc="threshold", vmc=True, k_dense=4)),
    ((2, 2, 1, 24, 40, 16, 16), "fp16", dict(cap=9, placement="post", padding="left", sinks=[0.3, -0.2])),
    ((1, 2, 2, 25, 33, 16, 16), "fp32", dict(cap=3, sdc="none", general_mask=True, softcap=3.0)),
    ((2, 2, 1, 24, 30, 16, 16), "fp16", dict(sdc="threshold", vmc=True, key_mask=True)),
    ((1, 2, 1, 20, 28, 16, 16), "fp32", dict(placement="post", causal=False, key_mask=True, vmc=True)),
]
# Keep fractions per head along the row length: partial pruning, nothing kept at long rows (head 0), everything kept
# at short rows (head 1), so that fully pruned and fully kept rows appear next to partly pruned ones.
FRACTIONS = [[0.3, 0.18, 0.0], [1.0, 0.5, 0.2], [0.2, 0.12, 0.24], [1.0, 1.0, 1.0]]


def _case_id(shape, dtype, spec):
    b, hq, hkv, lq, lk, d, dv = shape
    opts = "-".join(f"{key}={val}" if val is not True else key for key, val in spec.items())
    return f"B{b}-Hq{hq}-Hkv{hkv}-Lq{lq}-Lk{lk}-D{d}-Dv{dv}-{dtype}-{opts}"


def _case_kwargs(q, k, spec):
    """A CASES spec as (theta, launcher/oracle keyword arguments) for inputs q, k."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    keys = ("sdc", "vmc", "k_dense", "placement", "causal", "q_offset", "softcap", "cap", "sdc_scale")
    kw = {key: spec[key] for key in keys if key in spec}
    if "sinks" in spec:
        kw["sinks"] = torch.tensor(spec["sinks"], dtype=torch.float32, device=DEVICE)
    if spec.get("padding") == "left":
        lengths = [lk - 3 * i - 5 for i in range(b)]
        lengths[-1] = lk // 3 if b > 1 else lengths[-1]
        kw["padding"] = left_padding_mask(lengths, lk, q.device)[:, 0, 0, :]
    elif spec.get("padding") == "holes":
        padding = left_padding_mask([lk - 4, lk // 2][:b], lk, q.device)[:, 0, 0, :].clone()
        padding[:, lk - 9 : lk - 6] = False  # holes inside the attended range of every batch
        kw["padding"] = padding
    if spec.get("key_mask"):
        # A general mask that is the same for every query row ([B, 1, 1, Lk] padding given as attn_mask).
        kw["attn_mask"] = left_padding_mask([lk - 2 * i - 3 for i in range(b)], lk, q.device)
    if spec.get("general_mask"):
        gen = torch.Generator().manual_seed(1)
        mask = torch.rand(b, 1, lq, lk, generator=gen) > 0.35
        mask[:, :, lq // 2] = False  # an empty row
        kw["attn_mask"] = mask.to(q.device)
    if spec.get("dense"):
        return None, kw
    table = [FRACTIONS[h % len(FRACTIONS)] for h in range(hq)]
    mask_kw = {key: kw[key] for key in ("causal", "q_offset", "attn_mask", "padding", "softcap", "sinks") if key in kw}
    theta = _theta(q, k, table, placement=kw.get("placement", "pre"), row_levels=lk, **mask_kw)
    if kw.get("sdc") == "calibrated":
        kw["sdc_table"] = torch.linspace(0.0, 2.0, hq * 5).reshape(hq, 5)
    return theta, kw


@pytest.mark.parametrize("shape, dtype, spec", CASES, ids=[_case_id(*c) for c in CASES])
def test_matches_oracle(shape, dtype, spec):
    b, hq, hkv, lq, lk, d, dv = shape
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, dv=dv)
    theta, kw = _case_kwargs(q, k, spec)
    _check(q, k, v, theta, what=_case_id(shape, dtype, spec), **kw)


COMPENSATIONS = [
    ("exact", True, 1.0), ("exact", False, 0.5), ("none", True, 1.0), ("none", False, 1.0), ("threshold", False, 1.0),
    ("threshold", True, 0.0), ("threshold", True, 3.0), ("calibrated", True, 0.5), ("calibrated", False, 1.0),
]  # fmt: skip
COMPENSATION_IDS = [f"{sdc}-vmc{int(vmc)}-x{scale}" for sdc, vmc, scale in COMPENSATIONS]


@pytest.mark.parametrize("sdc, vmc, sdc_scale", COMPENSATIONS, ids=COMPENSATION_IDS)
def test_every_compensation_mode(sdc, vmc, sdc_scale):
    """Each sdc mode with and without vmc and a compensation scale (0 drops the compensation, also where it is
    infinite), rows never pruned (k_dense), fully pruned rows (head 1 at long rows)."""
    q, k, v = _qkv(1, 2, 1, 22, 30, 16, seed=3)
    theta = _theta(q, k, [[0.4, 0.15], [0.3, 0.0]], row_levels=30)
    table = [[0.5, 1.5], [3.0, 0.0]] if sdc == "calibrated" else None
    _check(q, k, v, theta, sdc=sdc, sdc_table=table, sdc_scale=sdc_scale, vmc=vmc, k_dense=2, what=sdc)


# ---- rows with nothing, everything or infinitely much ------------------------------------------------------------


@pytest.mark.parametrize("sdc", ["none", "threshold"])
def test_nothing_kept_skips_every_tile_and_gives_v_mean(sdc):
    """θ = +inf keeps nothing: every walked tile is dead; with "threshold" the denominator is infinite (dropped keys
    times exp(+inf)), so the kept part is 0, never inf·0; with vmc the V mean of the visible keys remains."""
    q, k, v = _qkv(1, 2, 1, 24, 24, 16)
    theta = torch.full((2, 1), math.inf)
    res = _check(q, k, v, theta, sdc=sdc, vmc=True, what=sdc)
    assert int(res.kept.sum()) == 0 and int(res.skipped_tiles) == int(res.total_tiles) > 0
    v_mean = v.float().cumsum(2) / torch.arange(1, 25, device=DEVICE)[:, None]
    torch.testing.assert_close(res.out[0, 1].float(), v_mean[0, 0], atol=1e-5, rtol=1e-5)
    res = _check(q, k, v, theta, sdc=sdc, vmc=False, what=sdc)
    assert not res.out.any()


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_everything_kept_equals_dense(placement):
    """θ = -inf ("pre") or θ = 0 ("post") keeps every visible key: the output is the dense kernel's."""
    q, k, v = _qkv(1, 2, 1, 20, 30, 32, dv=16)
    theta = torch.full((2, 3), -math.inf if placement == "pre" else 0.0)
    res = _check(q, k, v, theta, sdc="none", placement=placement, what=placement)
    assert torch.equal(res.kept, res.visible) and int(res.skipped_tiles) == 0 and int(res.total_tiles) > 0
    dense = _prefill(q, k, v)
    assert torch.equal(dense.kept, dense.visible) and int(dense.skipped_tiles) == 0
    torch.testing.assert_close(res.out, dense.out, atol=1e-6, rtol=1e-5)


def test_infinite_table_entries():
    """A table with -inf and +inf points along the row length next to finite ones, in both placements."""
    q, k, v = _qkv(1, 2, 1, 24, 24, 16, seed=8)
    for placement, sdc in (("pre", "threshold"), ("pre", "exact"), ("post", "exact")):
        theta = _theta(q, k, [[0.3, 0.0, 1.0], [1.0, 0.4, 0.0]], placement=placement, row_levels=24)
        _check(q, k, v, theta, placement=placement, sdc=sdc, vmc=True, what=f"{placement}-{sdc}")


def test_empty_rows_are_zero():
    """Rows before the first key (negative q_offset), rows whose mask is all False, a fully padded sequence, and
    Lk = 0: zeros, also with sinks and vmc."""
    q, k, v = _qkv(2, 1, 1, 24, 30, 16, "fp16")
    mask = torch.ones(2, 1, 24, 30, dtype=torch.bool, device=DEVICE)
    mask[0, :, 20:] = False
    mask[1] = False
    sinks = torch.tensor([1.0], device=DEVICE)
    theta = _theta(q, k, [[0.3]], q_offset=-5, attn_mask=mask)
    res = _check(q, k, v, theta, q_offset=-5, attn_mask=mask, vmc=True, sdc="threshold", sinks=sinks)
    assert int(res.visible[0, :, :5].sum()) == 0 and int(res.visible[1].sum()) == 0
    assert not res.out[0, :, :5].any() and not res.out[0, :, 20:].any() and not res.out[1].any()
    padding = left_padding_mask([30, 0], 30, DEVICE)[:, 0, 0, :]
    res = _check(q, k, v, theta, padding=padding, vmc=True, sinks=sinks)
    assert int(res.visible[1].sum()) == 0 and not res.out[1].any()
    empty_k, empty_v = k[:, :, :0], v[:, :, :0]
    res = _prefill(q, empty_k, empty_v, theta, q_offset=0, vmc=True)
    assert not res.out.any() and int(res.visible.sum()) == 0 and int(res.total_tiles) == 0


def test_empty_batch_returns_shaped_outputs():
    q, k, v = _qkv(1, 2, 1, 0, 12, 16)
    res = _prefill(q, k, v, torch.zeros(2, 1))
    assert res.out.shape == (1, 2, 0, 16) and res.kept.shape == (1, 2, 0)
    assert int(res.skipped_tiles) == 0 and int(res.total_tiles) == 0


# ---- NaN in, NaN out ------------------------------------------------------------------------------------------------


def _nan_rows(t: torch.Tensor) -> torch.Tensor:
    return torch.isnan(t.double().cpu()).any(-1)


def _assert_nan_rows(res, out64, kept64, *, allowed=None):
    """Rows the oracle marks NaN are NaN in every column with kept = -1; the others match the oracle, except rows in
    ``allowed`` (bool [B, Hq, Lq]), which may be all-NaN instead."""
    got = res.out.double().cpu()
    nan64 = _nan_rows(out64)
    nan = _nan_rows(got)
    assert bool(torch.isnan(got[nan64]).all()), "a row that reads a NaN must be NaN in every column"
    assert bool(torch.isnan(got[nan]).all()), "a NaN row must be NaN in every column"
    extra = nan & ~nan64
    if allowed is None:
        assert not extra.any(), "rows that read no NaN came out NaN"
    else:
        assert not (extra & ~allowed).any(), "a row came out NaN that neither keeps nor reads the NaN"
    assert torch.equal(res.kept.long().cpu()[nan], torch.full_like(kept64[nan], -1))
    clean = ~nan
    assert torch.equal(res.kept.long().cpu()[clean], kept64[clean])
    assert bool(clean.any()) and (got[clean] - out64[clean]).abs().max() <= 1e-5


@pytest.mark.parametrize("where", ["k", "q"])
def test_nan_in_query_or_key_makes_the_rows_that_see_it_nan(where):
    q, k, v = _qkv(1, 2, 1, 20, 28, 16, seed=6)
    theta = _theta(q, k, [[0.5], [0.2]])
    post_theta = torch.full((2, 1), 0.05)
    if where == "k":
        k[0, 0, 13] = float("nan")  # seen by rows i >= 5 of both heads (causal, q_offset 8)
    else:
        q[0, 1, 7, 3] = float("nan")
    for placement, sdc in (("pre", "none"), ("post", "exact")):
        table = theta if placement == "pre" else post_theta
        res = _prefill(q, k, v, table, placement=placement, sdc=sdc, vmc=True)
        out64, kept64, _, _ = _oracle(q, k, v, table, placement=placement, sdc=sdc, vmc=True)
        assert bool(_nan_rows(out64).any())
        _assert_nan_rows(res, out64, kept64)


@pytest.mark.parametrize("variant", ["pipelined", *SKIP_VARIANTS])
def test_nan_in_a_kept_value_row(variant):
    """A NaN V row makes every row that keeps it NaN; a row that does not keep it may be NaN only when its program
    reads that V row (its 32-row block walks the key's tile), never finite garbage."""
    q, k, v = _qkv(1, 2, 1, 40, 40, 16, seed=9)
    theta = _theta(q, k, [[0.3], [0.6]])
    v[0, 0, 35] = float("nan")
    res = _prefill(q, k, v, theta, sdc="none", variant=variant)
    out64, kept64, _, _ = _oracle(q, k, v, theta, sdc="none")
    assert bool(_nan_rows(out64).any())
    # Under the interpreter the 32-row blocks are known: rows 0..31 never walk key 35 and must stay clean.
    reads = torch.arange(40) >= (32 if config.INTERPRET else 0)
    _assert_nan_rows(res, out64, kept64, allowed=reads[None, None, :].expand(1, 2, 40))


# ---- precision ------------------------------------------------------------------------------------------------------


def _offset_qkv(lq, lk, d, *, seed):
    """Integer q and k whose scores at sm_scale 1/8 are 1000 + multiples of 1/8 in [-7.5, 7.5]: every product and
    score is exact in float32 (and tf32), so any error comes from how the softmax exponentiates."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (1, 2, lq, d), generator=gen).float()
    k = torch.randint(-2, 3, (1, 1, lk, d), generator=gen).float()
    q[..., -1], k[..., -1] = 125.0, 64.0  # 125 · 64 / 8 = 1000
    v = torch.randn(1, 1, lk, d, generator=gen)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize(
    "opts",
    [dict(), dict(sdc="threshold", vmc=True), dict(placement="post"), dict(sinks=[1000.3, 996.0], sdc="none")],
    ids=["dense", "threshold", "post", "sinks"],
)
def test_fp32_error_does_not_grow_with_score_magnitude(opts):
    """Issue D7: with every score near 1000, float32 outputs stay within the tolerance rule. Exponentiating
    separately rounded s·log2(e) and m·log2(e) (the old kernel) errs by 3.7e-5 here, 23x the rule."""
    q, k, v = _offset_qkv(30, 30, 16, seed=2)
    opts = dict(opts)
    if "sinks" in opts:
        opts["sinks"] = torch.tensor(opts["sinks"], device=DEVICE)
    if opts.get("placement") == "post":
        theta = _theta(q, k, [[0.3], [0.1]], placement="post", scale=0.125)
    elif opts.get("sdc") == "threshold" or "sinks" in opts:
        theta = _theta(q, k, [[0.3], [0.1]], scale=0.125, sinks=opts.get("sinks"))
    else:
        theta = None
    _check(q, k, v, theta, scale=0.125, what=str(opts), **opts)


def test_post_theta_zero_keeps_keys_whose_probability_underflows():
    """Issue D6: placement "post" compares log p with log θ, so θ = 0 keeps every visible key, also those whose
    probability underflows to 0 in float32, and a tiny θ drops exactly the keys below it."""
    q, k, v = _qkv(1, 2, 1, 24, 24, 16, spread=60.0, seed=5)
    s = _scores64(q, k)
    vis = _visible64(q, k)
    log_p = torch.log_softmax(s.masked_fill(~vis, -math.inf), -1)
    assert bool((log_p[vis] < -120).any())  # such keys exist: exp underflows in float32 below about -103
    res = _check(q, k, v, torch.zeros(2, 1), placement="post")
    assert torch.equal(res.kept, res.visible)
    tiny = _theta(q, k, [[0.9], [0.8]], placement="post")
    _check(q, k, v, tiny, placement="post", vmc=True)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_extreme_scores_stay_finite(dtype):
    q, k, v = _qkv(1, 2, 1, 35, 35, 32, dtype, spread=40.0, seed=7)
    theta = _theta(q, k, [[0.2], [0.5]])
    for sdc in ("none", "threshold"):
        res = _check(q, k, v, theta, sdc=sdc, vmc=True, what=f"{dtype}-{sdc}")
        assert torch.isfinite(res.out).all()


# ---- tiles: counts, skipped work, variants -------------------------------------------------------------------------


def _tile_walk(q, k, theta, *, block_m, block_n, q_offset, padding=None, k_dense=0):
    """(total, dead, live_keys) of the main pass, from float64 scores: the tiles each program walks (its keys from
    the first attended one, rounded down to a tile, up to its last row's causal limit) and those in which nothing is
    kept; ``live_keys [B, Hkv, Lk]`` marks keys in a tile that some program of the kv group finds live."""
    b_, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    s = _scores64(q, k)
    vis = _visible64(q, k, q_offset=q_offset, padding=padding)
    n = vis.sum(-1)
    table = theta.cpu().double()
    th = table.gather(1, (n.clamp(1, table.shape[1]) - 1).transpose(0, 1).reshape(hq, -1)).reshape(hq, b_, lq)
    keep = vis & ((s > th.transpose(0, 1)[..., None]) | (n <= k_dense)[..., None])
    total = dead = 0
    live_keys = torch.zeros(b_, hkv, lk, dtype=torch.bool)
    for b in range(b_):
        key_lo, key_hi = 0, lk
        if padding is not None:
            idx = padding[b].nonzero()
            key_lo, key_hi = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)
        for m0 in range(0, lq, block_m):
            m1 = min(m0 + block_m, lq)
            hi = max(min(key_hi, q_offset + m1), key_lo)
            for n0 in range(key_lo // block_n * block_n, hi, block_n):
                for h in range(hq):
                    total += 1
                    alive = bool(keep[b, h, m0:m1, n0 : n0 + block_n].any())
                    dead += not alive
                    live_keys[b, h * hkv // hq, n0 : n0 + block_n] |= alive
    return total, dead, live_keys


TILE_RUNS = [((16, 16, 4, 1), "pipelined"), ((32, 16, 4, 1), "skip_dot"), ((16, 32, 4, 1), "skip_load")]


@pytest.mark.parametrize("block_config, variant", TILE_RUNS, ids=[f"M{c[0]}N{c[1]}-{v}" for c, v in TILE_RUNS])
def test_tile_counts(block_config, variant):
    """The tile counts are exactly the walked tiles and those with nothing kept, for tiles taller or wider than
    each other, with left padding."""
    q, k, v = _qkv(2, 2, 1, 33, 50, 16, spread=2.0, seed=5)
    padding = left_padding_mask([50, 29], 50, DEVICE)[:, 0, 0, :]
    # Head 0 keeps a handful of scores (most of its tiles are dead), head 1 a fifth of them.
    theta = _theta(q, k, [[0.004], [0.2]], padding=padding, q_offset=17)
    res = _prefill(q, k, v, theta, padding=padding, block_config=block_config, variant=variant)
    total, dead, _ = _tile_walk(q, k, theta, block_m=block_config[0], block_n=block_config[1], q_offset=17,
                                padding=padding)  # fmt: skip
    assert (int(res.total_tiles), int(res.skipped_tiles)) == (total, dead)
    assert 0 < dead < total


@pytest.mark.parametrize("variant", SKIP_VARIANTS)
def test_dead_tiles_values_never_reach_the_output(variant):
    """A tile with nothing kept is counted as skipped and its V rows are never multiplied ("skip_dot") or never
    read ("skip_load"): V rows that only dead tiles cover are NaN here and the output still equals the oracle's
    with clean values (no vmc: its V mean reads every visible row by design)."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 2, 48, 16, generator=gen) + 1.0
    k = torch.randn(1, 2, 48, 16, generator=gen)
    k[:, :, 16:32] -= 4.0  # keys 16..31 score far below the rest: every tile that holds them is pruned
    q, k = q.to(DEVICE), k.to(DEVICE)
    v = torch.randn(1, 2, 48, 16, generator=gen).to(DEVICE)
    theta = _theta(q, k, [[0.3], [0.0]])  # head 1 keeps nothing at all
    block_m, block_n = config.PREFILL_INTERPRET_CONFIG[:2] if config.INTERPRET else (32, 16)
    block = (block_m, block_n, 4, 1)
    total, dead, live_keys = _tile_walk(q, k, theta, block_m=block_m, block_n=block_n, q_offset=0)
    poisoned = v.clone()
    poisoned[~live_keys.to(DEVICE)] = float("nan")
    assert int((~live_keys[0, 0]).sum()) >= block_n and bool((~live_keys[0, 1]).all())
    res = _prefill(q, k, poisoned, theta, sdc="threshold", block_config=block, variant=variant)
    assert (int(res.total_tiles), int(res.skipped_tiles)) == (total, dead)
    out64, kept64, visible64, _ = _oracle(q, k, v, theta, sdc="threshold")
    assert torch.equal(res.kept.long().cpu(), kept64)
    assert_close_to_oracle(res.out, out64, q, k, v, what=variant)


def test_variants_agree():
    q, k, v = _qkv(1, 2, 1, 30, 40, 16, "fp16", seed=12)
    padding = left_padding_mask([36], 40, DEVICE)[:, 0, 0, :]
    theta = _theta(q, k, [[0.2], [0.05]], padding=padding)
    kw = dict(padding=padding, sdc="threshold", vmc=True, cap=6, k_dense=3)
    results = {variant: _prefill(q, k, v, theta, variant=variant, **kw) for variant in prefill.VARIANTS}
    base = results["pipelined"]
    for variant, res in results.items():
        assert torch.equal(res.kept, base.kept) and torch.equal(res.visible, base.visible), variant
        assert int(res.skipped_tiles) == int(base.skipped_tiles) and int(res.total_tiles) == int(base.total_tiles)
        torch.testing.assert_close(res.out, base.out, atol=2e-3, rtol=0, msg=variant)
    out64, *_ = _oracle(q, k, v, theta, **kw)
    assert_close_to_oracle(base.out, out64, q, k, v, padding[:, None, None, :])


# ---- the launcher ----------------------------------------------------------------------------------------------------


def test_strided_inputs_and_output():
    """[B, L, H, D] tensors seen as [B, H, L, D], a V with a strided last dim, and an output buffer that is such a
    view too."""
    b, hq, hkv, lq, lk, d = 1, 2, 1, 27, 33, 32
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(b, lq, hq, d, generator=gen).to(DEVICE).transpose(1, 2)
    k = torch.randn(b, lk, hkv, d, generator=gen).to(DEVICE).transpose(1, 2)
    v = torch.randn(b, lk, hkv, 2 * d, generator=gen).to(DEVICE)[..., ::2].transpose(1, 2)
    theta = _theta(q, k, [[0.3], [0.5]])
    out = torch.full((b, lq, hq, d), float("nan"), device=DEVICE).transpose(1, 2)
    res = _prefill(q, k, v, theta, out=out, sdc="threshold", vmc=True)
    out64, kept64, _, _ = _oracle(q, k, v, theta, sdc="threshold", vmc=True)
    assert torch.equal(res.kept.long().cpu(), kept64)
    assert_close_to_oracle(out, out64, q, k, v)


def test_stats_off_returns_none():
    q, k, v = _qkv(1, 2, 1, 20, 20, 16)
    res = _prefill(q, k, v, torch.full((2, 1), 0.1), return_stats=False)
    assert res.kept is None and res.visible is None and res.skipped_tiles is None and res.total_tiles is None
    out64, *_ = _oracle(q, k, v, torch.full((2, 1), 0.1))
    assert_close_to_oracle(res.out, out64, q, k, v)


def test_launcher_makes_no_host_sync():
    """No .item(), bool(tensor), nonzero or other device-to-host read in the launcher (spec: the hot path)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    forbidden = {
        torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default, torch.ops.aten.is_nonzero.default,
        torch.ops.aten.nonzero.default, torch.ops.aten.equal.default,
    }  # fmt: skip

    class NoSync(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func not in forbidden, f"host sync: {func}"
            return func(*args, **(kwargs or {}))

    q, k, v = _qkv(1, 2, 1, 20, 24, 16)
    key_padding = _key_padding(left_padding_mask([20], 24, DEVICE)[:, 0, 0, :])
    theta = _table([[0.5], [0.2]], 2)
    with NoSync():
        top_theta_prefill(
            q, k, v, theta=theta, key_padding=key_padding, sm_scale=0.25, q_offset=4, sdc="threshold", vmc=True,
            cap=4, return_stats=True, sinks=torch.zeros(2, device=DEVICE), softcap=5.0,
        )  # fmt: skip


def test_one_config_under_the_interpreter():
    configs = prefill.tile_configs()
    if config.INTERPRET:
        assert configs == (config.PREFILL_INTERPRET_CONFIG,)
        assert prefill.fitting_configs(64, 64, 2, 1 << 30) == [config.PREFILL_INTERPRET_CONFIG]
    else:
        assert configs == tuple(config.PREFILL_CONFIGS)


def test_a_general_mask_leaves_out_the_configs_that_spill_with_it(monkeypatch):
    """The compile report found (128, 64, 8, 3) spilling with a general per-row mask at D=128 (and only there): such
    calls choose among the others, with autotuning on (the prune) and off (the fit rule) alike."""
    monkeypatch.setattr(config, "INTERPRET", False)
    assert config.PREFILL_FULL_MASK_EXCLUDED and set(config.PREFILL_FULL_MASK_EXCLUDED) <= set(config.PREFILL_CONFIGS)
    full, shared_rows, keys = prefill.MASK_FULL.value, prefill.MASK_SHARED.value, prefill.MASK_KEYS.value
    for block in config.PREFILL_FULL_MASK_EXCLUDED:
        assert prefill.config_fits(block, 128, 128, 2, 1 << 30)
        assert prefill.config_fits(block, 128, 128, 2, 1 << 30, keys)
        assert prefill.config_fits(block, 128, 128, 2, 1 << 30, shared_rows)
        assert not prefill.config_fits(block, 128, 128, 2, 1 << 30, full)
    masked = prefill.fitting_configs(128, 128, 2, 1 << 30, full)
    plain = prefill.fitting_configs(128, 128, 2, 1 << 30)
    assert masked == [c for c in plain if c not in config.PREFILL_FULL_MASK_EXCLUDED] and masked


def test_fit_rule_is_honoured_with_autotuning_off(monkeypatch):
    """SPARSE_ATTENTION_AUTOTUNE=0 launches the first shipped config that fits the call (shared memory, register
    tiles, the float32 limits), not blindly the first of the list."""
    monkeypatch.setattr(config, "INTERPRET", False)
    monkeypatch.setattr(config, "AUTOTUNE", False)
    monkeypatch.setattr(prefill, "unsupported_reason", lambda *a, **kw: None)
    launched = {}

    class FakeKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.update(grid=grid, **kwargs)

            return launch

    monkeypatch.setattr(prefill, "_top_theta_prefill_kernel", FakeKernel())
    firsts = set()
    for dtype, d in ((torch.float16, 64), (torch.float16, 128), (torch.float32, 128), (torch.float16, 256)):
        q = torch.zeros(1, 2, 300, d, dtype=dtype)
        fitting = prefill.fitting_configs(d, d, q.element_size(), 1 << 30)  # CPU tensors: no shared-memory limit
        launched.clear()
        top_theta_prefill(q, q, q, sm_scale=0.1, q_offset=0)
        chosen = (launched["BLOCK_M"], launched["BLOCK_N"], launched["num_warps"], launched["num_stages"])
        assert chosen == fitting[0] and prefill.config_fits(chosen, d, d, q.element_size(), 1 << 30)
        assert launched["grid"] == (-(-300 // chosen[0]) * 2,)
        firsts.add(chosen)
    assert len(firsts) > 1, "the fit rule should send some of these calls past the first shipped config"
    # A device with less shared memory (99 KB per block) loses the configs that need more.
    small = prefill.fitting_configs(128, 128, 2, 101376)
    assert small and len(small) < len(prefill.fitting_configs(128, 128, 2, 232448))


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(d=8), "query/key head dim 8"),
        (dict(d=320), "query/key head dim 320"),
        (dict(dv=8), "value head dim 8"),
        (dict(dtype=torch.bfloat16), "bfloat16"),
        (dict(dtype=torch.float32, d=256), "float32 with a head dim above 128"),
        (dict(dtype=torch.float32, d=64, dv=160), "float32 with a head dim above 128"),
        (dict(variant="fastest"), "variant"),
    ],
    ids=["head-dim-8", "head-dim-320", "value-head-dim-8", "bf16-interpreter", "fp32-D256", "fp32-Dv160",
         "unknown-variant"],
)  # fmt: skip
def test_refusals_name_the_reason(change, words):
    if change.get("dtype") is torch.bfloat16 and not config.INTERPRET:
        pytest.skip("bfloat16 runs on a GPU; the refusal is the interpreter's (issue D3)")
    d = change.get("d", 16)
    q = torch.zeros(1, 2, 4, d, device=DEVICE, dtype=change.get("dtype", torch.float32))
    v = torch.zeros(1, 2, 4, change.get("dv", d), device=DEVICE, dtype=q.dtype)
    with pytest.raises(ValueError, match=words):
        top_theta_prefill(q, q, v, sm_scale=0.25, q_offset=0, variant=change.get("variant"))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(config, "INTERPRET", False)
    q = torch.zeros(1, 1, 4, 16)
    with pytest.raises(ValueError, match="query is on cpu"):
        top_theta_prefill(q, q, q, sm_scale=0.25, q_offset=0)
    assert common.unsupported_reason("prefill", q, q, q) is not None


# ---- GPU only ------------------------------------------------------------------------------------------------------


GPU_CASES = [
    ((2, 8, 2, 130, 130, 64, 64), "bf16", dict(sdc="threshold", vmc=True, padding="left")),
    ((1, 4, 1, 97, 160, 128, 128), "bf16", dict(placement="post", k_dense=8, sinks=[0.5, 1.0, -1.0, 2.0])),
    ((2, 4, 4, 120, 120, 128, 64), "fp16", dict(sdc="calibrated", general_mask=True, vmc=True)),
    ((1, 8, 8, 100, 100, 256, 256), "fp16", dict(sdc="none", causal=False)),
    ((1, 4, 2, 111, 111, 80, 80), "fp32", dict(sdc="exact", vmc=True, softcap=5.0)),
    ((1, 2, 1, 140, 150, 64, 64), "bf16", dict(placement="post", general_mask=True, vmc=True, cap=17)),
    ((1, 4, 2, 150, 150, 128, 128), "bf16", dict(cap=40, sdc="threshold", padding="holes")),
]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(prefill.VARIANTS))
@pytest.mark.parametrize("shape, dtype, spec", GPU_CASES, ids=[_case_id(*c) for c in GPU_CASES])
def test_gpu_matches_oracle(shape, dtype, spec, variant):
    b, hq, hkv, lq, lk, d, dv = shape
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, dv=dv)
    theta, kw = _case_kwargs(q, k, spec)
    _check(q, k, v, theta, variant=variant, what=_case_id(shape, dtype, spec), **kw)


@pytest.mark.gpu
def test_gpu_fp32_tf32x3_within_the_rule():
    """float32 runs its dots in tf32x3 on the tensor cores: the written float32 rule (the module docstring) holds
    over many random cases."""
    for seed in range(24):
        d = (16, 32, 64, 128)[seed % 4]
        q, k, v = _qkv(1, 2, 1, 96, 96 + seed, d, spread=(1.0, 2.0, 4.0)[seed % 3], seed=seed)
        _check(q, k, v, what=f"seed {seed}")


def _reference64(q, k, v, theta, *, scale, padding, sdc, vmc):
    """A vectorised float64 Top-θ for long sequences (placement "pre", causal, key padding): the oracle's semantics
    for the options used, on the device."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    hq, hkv = q.shape[1], k.shape[1]
    k64, v64 = k64.repeat_interleave(hq // hkv, 1), v64.repeat_interleave(hq // hkv, 1)
    lq, lk = q.shape[2], k.shape[2]
    s = scale * q64 @ k64.transpose(-1, -2)
    vis = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + (lk - lq)
    vis = (vis & padding[:, None, None, :]).expand(q.shape[0], hq, lq, lk)
    n = vis.sum(-1)
    th = theta.double().gather(1, (n.clamp(min=1, max=theta.shape[1]) - 1).transpose(0, 1).reshape(hq, -1))
    th = th.reshape(hq, q.shape[0], lq).transpose(0, 1)[..., None]
    keep = vis & (s > th)
    m = s.masked_fill(~vis, -math.inf).amax(-1, keepdim=True).clamp(min=-1e300)
    e = torch.exp(s - m) * vis
    e_kept = e * keep
    d_kept = e_kept.sum(-1, keepdim=True)
    dropped = (n - keep.sum(-1))[..., None]
    miss = torch.where(dropped > 0, dropped * torch.exp(th - m), 0.0) if sdc == "threshold" else 0.0
    denom = d_kept + miss
    out = torch.where(denom > 0, e_kept @ v64 / denom.clamp(min=1e-300), 0.0)
    if vmc:
        mean = (vis.double() @ v64) / n.clamp(min=1)[..., None]
        out += (1 - torch.where(denom > 0, d_kept / denom, 0.0)) * mean
    return out, keep.sum(-1), n


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(prefill.VARIANTS))
@pytest.mark.parametrize("lq, lk", [(513, 513), (1500, 1500), (4096, 4096)])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gpu_long_sequences(lq, lk, dtype, variant):
    """Autotuned launches with real pruning up to 4k. Scores are exact multiples of 1/16 (small integer q and k, a
    power-of-two scale) and thresholds lie halfway between two multiples, so no keep decision can tie."""
    gen = torch.Generator().manual_seed(lq)
    q = torch.randint(-2, 3, (1, 8, lq, 128), generator=gen).to(DEVICE, DTYPES[dtype])
    k = torch.randint(-2, 3, (1, 2, lk, 128), generator=gen).to(DEVICE, DTYPES[dtype])
    v = torch.randn(1, 2, lk, 128, generator=gen).to(DEVICE, DTYPES[dtype])
    scale = 1.0 / 16
    s = _scores64(q[:, :, ::7], k[:, :, ::7], scale)
    levels = torch.tensor([0.6, 0.9, 0.97, 0.995], dtype=torch.float64)  # keep about 40% .. 0.5% of the scores
    cuts = torch.quantile(s.transpose(0, 1).reshape(8, -1), levels, dim=1).T  # [Hq, 4]
    theta = (((cuts * 16).floor() + 0.5) / 16)[:, torch.arange(64) * 4 // 64].float().to(DEVICE)
    padding = torch.ones(1, lk, dtype=torch.bool, device=DEVICE)
    padding[:, : lk // 5] = False
    res = _prefill(q, k, v, theta, padding=padding, scale=scale, sdc="threshold", vmc=True, variant=variant)
    out64, kept, n = _reference64(q, k, v, theta, scale=scale, padding=padding, sdc="threshold", vmc=True)
    assert torch.equal(res.visible.long(), n) and torch.equal(res.kept.long(), kept)
    assert 0 < int(kept.sum()) < int(n.sum()) and int(res.total_tiles) > 0
    err = float((res.out.double() - out64).abs().max())
    allowed = tolerance(q, k, v, padding[:, None, None, :], scale=scale, magnitude=float(out64.abs().max()))
    assert err <= allowed, f"max abs error {err:.3e} exceeds tolerance {allowed:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("block", config.PREFILL_CONFIGS, ids=lambda c: "M{}-N{}-W{}-S{}".format(*c))
@pytest.mark.parametrize("dtype, d", [("fp16", 64), ("bf16", 128), ("fp32", 64), ("fp16", 256)])
def test_gpu_every_shipped_config(block, dtype, d):
    shared = prefill._device_shared_memory(torch.device(DEVICE).index or 0)
    if not prefill.config_fits(block, d, d, DTYPES[dtype].itemsize, shared):
        pytest.skip("not launched for this head dim and dtype: the fit rule excludes it")
    q, k, v = _qkv(2, 4, 2, 150, 211, d, dtype, seed=11)
    for spec in (dict(sdc="threshold", vmc=True, padding="left"), dict(placement="post", general_mask=True)):
        theta, kw = _case_kwargs(q, k, spec)
        for variant in prefill.VARIANTS:
            _check(q, k, v, theta, block_config=block, variant=variant, what=f"{block}-{dtype}-{spec}", **kw)
