"""Tests of sparse_attention.ops.regularizer: the public topk_regularizer, its reference path and its argument checks.

Values and gradients are checked against the float64 oracle of tests/support (``oracle_regularizer``, written row by
row from DESIGN.md, "The condensation regularizer"): it shares no code with the package. The fused kernels are
compared with the oracle in tests/kernels/test_regularizer.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from sa_testing import oracle_regularizer

from sparse_attention.ops import regularizer
from sparse_attention.ops.regularizer import RegularizerTerms, regularizer_terms, topk_regularizer, topk_weights


def make_inputs(b, hq, hkv, lq, lk, d, dtype=torch.float32, spread=1.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, lq, d, generator=gen) * spread).to(dtype).requires_grad_(True)
    k = torch.randn(b, hkv, lk, d, generator=gen).to(dtype).requires_grad_(True)
    return q, k


def make_mask(kind, b, hq, lq, lk, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "padding":  # HF left padding: batch element b skips its first 3*b keys
        pos = torch.arange(lk)
        return torch.stack([pos >= 3 * i for i in range(b)])[:, None, None, :]
    if kind == "random-per-head":
        return torch.rand(b, hq, lq, lk, generator=gen) > 0.3
    raise AssertionError(kind)


def oracle(q, k, topk, **kw):
    return oracle_regularizer(q, k, topk, **kw)[:4]


def assert_matches_oracle(q, k, topk, got_loss, got_dq, got_dk, *, grad_rtol=1e-4, **kw):
    loss, dq, dk, _ = oracle(q, k, topk, **kw)
    assert torch.isfinite(got_loss), "loss is not finite"
    assert abs(got_loss.item() - loss) <= 1e-5 * max(1.0, abs(loss)), f"loss {got_loss.item()} vs oracle {loss}"
    for name, got, want in (("dq", got_dq, dq), ("dk", got_dk, dk)):
        assert not torch.isnan(got).any(), f"{name} has NaN"
        scale = float(want.abs().max())
        err = float((got.double() - want).abs().max())
        assert err <= grad_rtol * max(scale, 1e-12), f"{name}: max abs error {err:.3e} vs scale {scale:.3e}"


CASES = [
    # (B, Hq, Hkv, Lq, Lk, D, k, causal, mask)
    (2, 4, 2, 37, 37, 16, 4, True, "none"),
    (1, 2, 1, 19, 45, 8, 5, True, "padding"),
    (2, 2, 2, 33, 33, 32, 16, True, "padding"),
    (1, 3, 1, 21, 21, 16, 3, False, "random-per-head"),
    (2, 4, 4, 25, 25, 8, 1, True, "random-per-head"),
    (1, 2, 1, 30, 12, 16, 4, True, "none"),  # Lq > Lk: the first rows see nothing
]


def case_id(case):
    b, hq, hkv, lq, lk, d, k, causal, mask = case
    return f"B{b}-H{hq}-Hkv{hkv}-Lq{lq}-Lk{lk}-D{d}-k{k}-{'causal' if causal else 'full'}-{mask}"


@pytest.mark.parametrize("kind", ["logmass", "mass"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_matches_oracle(case, kind):
    b, hq, hkv, lq, lk, d, topk, causal, mask_kind = case
    q, k = make_inputs(b, hq, hkv, lq, lk, d)
    mask = make_mask(mask_kind, b, hq, lq, lk)
    loss = topk_regularizer(q, k, topk, causal=causal, attn_mask=mask, kind=kind, backend="reference")
    dq, dk = torch.autograd.grad(loss, (q, k))
    assert loss.dtype == torch.float32
    assert_matches_oracle(q, k, topk, loss, dq, dk, causal=causal, mask=mask, kind=kind)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reference_half_inputs_compute_in_float32(dtype):
    q, k = make_inputs(1, 4, 2, 29, 29, 16, dtype=dtype)
    loss = topk_regularizer(q, k, 4, backend="reference")
    dq, dk = torch.autograd.grad(loss, (q, k))
    assert loss.dtype == torch.float32
    assert dq.dtype == dtype and dk.dtype == dtype
    # The inputs are exact in float64, so only float32 arithmetic and the cast of the gradients differ.
    assert_matches_oracle(q, k, 4, loss, dq, dk, grad_rtol=2 * torch.finfo(dtype).eps)


def test_explicit_scale_and_q_offset():
    q, k = make_inputs(1, 2, 1, 9, 20, 16)
    loss = topk_regularizer(q, k, 3, scale=0.3, q_offset=4, backend="reference")
    dq, dk = torch.autograd.grad(loss, (q, k))
    assert_matches_oracle(q, k, 3, loss, dq, dk, scale=0.3, q_offset=4)


@pytest.mark.parametrize("topk", [1, 3, 6, 11])
@pytest.mark.parametrize("kind", ["logmass", "mass"])
def test_ties_share_the_leftover_slots(topk, kind):
    # Integer inputs and a power-of-two scale give exact scores with few distinct values: ties everywhere.
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-1, 2, (1, 2, 24, 16), generator=gen).float()
    k = torch.randint(-1, 2, (1, 1, 24, 16), generator=gen).float()
    q[..., 3:] = 0
    scores = 0.5 * q @ k.transpose(-1, -2)
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    weights = topk_weights(scores, causal.expand_as(scores), topk)
    assert ((weights > 0) & (weights < 1)).any(), "the inputs must produce ties at the k-th score"
    q.requires_grad_(True)
    k.requires_grad_(True)
    loss = topk_regularizer(q, k, topk, scale=0.5, kind=kind, backend="reference")
    dq, dk = torch.autograd.grad(loss, (q, k))
    assert_matches_oracle(q, k, topk, loss, dq, dk, scale=0.5, kind=kind)


def test_topk_weights_sum_to_k_with_ties():
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, 2.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    visible = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    w = topk_weights(scores, visible, 3)
    # Row 0: 3 and 2 are in, the three 1.0s share the last slot. Row 1: four visible ties share three slots.
    want = torch.tensor([[1.0, 1 / 3, 1 / 3, 1 / 3, 0.0, 1.0], [0.75, 0.75, 0.75, 0.75, 0.0, 0.0]])
    torch.testing.assert_close(w, want)


@pytest.mark.parametrize("kind", ["logmass", "mass"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "causal+mask"])
def test_gradcheck_float64(kind, masked):
    q, k = make_inputs(2, 2, 1, 7, 9, 4, dtype=torch.float64)
    mask = make_mask("random-per-head", 2, 2, 7, 9) if masked else None

    def fn(q, k):
        return topk_regularizer(q, k, 2, attn_mask=mask, kind=kind, backend="reference")

    assert fn(q, k).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (q, k))


def test_known_value_for_uniform_rows():
    # A zero query makes every visible score equal: row i with n = i + 1 > k keys has top-k mass k / n.
    q = torch.zeros(1, 1, 6, 8, requires_grad=True)
    k = torch.randn(1, 1, 6, 8, requires_grad=True)
    rows = [k_ / n for k_, n in ((2, 3), (2, 4), (2, 5), (2, 6))]
    logmass = topk_regularizer(q, k, 2, backend="reference")
    mass = topk_regularizer(q, k, 2, kind="mass", backend="reference")
    assert logmass.item() == pytest.approx(sum(-math.log(m) for m in rows) / 4, rel=1e-6)
    assert mass.item() == pytest.approx(sum(1 - m for m in rows) / 4, rel=1e-6)


def test_no_regularized_row_gives_zero_and_zero_gradient():
    q, k = make_inputs(1, 2, 1, 8, 8, 16)
    loss = topk_regularizer(q, k, 8, backend="reference")  # row i sees i + 1 <= 8 keys
    dq, dk = torch.autograd.grad(loss, (q, k))
    assert loss.item() == 0.0
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))


def test_rows_with_nothing_visible_are_skipped_without_nan():
    q, k = make_inputs(2, 2, 1, 12, 12, 16)
    mask = torch.ones(2, 1, 12, 12, dtype=torch.bool)
    mask[0, :, 5:] = False  # rows 5.. of batch 0 see nothing
    loss = topk_regularizer(q, k, 2, attn_mask=mask, backend="reference")
    dq, dk = torch.autograd.grad(loss, (q, k))
    assert_matches_oracle(q, k, 2, loss, dq, dk, mask=mask)
    assert torch.equal(dq[0, :, 5:], torch.zeros_like(dq[0, :, 5:]))


def test_terms_combine_into_one_mean():
    q, k = make_inputs(1, 2, 1, 16, 16, 16)
    terms = regularizer_terms(q, k, 3, backend="reference")
    assert isinstance(terms, RegularizerTerms)
    _, _, _, mass = oracle(q, k, 3)
    assert float(terms.rows) == 2 * (16 - 3)  # rows 3..15 of both heads have more than 3 visible keys
    assert float(terms.mass_sum / terms.rows) == pytest.approx(mass, rel=1e-5)
    assert terms.loss.item() == pytest.approx(topk_regularizer(q, k, 3, backend="reference").item(), rel=1e-6)
    assert not terms.mass_sum.requires_grad and not terms.rows.requires_grad


def test_regularizer_rewards_concentration():
    # Sharper attention (a larger score spread) must have a smaller loss.
    q, k = make_inputs(1, 2, 1, 32, 32, 16, spread=0.5)
    losses = [topk_regularizer(q * c, k, 4, backend="reference").item() for c in (1.0, 4.0, 16.0)]
    assert losses[0] > losses[1] > losses[2] >= 0.0


def test_auto_uses_the_reference_on_cpu(monkeypatch):
    def fail(*args):
        raise AssertionError("the fused kernels ran on CPU tensors")

    monkeypatch.setattr(regularizer, "fused_terms", fail)
    q, k = make_inputs(1, 2, 1, 10, 10, 16)
    auto = topk_regularizer(q, k, 3)
    assert torch.equal(auto, topk_regularizer(q, k, 3, backend="reference"))
    with pytest.raises(AssertionError, match="fused kernels ran"):
        topk_regularizer(q, k, 3, backend="triton")


# ---- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_k", [0, -1, 2.0, True, None], ids=["zero", "negative", "float", "bool", "none"])
def test_bad_k(bad_k):
    q, k = make_inputs(1, 2, 1, 8, 8, 16)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        topk_regularizer(q, k, bad_k)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"kind": "entropy"}, ValueError, "kind must be one of"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        ({"scale": float("nan")}, ValueError, "scale must be finite"),
        ({"softcap": -1.0}, ValueError, "softcap must be > 0"),
        ({"sinks": torch.ones(3)}, ValueError, "sinks must be"),
        ({"attn_mask": torch.ones(1, 1, 8, 8)}, TypeError, "attn_mask must have dtype torch.bool"),
        ({"attn_mask": torch.ones(1, 1, 7, 8, dtype=torch.bool)}, ValueError, "attn_mask of shape"),
        ({"backend": "triton", "dtype": torch.float64}, ValueError, "backend='triton' cannot run"),
    ],
    ids=["kind", "backend", "scale", "softcap", "sinks", "mask-dtype", "mask-shape", "triton-float64"],
)
def test_bad_arguments(kwargs, error, pattern):
    dtype = kwargs.pop("dtype", torch.float32)
    q, k = make_inputs(1, 2, 1, 8, 8, 16, dtype=dtype)
    with pytest.raises(error, match=pattern):
        topk_regularizer(q, k, 2, **kwargs)


def test_triton_backend_rejects_k_above_the_kernel_limit():
    from sparse_attention.kernels import config

    q, k = make_inputs(1, 1, 1, 8, 8, 16)
    with pytest.raises(ValueError, match=f"exceeds the fused regularizer's maximum {config.REGULARIZER_MAX_K}"):
        topk_regularizer(q, k, config.REGULARIZER_MAX_K + 1, backend="triton")


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "pattern"),
    [
        ((1, 2, 8, 16), (1, 2, 8, 8), "key head dim 8 does not match query head dim 16"),
        ((1, 2, 8, 16), (2, 2, 8, 16), "key batch size 2 does not match query batch size 1"),
        ((1, 3, 8, 16), (1, 2, 8, 16), r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
        ((1, 2, 8), (1, 2, 8, 16), "query must have rank 4"),
    ],
    ids=["head-dim", "batch", "groups", "rank"],
)
def test_mismatched_shapes(q_shape, k_shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        topk_regularizer(torch.randn(q_shape), torch.randn(k_shape), 2)


def test_non_tensor_and_mixed_dtypes():
    q, k = make_inputs(1, 2, 1, 8, 8, 16)
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        topk_regularizer(q.tolist(), k, 2)
    with pytest.raises(TypeError, match="key has dtype torch.float16 but query has torch.float32"):
        topk_regularizer(q, k.half(), 2)


# ---- softcap and sinks (issue 12) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["logmass", "mass"])
@pytest.mark.parametrize(
    "extra", [dict(softcap=1.5), dict(sinks=True), dict(softcap=0.7, sinks=True)], ids=["softcap", "sinks", "both"]
)
def test_softcap_and_sinks_match_oracle(extra, kind):
    q, k = make_inputs(2, 4, 2, 17, 17, 16)
    mask = make_mask("padding", 2, 4, 17, 17)
    kw = dict(extra)
    sinks = None
    if kw.pop("sinks", False):
        sinks = torch.randn(4, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    loss = topk_regularizer(q, k, 3, attn_mask=mask, kind=kind, sinks=sinks, backend="reference", **kw)
    wrt = (q, k) if sinks is None else (q, k, sinks)
    grads = torch.autograd.grad(loss, wrt)
    want_loss, want_dq, want_dk, _, want_dsinks = oracle_regularizer(q, k, 3, mask=mask, kind=kind, sinks=sinks, **kw)
    assert_matches_oracle(q, k, 3, loss, grads[0], grads[1], mask=mask, kind=kind, sinks=sinks, **kw)
    if sinks is not None:
        torch.testing.assert_close(grads[2].double(), want_dsinks, atol=1e-6, rtol=1e-4)


def test_a_sink_counts_as_kept():
    # zero query: every score 0; with a sink logit 0 the top-2 of 5 keys plus the sink hold 3/6 of the mass
    q = torch.zeros(1, 1, 1, 8)
    k = torch.randn(1, 1, 5, 8)
    mass = topk_regularizer(q, k, 2, kind="mass", sinks=torch.zeros(1), backend="reference")
    assert mass.item() == pytest.approx(1 - 3 / 6, rel=1e-6)


@pytest.mark.parametrize(
    "extra",
    [dict(), dict(softcap=1.5, sinks=True), dict(mask="padding", q_offset=3)],
    ids=["causal", "softcap-sinks", "padding-qoffset"],
)
def test_the_fused_kernels_through_the_public_api_equal_the_reference(extra):
    # The ops layer hands the kernels key padding, causality and the offset (they skip tiles by index).
    from sparse_attention.kernels import config

    if not (config.INTERPRET or torch.cuda.is_available()):
        pytest.skip("the fused kernels need CUDA or TRITON_INTERPRET=1")
    kw = dict(extra)
    b, hq, hkv, lq, lk = 2, 4, 2, 13, 16 if kw.get("q_offset") else 13
    q, k = make_inputs(b, hq, hkv, lq, lk, 16)
    if kw.pop("mask", None):
        kw["attn_mask"] = make_mask("padding", b, hq, lq, lk)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(hq).requires_grad_(True)
    grads = {}
    for backend in ("triton", "reference"):
        loss = topk_regularizer(q, k, 3, backend=backend, **kw)
        wrt = [q, k] + ([kw["sinks"]] if "sinks" in kw else [])
        grads[backend] = (loss, *torch.autograd.grad(loss, wrt))
    for got, want in zip(grads["triton"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
