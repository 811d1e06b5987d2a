"""Tests of the fused condensation-regularizer kernels (kernels/regularizer.py) against the float64 oracle.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors in float32 and
float16; bfloat16, long rows and the wide buffers (k = 64, 128) run on a GPU only. Expected values come from
``sa_testing.oracle_regularizer`` (float64, row by row); the tolerance is the project's rule: at most twice the error
PyTorch makes in the same precision against float64 (``torch_regularizer`` below, the same loss written with dense
PyTorch ops), plus a few units in the last place. The GPU tests compare against ``torch_regularizer`` in float64, which
``test_dense_float64_reference_is_the_oracle`` checks against the oracle.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from sa_testing import oracle_regularizer
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_attention.kernels import config
from sparse_attention.kernels import regularizer as reg

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")


# ---- inputs and normalised arguments --------------------------------------------------------------------------------


def make_inputs(b, hq, hkv, lq, lk, d, dtype=torch.float32, spread=1.5, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, lq, d, generator=gen) * spread).to(device, dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen).to(device, dtype)
    return q, k


def key_padding_args(key_mask: torch.Tensor):
    """``(mask [B, Lk] bool, prefix [B, Lk + 1] int32, bounds [B, 2] int32)`` as the caller computes them."""
    b, lk = key_mask.shape
    prefix = torch.zeros(b, lk + 1, dtype=torch.int32, device=key_mask.device)
    prefix[:, 1:] = key_mask.cumsum(-1)
    pos = torch.arange(lk, device=key_mask.device)
    first = torch.where(key_mask, pos, lk).min(-1).values
    last = torch.where(key_mask, pos + 1, 0).max(-1).values
    bounds = torch.stack([torch.where(last > 0, first, 0), last], -1).to(torch.int32)
    return key_mask, prefix, bounds


def left_padding(lengths, lk, device=DEVICE):
    """``[B, Lk]``: batch b attends to its last ``lengths[b]`` keys (HF left padding)."""
    pos = torch.arange(lk)
    return torch.stack([pos >= lk - n for n in lengths]).to(device)


@dataclass
class Case:
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int
    k: int
    kind: str = "logmass"
    causal: bool = True
    q_offset: int | None = None  # None: Lk - Lq
    mask: str = "none"  # none | padding | holes (key_padding) | general | broadcast | empty-rows (attn_mask)
    softcap: float = 0.0
    sinks: bool = False
    dtype: torch.dtype = torch.float32
    scale: float | None = None

    @property
    def id(self):
        parts = [f"B{self.b}", f"Hq{self.hq}", f"Hkv{self.hkv}"]
        parts += [f"L{self.lq}"] if self.lq == self.lk else [f"Lq{self.lq}", f"Lk{self.lk}"]
        parts += [f"D{self.d}", f"k{self.k}", "causal" if self.causal else "full"]
        if self.q_offset is not None:
            parts.append(f"qoff{self.q_offset}")
        if self.mask != "none":
            parts.append(self.mask)
        if self.softcap:
            parts.append(f"softcap{self.softcap:g}")
        if self.sinks:
            parts.append("sinks")
        parts += [self.kind, {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]]
        return "-".join(parts)

    def args(self, device=DEVICE, seed=0):
        """``(q, k, sinks, kw, oracle_mask)``: inputs, the launchers' normalised keywords and the oracle's mask."""
        q, k = make_inputs(self.b, self.hq, self.hkv, self.lq, self.lk, self.d, self.dtype, seed=seed, device=device)
        gen = torch.Generator().manual_seed(seed + 1)
        sinks = (torch.randn(self.hq, generator=gen) * 2).to(device) if self.sinks else None
        attn_mask, key_padding, oracle_mask = None, None, None
        b, hq, lq, lk = self.b, self.hq, self.lq, self.lk
        if self.mask in ("padding", "holes"):
            lengths = [lk - (5 * i * lk) // (4 * b + 1) for i in range(b)]
            key_mask = left_padding(lengths, lk, device)
            if self.mask == "holes":  # keys inside the bounds that nobody attends to
                key_mask[:, lk // 2 : lk // 2 + 3] = False
            key_padding = key_padding_args(key_mask)
            oracle_mask = key_mask[:, None, None, :]
        elif self.mask == "general":  # random per head, row and key
            oracle_mask = (torch.rand(b, hq, lq, lk, generator=gen) > 0.3).to(device)
            attn_mask = oracle_mask
        elif self.mask == "broadcast":  # key padding given as a general [B, 1, 1, Lk] mask
            lengths = [lk - 7 * i for i in range(b)]
            oracle_mask = left_padding(lengths, lk, device)[:, None, None, :]
            attn_mask = oracle_mask.expand(b, hq, lq, lk)
        elif self.mask == "empty-rows":
            oracle_mask = torch.ones(b, 1, lq, lk, dtype=torch.bool, device=device)
            oracle_mask[0, :, lq // 2 :] = False
            attn_mask = oracle_mask.expand(b, hq, lq, lk)
        kw = dict(
            attn_mask=attn_mask, key_padding=key_padding, k=self.k,
            sm_scale=self.d**-0.5 if self.scale is None else self.scale, softcap=self.softcap, causal=self.causal,
            q_offset=lk - lq if self.q_offset is None else self.q_offset,
        )  # fmt: skip
        return q, k, sinks, kw, oracle_mask


# ---- running the kernels and the references -----------------------------------------------------------------------


def run_kernel(q, k, sinks, kw, kind):
    """``(loss, dq, dk, mass, dsinks, rows)`` of the kernels, as the mean over regularized rows (the oracle's form)."""
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    leaves = [q, k]
    if sinks is not None:
        sinks = sinks.detach().clone().requires_grad_(True)
        leaves.append(sinks)
    loss_sum, mass_sum, rows = reg.TopkRegularizerFunction.apply(
        q, k, sinks, kw["attn_mask"], kw["key_padding"], kw["k"], kw["sm_scale"], kw["softcap"], kw["causal"],
        kw["q_offset"], kind,
    )  # fmt: skip
    n = rows.clamp_min(1.0)
    grads = torch.autograd.grad(loss_sum / n, leaves, allow_unused=True)
    dsinks = grads[2] if sinks is not None else None
    return (loss_sum / n).detach(), grads[0], grads[1], (mass_sum / n).item(), dsinks, rows.item()


def torch_regularizer(q, k, sinks, kw, kind, mask=None, compute_dtype=None):
    """The regularizer with dense PyTorch ops: scores by a matmul in ``compute_dtype`` (default the inputs' own, the
    precision PyTorch gives a user), everything after in float32 (float64 when ``compute_dtype`` is float64).
    Returns ``(loss, dq, dk, mass, dsinks)`` like the oracle."""
    compute_dtype = q.dtype if compute_dtype is None else compute_dtype
    acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
    qq = q.detach().to(compute_dtype).requires_grad_(True)
    kk = k.detach().to(compute_dtype).requires_grad_(True)
    ss = None if sinks is None else sinks.detach().to(acc).requires_grad_(True)
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    s = (qq @ kk.repeat_interleave(hq // hkv, 1).transpose(-1, -2)).to(acc) * kw["sm_scale"]
    if kw["softcap"]:
        s = kw["softcap"] * torch.tanh(s / kw["softcap"])
    vis = torch.ones(b, hq, lq, lk, dtype=torch.bool, device=q.device)
    if kw["causal"]:
        rows = torch.arange(lq, device=q.device)[:, None] + kw["q_offset"]
        vis = vis & (torch.arange(lk, device=q.device)[None, :] <= rows)
    if mask is not None:
        vis = vis & mask.to(q.device)
    n = vis.sum(-1)
    regularized = n > kw["k"]
    s = s.masked_fill(~vis, float("-inf"))
    if ss is not None:
        s = torch.cat([s, ss.view(1, hq, 1, 1).expand(b, hq, lq, 1)], -1)
    # Rows that are not regularized get a finite softmax (their terms are dropped below).
    s = torch.where(regularized[..., None], s, 0.0)
    p = torch.softmax(s, -1)
    with torch.no_grad():
        scores = s[..., :lk]
        t = scores.topk(min(kw["k"], lk), -1).values[..., -1:] if lk else scores[..., :0]
        above, tied = scores > t, scores == t
        w = above.to(acc) + tied.to(acc) * (kw["k"] - above.sum(-1, keepdim=True)) / tied.sum(-1, keepdim=True)
        if ss is not None:
            w = torch.cat([w, torch.ones_like(w[..., :1])], -1)
    mass = (w * p).sum(-1)
    per_row = -torch.log(mass) if kind == "logmass" else 1.0 - mass
    count = max(1, int(regularized.sum()))
    loss = torch.where(regularized, per_row, 0.0).sum() / count
    leaves = [qq, kk] + ([ss] if ss is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    mean_mass = float(torch.where(regularized, mass.detach(), 0.0).sum() / count)
    return float(loss.detach()), grads[0], grads[1], mean_mass, (grads[2] if ss is not None else None)


def oracle(q, k, sinks, kw, kind, mask):
    return oracle_regularizer(
        q, k, kw["k"], scale=kw["sm_scale"], softcap=kw["softcap"] or None, causal=kw["causal"],
        q_offset=kw["q_offset"], mask=mask, sinks=sinks, kind=kind,
    )  # fmt: skip


def _error(got, want) -> float:
    if isinstance(want, torch.Tensor):
        return float((got.detach().double().cpu() - want.detach().double().cpu()).abs().max()) if want.numel() else 0.0
    return abs(float(got) - float(want))


def _magnitude(want) -> float:
    if isinstance(want, torch.Tensor):
        return float(want.detach().double().abs().max()) if want.numel() else 0.0
    return abs(float(want))


def assert_matches(got, want, comparator, dtype, what):
    """``got`` (kernel) within ``2 · |comparator - want| + 4 · eps · |want|`` of ``want`` (float64), as max norms."""
    names = ("loss", "dq", "dk", "mass", "dsinks")
    eps = torch.finfo(dtype).eps
    for name, g, w, c in zip(names, got, want, comparator, strict=True):
        if w is None:
            assert g is None, f"{what}: {name} should be None"
            continue
        if isinstance(g, torch.Tensor):
            assert not torch.isnan(g).any(), f"{what}: NaN in {name}"
        err = _error(g, w)
        tol = 2.0 * _error(c, w) + 4.0 * eps * _magnitude(w)
        assert err <= tol, f"{what}: {name} max abs error {err:.3e} exceeds tolerance {tol:.3e}"


class _NaNFilled:
    """Stands in for ``torch`` inside kernels/regularizer.py: its outputs start as NaN (ints as -7), so that an
    element a kernel does not write cannot pass."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*shape, dtype=None, device=None):
        fill = NAN if dtype is None or dtype.is_floating_point else -7
        return torch.full(shape, fill, dtype=dtype, device=device)

    @staticmethod
    def empty_like(t):
        return torch.full_like(t, NAN)


@pytest.fixture
def nan_outputs(monkeypatch):
    monkeypatch.setattr(reg, "torch", _NaNFilled())


def check_case(case: Case, seed=0):
    q, k, sinks, kw, mask = case.args(seed=seed)
    got = run_kernel(q, k, sinks, kw, case.kind)
    want = oracle(q, k, sinks, kw, case.kind, mask)
    comparator = torch_regularizer(q, k, sinks, kw, case.kind, mask)
    assert_matches(got[:5], want, comparator, case.dtype, case.id)
    return got, want


# ---- against the oracle ---------------------------------------------------------------------------------------------


CASES = [
    Case(2, 4, 2, 37, 37, 16, 4),  # GQA, 3 x 3 tiles per row block
    Case(1, 2, 1, 37, 37, 16, 4, kind="mass"),
    Case(1, 2, 1, 19, 45, 16, 5),  # Lq != Lk, bottom-right aligned
    Case(1, 2, 2, 24, 30, 16, 3, q_offset=-3, kind="mass"),  # the first rows see nothing
    Case(1, 2, 1, 20, 26, 24, 4, q_offset=13),  # q_offset > Lk - Lq; D = 24 is padded to 32
    Case(3, 2, 1, 33, 33, 16, 3, mask="padding"),  # left padding: whole and partial padded tiles
    Case(2, 2, 1, 21, 40, 16, 4, mask="holes", kind="mass"),  # key padding with unattended keys inside the bounds
    Case(2, 2, 2, 20, 38, 16, 3, causal=False, mask="padding"),
    Case(1, 3, 1, 21, 29, 16, 3, causal=False, mask="general"),
    Case(1, 2, 1, 26, 26, 16, 4, mask="general", kind="mass"),
    Case(2, 2, 1, 25, 25, 16, 2, mask="broadcast"),  # a [B, 1, 1, Lk] general mask: the slow path
    Case(2, 2, 1, 26, 26, 16, 1, mask="empty-rows"),
    Case(1, 2, 2, 40, 40, 16, 20),  # k > 16 widens BLOCK_N to 32
    Case(1, 4, 2, 30, 30, 16, 4, softcap=4.0, sinks=True),
    Case(1, 2, 1, 30, 30, 16, 4, softcap=3.0, kind="mass", mask="padding"),
    Case(2, 2, 1, 28, 28, 16, 3, sinks=True, kind="mass", mask="padding"),
    Case(1, 2, 1, 29, 29, 16, 4, dtype=torch.float16),
    Case(1, 2, 1, 23, 31, 16, 3, dtype=torch.float16, kind="mass", softcap=5.0, sinks=True, mask="padding"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_oracle(case, nan_outputs):
    got, want = check_case(case)
    assert want[0] > 0.0, "every case has regularized rows"
    assert got[1].dtype == case.dtype and got[2].dtype == case.dtype


def test_dense_float64_reference_is_the_oracle():
    # The GPU tests compare against torch_regularizer in float64; it must agree with the row-by-row oracle.
    for case in (CASES[0], CASES[13], CASES[15], CASES[9]):
        q, k, sinks, kw, mask = case.args(device="cpu")
        dense = torch_regularizer(q, k, sinks, kw, case.kind, mask, compute_dtype=torch.float64)
        want = oracle(q, k, sinks, kw, case.kind, mask)
        for name, g, w in zip(("loss", "dq", "dk", "mass", "dsinks"), dense, want, strict=True):
            if w is not None:
                assert _error(g, w) <= 1e-12 * max(1.0, _magnitude(w)), f"{case.id}: {name}"


def test_forward_statistics(nan_outputs):
    case = Case(1, 2, 1, 23, 23, 16, 5, sinks=True)
    q, k, sinks, kw, _ = case.args()
    stats = reg.regularizer_forward(q, k, sinks=sinks, **kw)
    s = kw["sm_scale"] * q.double() @ k.double().transpose(-1, -2)
    s = s.masked_fill(~torch.ones(23, 23, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    assert torch.equal(stats.n_visible[0, 0].cpu(), torch.arange(1, 24, dtype=torch.int32))
    rows = slice(case.k, None)  # rows with more than k visible keys
    with_sink = torch.cat([s, sinks.double().view(1, 2, 1, 1).expand(1, 2, 23, 1)], -1)
    lse = torch.logsumexp(with_sink, -1)
    top = s.topk(case.k, -1).values
    mass = torch.exp(top - lse[..., None]).sum(-1) + torch.exp(sinks.double().view(1, 2, 1) - lse)
    torch.testing.assert_close(stats.lse_all[..., rows].double(), lse[..., rows], rtol=0, atol=1e-5)
    torch.testing.assert_close(stats.mass[..., rows].double(), mass[..., rows], rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.thresh[..., rows].double(), top[..., -1][..., rows], rtol=0, atol=1e-5)
    assert torch.equal(stats.tie_w[..., rows].cpu(), torch.ones(1, 2, 23 - case.k))


def _ties_including_dropped_ones(topk, kind, dtype):
    # Exact integer scores with three distinct values: far more keys tie at the k-th score than the slots of the
    # running buffer (its tile width), so the count of ties that fell off the buffer decides the tie weight.
    block_n = reg.tiles(topk, 16, dtype)[1]
    length = max(45, 2 * block_n + 13)  # more keys than the buffer holds, on the interpreter's tiles and a GPU's
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-1, 2, (1, 2, length, 16), generator=gen).float()
    k = torch.randint(-1, 2, (1, 1, length, 16), generator=gen).float()
    q[..., 1:] = 0
    q, k = q.to(DEVICE, dtype), k.to(DEVICE, dtype)
    kw = dict(attn_mask=None, key_padding=None, k=topk, sm_scale=0.5, softcap=0.0, causal=True, q_offset=0)
    stats = reg.regularizer_forward(q, k, **kw)
    s = 0.5 * q.float() @ k.float().transpose(-1, -2)
    tied = (s == stats.thresh[..., None]) & torch.ones(length, length, dtype=torch.bool, device=DEVICE).tril()
    regularized = stats.n_visible > topk
    assert ((stats.tie_w < 1) & regularized).any(), "the inputs must tie at the k-th score"
    assert (tied.sum(-1)[regularized] > block_n).any(), "some ties must have fallen off the buffer"
    got = run_kernel(q, k, None, kw, kind)
    want = oracle(q, k, None, kw, kind, None)
    assert_matches(got[:5], want, torch_regularizer(q, k, None, kw, kind), q.dtype, f"ties-k{topk}-{kind}")


@pytest.mark.parametrize("kind", ["logmass", "mass"])
@pytest.mark.parametrize("topk", [3, 20])
def test_ties_including_dropped_ones(topk, kind):
    _ties_including_dropped_ones(topk, kind, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("topk", [3, 100], ids=["k3", "k100"])
def test_gpu_ties_including_dropped_ones(topk):
    # integer scores are exact in float16 too; k = 100 runs the 128-wide buffer
    _ties_including_dropped_ones(topk, "logmass", torch.float16)


def test_score_offset_of_1000_fp32():
    # Decision 6: a common offset of the scores (here +1000 through an extra dimension) must not cost precision the
    # float32 PyTorch computation keeps; the softmax is the same as without it.
    q, k = make_inputs(1, 2, 1, 30, 30, 16)
    q[..., -1] = 40.0
    k[..., -1] = 100.0  # 40 · 100 · 0.25 = 1000
    kw = dict(attn_mask=None, key_padding=None, k=4, sm_scale=0.25, softcap=0.0, causal=True, q_offset=0)
    got = run_kernel(q, k, None, kw, "logmass")
    want = oracle(q, k, None, kw, "logmass", None)
    assert_matches(got[:5], want, torch_regularizer(q, k, None, kw, "logmass"), q.dtype, "offset-1000")


def test_strided_inputs_as_hugging_face_passes_them():
    # [B, L, H, D] projections viewed as [B, H, L, D]: no dimension but D is contiguous.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 27, 4, 16, generator=gen).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 27, 2, 16, generator=gen).to(DEVICE).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    kw = dict(attn_mask=None, key_padding=None, k=4, sm_scale=0.25, softcap=0.0, causal=True, q_offset=0)
    got = run_kernel(q, k, None, kw, "logmass")
    assert_matches(got[:5], oracle(q, k, None, kw, "logmass", None), torch_regularizer(q, k, None, kw, "logmass"),
                   q.dtype, "strided")  # fmt: skip
    assert got[1].stride() == q.stride() and got[2].stride() == k.stride()


@pytest.mark.parametrize("with_sinks", [False, True], ids=["plain", "sinks"])
def test_no_regularized_row_gives_zero_and_zero_gradients(with_sinks):
    q, k, sinks, kw, _ = Case(1, 2, 1, 10, 10, 16, 10, sinks=with_sinks).args()
    loss, dq, dk, _, dsinks, rows = run_kernel(q, k, sinks, kw, "logmass")
    assert loss.item() == 0.0 and rows == 0.0
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))
    if with_sinks:
        assert torch.equal(dsinks, torch.zeros_like(dsinks))


@pytest.mark.parametrize(("lq", "lk"), [(12, 0), (0, 12)], ids=["Lk0", "Lq0"])
def test_empty_sequences_give_zeros(lq, lk):
    q, k = make_inputs(1, 2, 1, lq, lk, 16)
    kw = dict(attn_mask=None, key_padding=None, k=2, sm_scale=0.25, softcap=0.0, causal=True, q_offset=lk - lq)
    loss, dq, dk, _, _, rows = run_kernel(q, k, None, kw, "logmass")
    assert loss.item() == 0.0 and rows == 0.0
    assert dq.shape == q.shape and dk.shape == k.shape
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))


def test_nan_in_a_visible_key_makes_the_loss_nan():
    q, k = make_inputs(1, 2, 1, 20, 20, 16)
    k[0, 0, 3, 5] = NAN
    kw = dict(attn_mask=None, key_padding=None, k=2, sm_scale=0.25, softcap=0.0, causal=True, q_offset=0)
    assert math.isnan(run_kernel(q, k, None, kw, "logmass")[0].item())


class _NoHostSync(TorchDispatchMode):
    """Fails on every op that copies a device value to the host (``.item()``, ``bool(t)``, ``nonzero``, ...)."""

    SYNCING = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::equal"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            raise AssertionError(f"host synchronisation: {func._schema.name}")
        return func(*args, **(kwargs or {}))


def test_forward_and_backward_make_no_host_sync():
    case = Case(2, 2, 1, 20, 20, 16, 3, mask="padding", sinks=True, softcap=5.0)
    q, k, sinks, kw, _ = case.args()
    q.requires_grad_(True)
    sinks.requires_grad_(True)
    with _NoHostSync():
        loss_sum, mass_sum, rows = reg.TopkRegularizerFunction.apply(
            q, k, sinks, None, kw["key_padding"], kw["k"], kw["sm_scale"], kw["softcap"], True, kw["q_offset"],
            "logmass",
        )  # fmt: skip
        loss_sum.backward()
    assert q.grad is not None and sinks.grad is not None and rows.item() > 0


# ---- tiles walked ---------------------------------------------------------------------------------------------------


def _visible(case_kw, b, hq, lq, lk, key_mask, device):
    vis = torch.ones(b, hq, lq, lk, dtype=torch.bool, device=device)
    if case_kw["causal"]:
        vis = vis & (torch.arange(lk, device=device)[None, :] <= torch.arange(lq, device=device)[:, None]
                     + case_kw["q_offset"])  # fmt: skip
    if key_mask is not None:
        vis = vis & key_mask[:, None, None, :]
    return vis


WALK_CASES = [
    Case(3, 2, 1, 37, 37, 16, 3, mask="padding"),
    Case(2, 4, 2, 21, 50, 16, 3, mask="padding", q_offset=10),
    Case(1, 2, 1, 40, 40, 16, 3),
]


@pytest.mark.parametrize("case", WALK_CASES, ids=lambda c: c.id)
def test_walks_only_tiles_with_visible_keys(case):
    """Each program walks exactly the tiles that hold a visible (row, key) pair: for the forward and dQ the key tiles
    of its query tile, for dK the query tiles (of every head of the group) of its key tile."""
    q, k, _, kw, _ = case.args()
    key_mask = None if kw["key_padding"] is None else kw["key_padding"][0]
    block_m, block_n, _, _ = reg.tiles(case.k, case.d, q.dtype)
    vis = _visible(kw, case.b, case.hq, case.lq, case.lk, key_mask, q.device)
    tm, tn = -(-case.lq // block_m), -(-case.lk // block_n)
    padded = torch.zeros(case.b, case.hq, tm * block_m, tn * block_n, dtype=torch.bool, device=q.device)
    padded[..., : case.lq, : case.lk] = vis
    pairs = padded.view(case.b, case.hq, tm, block_m, tn, block_n).any(5).any(3)  # [B, Hq, tiles_m, tiles_n]
    stats = reg.regularizer_forward(q, k, **kw, count_tiles=True)
    grad_rows = torch.ones(case.b, case.hq, case.lq, device=q.device)
    _, _, _, (walked_q, walked_k) = reg.regularizer_backward(q, k, stats, grad_rows, **kw, count_tiles=True)
    want_q = pairs.sum(-1).permute(2, 0, 1).reshape(tm, case.b * case.hq).to(torch.int32)
    g = case.hq // case.hkv
    want_k = pairs.view(case.b, case.hkv, g, tm, tn).sum((2, 3)).permute(2, 0, 1).reshape(tn, -1).to(torch.int32)
    assert torch.equal(stats.walked_tiles, want_q)
    assert torch.equal(walked_q, want_q)
    assert torch.equal(walked_k, want_k)
    assert int(want_q.sum()) < tm * tn * case.b * case.hq, "the case must have tiles to skip"


@pytest.mark.parametrize("kind", ["logmass", "mass"])
def test_nan_in_keys_no_row_sees_does_not_reach_the_result(kind):
    # Left padding (whole and partial tiles) and keys past the last row's diagonal (Lk > q_offset + Lq) hold NaN: no
    # row sees them, so neither the loss nor any gradient may change (dK of those keys is exactly zero).
    case = Case(3, 2, 1, 30, 45, 16, 3, mask="padding", q_offset=9, kind=kind, sinks=True)
    q, k, sinks, kw, _ = case.args()
    key_mask = kw["key_padding"][0]
    unseen = ~_visible(kw, case.b, case.hq, case.lq, case.lk, key_mask, q.device).any(2).any(1)  # [B, Lk]
    assert unseen[:, :16].all(1).any() and unseen[:, -6:].all(), "whole tiles and partial tiles must be unseen"
    poisoned = k.clone()
    poisoned.masked_fill_(unseen[:, None, :, None], NAN)
    clean = run_kernel(q, k, sinks, kw, kind)
    dirty = run_kernel(q, poisoned, sinks, kw, kind)
    for name, a, b in zip(("loss", "dq", "dk", "mass", "dsinks"), clean[:5], dirty[:5], strict=True):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), name
    assert torch.equal(dirty[2].masked_select(unseen[:, None, :, None]), torch.zeros(int(unseen.sum()) * 16))


# ---- what the kernels refuse ----------------------------------------------------------------------------------------


def test_refuses_k_above_the_maximum():
    q, k = make_inputs(1, 2, 1, 8, 8, 16)
    kw = dict(attn_mask=None, key_padding=None, sm_scale=0.25, causal=True, q_offset=0)
    with pytest.raises(ValueError, match="exceeds the fused regularizer's maximum"):
        reg.regularizer_forward(q, k, k=config.REGULARIZER_MAX_K + 1, **kw)


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's limit")
def test_refuses_bfloat16_under_the_interpreter():
    q, k = make_inputs(1, 2, 1, 8, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 does not run under TRITON_INTERPRET=1"):
        reg.regularizer_forward(q, k, k=2, sm_scale=0.25, causal=True, q_offset=0)


# ---- int64 offsets, judged from the compiled code -------------------------------------------------------------------

# Run in a fresh interpreter without TRITON_INTERPRET, so that the kernels are compilable JITFunctions: each launcher
# call is bound by Triton's own launch path with the CUDA backend (the specialisation a GPU launch gets) and lowered
# to TTIR for sm_90, which needs no GPU. Prints {kernel name: TTIR}.
_TTIR_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys, types
    kernels_dir = sys.argv[1]
    package = types.ModuleType("sparse_attention")
    package.__path__ = []
    sys.modules["sparse_attention"] = package
    spec = importlib.util.spec_from_file_location(
        "sparse_attention.kernels", kernels_dir + "/__init__.py", submodule_search_locations=[kernels_dir])
    sys.modules["sparse_attention.kernels"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["sparse_attention.kernels"])
    import torch, triton, triton.language as tl
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
    from sparse_attention.kernels import common, regularizer as reg

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    out = {}

    def to_ttir(fn, args, kwargs):
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        src = ASTSource(fn, signature, constexprs, attrs)
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        module = src.make_ir(target, options, backend.get_codegen_implementation(options),
                             backend.get_module_map(), context)
        stages = {}
        backend.add_stages(stages, options, src.language)
        return str(stages["ttir"](module, {}))

    def capture(self, *args, grid, warmup, **kwargs):
        out[f"{self.__name__}/{len(out)}"] = to_ttir(self, args, kwargs)

    JITFunction.run = capture
    common.unsupported_device = lambda device, kernel: None
    b, hq, hkv, lq, lk, d = 2, 4, 2, 64, 80, 64
    q = torch.zeros(b, lq, hq, d, dtype=torch.float16).transpose(1, 2)
    k = torch.zeros(b, lk, hkv, d, dtype=torch.float16).transpose(1, 2)
    key_mask = torch.ones(b, lk, dtype=torch.bool)
    padding = (key_mask, torch.zeros(b, lk + 1, dtype=torch.int32), torch.zeros(b, 2, dtype=torch.int32))
    general = torch.ones(b, 1, lq, lk, dtype=torch.bool).expand(b, hq, lq, lk)
    for kw in (dict(key_padding=padding, sinks=torch.zeros(hq), softcap=30.0), dict(attn_mask=general)):
        kw.update(k=16, sm_scale=0.125, causal=True, q_offset=lk - lq)
        stats = reg.regularizer_forward(q, k, **kw)
        stats = reg.RegularizerStats(*(torch.zeros(b, hq, lq) for _ in range(4)),
                                     torch.zeros(b, hq, lq, dtype=torch.int32), None)
        reg.regularizer_backward(q, k, stats, torch.zeros(b, hq, lq), **kw)

    @triton.jit
    def int32_offsets(X, Y, stride_xb):  # the negative control: an int32 batch offset
        off_b = tl.program_id(0)
        tl.store(Y + off_b, tl.load(X + off_b * stride_xb))

    x = torch.zeros(64)
    out["int32_offsets/control"] = to_ttir(int32_offsets, (x, x, 48), {})
    print(json.dumps(out))
    """
)


def int32_offset_problems(ttir: str) -> list[str]:
    """Lines of ``ttir`` that compute a batch, head, row or tile offset in int32: a scalar ``tt.addptr`` with an i32
    offset other than a constant, or a scalar i32 multiply by a stride or a sequence length (tensor offsets inside a
    tile are i32 by design)."""
    lines = [line.split(" loc(")[0].strip() for line in ttir.splitlines()]
    constants = {m.group(1) for code in lines if (m := re.match(r"(%\w+) = arith\.constant -?\d+ : i32$", code))}
    problems = []
    for code in lines:
        m = re.search(r"= tt\.addptr %\w+, (%\w+) : !tt\.ptr<[^>]*>, i32$", code)
        if m and m.group(1) not in constants:
            problems.append(code)
        if re.search(r"= arith\.muli .*%(stride_\w+|seqlen_\w+).* : i32$", code):
            problems.append(code)
    return problems


@pytest.fixture(scope="module")
def compiled_ttir(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia.compiler", reason="needs Triton's CUDA backend to lower to TTIR")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = tmp_path_factory.mktemp("ttir") / "regularizer_ttir.py"  # @triton.jit needs its source in a file
    script.write_text(_TTIR_SCRIPT)
    kernels_dir = str(Path(reg.__file__).parent)
    done = subprocess.run([sys.executable, str(script), kernels_dir], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_offsets_are_int64_in_the_compiled_kernels(compiled_ttir):
    control = compiled_ttir.pop("int32_offsets/control")
    assert int32_offset_problems(control), "the check must flag an int32 batch offset"
    names = {name.split("/")[0] for name in compiled_ttir}
    assert names == {"_regularizer_fwd_kernel", "_regularizer_bwd_dq_kernel", "_regularizer_bwd_dk_kernel"}
    for name, ttir in compiled_ttir.items():
        assert "tt.call" not in ttir, f"{name}: helpers must be inlined before the check"
        assert re.search(r"arith\.muli .* : i64", ttir), f"{name}: no int64 offset arithmetic at all"
        assert int32_offset_problems(ttir) == [], f"{name}: int32 offsets"


# ---- GPU only -------------------------------------------------------------------------------------------------------


def check_against_float64(case: Case, seed=0):
    """Kernel against ``torch_regularizer`` in float64 (the oracle is too slow for long rows)."""
    q, k, sinks, kw, mask = case.args(seed=seed)
    got = run_kernel(q, k, sinks, kw, case.kind)
    want = torch_regularizer(q, k, sinks, kw, case.kind, mask, compute_dtype=torch.float64)
    comparator = torch_regularizer(q, k, sinks, kw, case.kind, mask)
    assert_matches(got[:5], want, comparator, case.dtype, case.id)


GPU_CASES = [
    Case(2, 8, 2, 257, 257, 64, 16, dtype=torch.bfloat16),
    Case(2, 8, 2, 1000, 1000, 64, 64, dtype=torch.bfloat16, mask="padding", kind="mass"),
    Case(2, 8, 2, 513, 513, 128, 128, dtype=torch.bfloat16, mask="general"),
    Case(2, 8, 4, 300, 700, 128, 64, dtype=torch.bfloat16, softcap=30.0, sinks=True, mask="padding"),
    Case(1, 4, 2, 2048, 2048, 64, 128, dtype=torch.float32),
    Case(1, 4, 2, 2048, 4096, 128, 64, dtype=torch.float16, kind="mass"),
    Case(1, 4, 2, 4096, 4096, 64, 32, dtype=torch.bfloat16, mask="padding"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_gpu_matches_float64(case):
    check_against_float64(case)


@pytest.mark.gpu
def test_gpu_nan_in_unseen_keys_leaves_the_result_unchanged():
    case = Case(2, 8, 2, 300, 600, 64, 64, dtype=torch.bfloat16, mask="padding", q_offset=200, sinks=True)
    q, k, sinks, kw, _ = case.args()
    unseen = ~_visible(kw, case.b, case.hq, case.lq, case.lk, kw["key_padding"][0], q.device).any(2).any(1)
    poisoned = k.clone().masked_fill_(unseen[:, None, :, None], NAN)
    clean = run_kernel(q, k, sinks, kw, case.kind)
    dirty = run_kernel(q, poisoned, sinks, kw, case.kind)
    for a, b in zip(clean[:5], dirty[:5], strict=True):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
