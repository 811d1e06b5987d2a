"""Tests of the fused Triton regularizer (kernels/regularizer.py) against the reference path.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors in float32 and
float16; bfloat16 and long rows run on a GPU only. The reference itself is checked against a float64 oracle in
tests/sparse_attention/test_regularizer.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from sparse_attention.kernels import config
from sparse_attention.kernels.regularizer import regularizer_forward
from sparse_attention.regularizer import regularizer_terms, topk_regularizer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(b, hq, hkv, lq, lk, d, dtype=torch.float32, spread=1.5, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, lq, d, generator=gen) * spread).to(device, dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen).to(device, dtype)
    return q, k


def make_mask(kind, b, hq, lq, lk, seed=1, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "padding":  # HF left padding: batch element b skips its first 3*b keys
        pos = torch.arange(lk)
        return torch.stack([pos >= 3 * i for i in range(b)])[:, None, None, :].to(device)
    if kind == "random-per-head":
        return (torch.rand(b, hq, lq, lk, generator=gen) > 0.3).to(device)
    if kind == "empty-rows":  # some rows of batch 0 see nothing at all
        mask = torch.ones(b, 1, lq, lk, dtype=torch.bool)
        mask[0, :, lq // 2 :] = False
        return mask.to(device)
    raise AssertionError(kind)


def run(q, k, topk, backend, **kw):
    """Loss and (dq, dk) of one backend on fresh leaves of the same inputs."""
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    loss = topk_regularizer(q, k, topk, backend=backend, **kw)
    dq, dk = torch.autograd.grad(loss, (q, k))
    return loss.detach(), dq, dk


def assert_fused_matches_reference(q, k, topk, *, value_tol=1e-5, grad_tol=1e-4, **kw):
    ref = run(q, k, topk, "reference", **kw)
    fused = run(q, k, topk, "triton", **kw)
    assert torch.isfinite(fused[0]), "fused loss is not finite"
    assert abs(fused[0].item() - ref[0].item()) <= value_tol * max(1.0, abs(ref[0].item())), (
        f"loss: fused {fused[0].item()} vs reference {ref[0].item()}"
    )
    for name, got, want in (("dq", fused[1], ref[1]), ("dk", fused[2], ref[2])):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert not torch.isnan(got).any(), f"{name} has NaN"
        scale = want.float().abs().max().item()
        err = (got.float() - want.float()).abs().max().item()
        assert err <= grad_tol * max(scale, 1e-12), f"{name}: max abs error {err:.3e} vs scale {scale:.3e}"
    return ref, fused


CASES = [
    # (B, Hq, Hkv, Lq, Lk, D, k, causal, mask, kind)
    (2, 4, 2, 37, 37, 16, 4, True, "none", "logmass"),
    (1, 2, 1, 37, 37, 16, 4, True, "none", "mass"),
    (1, 2, 1, 19, 45, 8, 5, True, "padding", "logmass"),
    (2, 2, 2, 33, 33, 32, 16, True, "padding", "mass"),
    (1, 3, 1, 21, 29, 16, 3, False, "random-per-head", "logmass"),
    (1, 2, 2, 40, 40, 24, 20, True, "none", "logmass"),  # k > 16 widens BLOCK_N to 32
    (1, 2, 1, 30, 12, 16, 4, True, "none", "mass"),  # Lq > Lk: the first rows see nothing
    (2, 2, 1, 26, 26, 16, 1, True, "empty-rows", "logmass"),
]


def case_id(case):
    b, hq, hkv, lq, lk, d, k, causal, mask, kind = case
    return f"B{b}-H{hq}-Hkv{hkv}-Lq{lq}-Lk{lk}-D{d}-k{k}-{'causal' if causal else 'full'}-{mask}-{kind}-fp32"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_matches_reference(case):
    b, hq, hkv, lq, lk, d, topk, causal, mask_kind, kind = case
    q, k = make_inputs(b, hq, hkv, lq, lk, d)
    mask = make_mask(mask_kind, b, hq, lq, lk)
    ref, _ = assert_fused_matches_reference(q, k, topk, causal=causal, attn_mask=mask, kind=kind)
    assert ref[0].item() > 0.0  # every case has regularized rows


@pytest.mark.parametrize("topk", [3, 7, 20])
def test_fused_ties_including_dropped_ones(topk):
    # Exact integer scores with a handful of distinct values: far more ties at the k-th score than the 16 or 32 slots
    # of the running buffer, so the count of ties that fell off the buffer decides the tie weight.
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-1, 2, (1, 2, 45, 16), generator=gen).float()
    k = torch.randint(-1, 2, (1, 1, 45, 16), generator=gen).float()
    q[..., 3:] = 0
    stats = regularizer_forward(q.to(DEVICE), k.to(DEVICE), None, topk, 0.5, True, 0)
    tie_w = stats[3].cpu()
    n_visible = stats[4].cpu()
    regularized = n_visible > topk
    assert ((tie_w < 1) & regularized).any(), "the inputs must tie at the k-th score"
    assert_fused_matches_reference(q.to(DEVICE), k.to(DEVICE), topk, scale=0.5)


def test_forward_statistics():
    q, k = make_inputs(1, 2, 1, 23, 23, 16)
    topk = 5
    lse_all, lse_top, thresh, tie_w, n_visible = regularizer_forward(q, k, None, topk, 0.25, True, 0)
    s = 0.25 * q.float() @ k.float().transpose(-1, -2)
    visible = torch.ones(23, 23, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~visible, float("-inf"))
    assert torch.equal(n_visible[0, 0].cpu(), torch.arange(1, 24, dtype=torch.int32))
    rows = slice(topk, None)  # rows with more than k visible keys
    torch.testing.assert_close(lse_all[..., rows], torch.logsumexp(s, -1)[..., rows])
    top = s.topk(topk, -1).values
    torch.testing.assert_close(thresh[..., rows], top[..., -1][..., rows])
    torch.testing.assert_close(lse_top[..., rows], torch.logsumexp(top, -1)[..., rows])
    torch.testing.assert_close(tie_w[..., rows], torch.ones_like(tie_w[..., rows]))


def test_float16_inputs():
    q, k = make_inputs(1, 2, 1, 29, 29, 16, dtype=torch.float16)
    _, fused = assert_fused_matches_reference(q, k, 4, grad_tol=4e-3)
    assert fused[1].dtype == torch.float16


def test_strided_inputs_as_hugging_face_passes_them():
    # [B, L, H, D] projections viewed as [B, H, L, D]: no dimension but D is contiguous.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 27, 4, 16, generator=gen).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 27, 2, 16, generator=gen).to(DEVICE).transpose(1, 2)
    assert not q.is_contiguous()
    assert_fused_matches_reference(q, k, 4)


def test_no_regularized_row_gives_zero_and_zero_gradient():
    q, k = make_inputs(1, 2, 1, 10, 10, 16)
    loss, dq, dk = run(q, k, 10, "triton")
    assert loss.item() == 0.0
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))


def test_terms_count_rows_and_mass():
    q, k = make_inputs(1, 2, 1, 20, 20, 16)
    mask = make_mask("random-per-head", 1, 2, 20, 20)
    fused = regularizer_terms(q, k, 3, attn_mask=mask, backend="triton")
    ref = regularizer_terms(q, k, 3, attn_mask=mask, backend="reference")
    assert fused.rows.item() == ref.rows.item() > 0
    assert fused.mass_sum.item() == pytest.approx(ref.mass_sum.item(), rel=1e-5)
    assert not fused.mass_sum.requires_grad


def test_launcher_rejects_unsupported_calls():
    q, k = make_inputs(1, 2, 1, 8, 8, 16)
    with pytest.raises(ValueError, match="exceeds the fused regularizer's maximum"):
        regularizer_forward(q, k, None, config.REGULARIZER_MAX_K + 1, 0.25, True, 0)
    with pytest.raises(ValueError, match="not supported by the fused regularizer"):
        regularizer_forward(q.double(), k.double(), None, 2, 0.25, True, 0)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        regularizer_forward(q, k, None, 0, 0.25, True, 0)
    with pytest.raises(ValueError, match="boolean"):
        regularizer_forward(q, k, torch.ones(1, 2, 8, 8, device=q.device), 2, 0.25, True, 0)


# ---- GPU only -----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["logmass", "mass"])
@pytest.mark.parametrize(
    ("lq", "topk", "mask_kind"),
    [(257, 16, "none"), (1000, 64, "padding"), (513, 128, "random-per-head")],
    ids=["L257-k16", "L1000-k64-padding", "L513-k128-mask"],
)
def test_gpu_bfloat16(lq, topk, mask_kind, kind):
    q, k = make_inputs(2, 8, 2, lq, lq, 64, dtype=torch.bfloat16, spread=2.0)
    mask = make_mask(mask_kind, 2, 8, lq, lq)
    # bf16 gradients carry 8 bits of mantissa and the P̂ term is cast to bf16 before the dot products.
    assert_fused_matches_reference(q, k, topk, attn_mask=mask, kind=kind, value_tol=1e-4, grad_tol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "lq", "topk", "d"),
    [(torch.float32, 4096, 128, 64), (torch.float16, 4096, 64, 128), (torch.bfloat16, 8192, 32, 64)],
    ids=["fp32-L4096-k128-D64", "fp16-L4096-k64-D128", "bf16-L8192-k32-D64"],
)
def test_gpu_long_rows(dtype, lq, topk, d):
    q, k = make_inputs(1, 4, 2, lq, lq, d, dtype=dtype, spread=2.0)
    grad_tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert_fused_matches_reference(q, k, topk, value_tol=1e-4, grad_tol=grad_tol)


@pytest.mark.gpu
def test_gpu_auto_uses_the_kernel_and_falls_back_once_for_large_k(monkeypatch):
    import sparse_attention.regularizer as regularizer

    q, k = make_inputs(1, 2, 1, 300, 300, 64, dtype=torch.bfloat16)
    q.requires_grad_(True)
    fused = regularizer_terms(q, k, 8)
    assert type(fused.loss_sum.grad_fn).__name__ == "TopkRegularizerFunctionBackward"
    monkeypatch.setattr(regularizer, "_warned_fallback", False)
    big_k = config.REGULARIZER_MAX_K + 1
    with pytest.warns(UserWarning, match="falls back to the reference"):
        ref = regularizer_terms(q, k, big_k)
    assert type(ref.loss_sum.grad_fn).__name__ != "TopkRegularizerFunctionBackward"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regularizer_terms(q, k, big_k)
