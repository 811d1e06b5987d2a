"""Backend selection of the public API."""

import pytest
import torch
from sa_testing import make_qkv

import sparse_attention
from sparse_attention import functional, reference
from sparse_attention.validation import prepare_call


def test_public_names():
    for name in sparse_attention.__all__:
        assert hasattr(sparse_attention, name), name
    assert "top_theta_attention" in sparse_attention.__all__ and "topk_attention" in sparse_attention.__all__


def test_reference_backend_equals_reference_module():
    q, k, v = make_qkv(1, 4, 2, 5, 8, 16)
    a = sparse_attention.top_theta_attention(q, k, v, 0.1, backend="reference", sdc="threshold", vmc=True)
    b = reference.top_theta_attention(q, k, v, 0.1, sdc="threshold", vmc=True)
    assert torch.equal(a, b)


def test_unknown_backend():
    q, k, v = make_qkv(1, 2, 2, 3, 3, 16)
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_attention.top_theta_attention(q, k, v, backend="cuda")


def test_triton_reasons():
    q, k, v = make_qkv(1, 2, 2, 3, 3, 16)
    call = prepare_call(q.double(), k.double(), v.double())
    assert "float64" in functional.triton_unsupported_reason(call)
    q, k, v = make_qkv(1, 2, 2, 3, 3, 512)
    assert "head dim 512" in functional.triton_unsupported_reason(prepare_call(q, k, v))
    q, k, v = make_qkv(1, 2, 2, 3, 3, 8)
    assert "head dim 8" in functional.triton_unsupported_reason(prepare_call(q, k, v))


def test_triton_backend_refuses_unsupported_calls():
    q, k, v = make_qkv(1, 2, 2, 3, 3, 16)
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        sparse_attention.top_theta_attention(q.double(), k.double(), v.double(), backend="triton")


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(1, 2, 2, 3, 3, 16)
    reason = functional.triton_unsupported_reason(prepare_call(q, k, v))
    assert "TRITON_INTERPRET=1" in reason
    # "auto" falls back to the reference for CPU tensors: same numbers as the reference.
    out = sparse_attention.top_theta_attention(q, k, v, 0.0, backend="auto")
    assert torch.equal(out, reference.top_theta_attention(q, k, v, 0.0))


def test_return_stats_shapes():
    q, k, v = make_qkv(2, 4, 2, 1, 9, 16)
    out, stats = sparse_attention.top_theta_attention(q, k, v, 0.0, backend="reference", return_stats=True)
    assert stats.kept.shape == (2, 4, 1) and stats.visible.shape == (2, 4, 1)
    assert stats.kept_v_rows.shape == (2, 2)
    assert 0.0 < stats.kept_fraction < 1.0
