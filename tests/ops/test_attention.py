"""The functional API and its one backend picker (ops/attention.py)."""

import pytest
import torch
from sa_testing import make_qkv

import sparse_attention
from sparse_attention.kernels import config
from sparse_attention.ops import attention, reference


def test_public_names():
    for name in sparse_attention.__all__:
        assert hasattr(sparse_attention, name), name
    assert len(set(sparse_attention.__all__)) == len(sparse_attention.__all__)
    for name in ("top_theta_attention", "topk_attention", "TopThetaAttention", "load_default_model", "token_windows"):
        assert name in sparse_attention.__all__


def test_reference_backend_equals_reference_module():
    q, k, v = make_qkv(1, 4, 2, 5, 8, 16)
    a = sparse_attention.top_theta_attention(q, k, v, 0.1, backend="reference", sdc="threshold", vmc=True)
    b = reference.top_theta_attention(q, k, v, 0.1, sdc="threshold", vmc=True)
    assert torch.equal(a, b)


def test_unknown_backend():
    q, k, v = make_qkv(1, 2, 2, 3, 3, 16)
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_attention.top_theta_attention(q, k, v, backend="cuda")


def test_the_kernels_name_what_they_cannot_run():
    q, k, v = make_qkv(1, 2, 2, 3, 3, 16)
    assert "float64" in attention.unsupported_reason("prefill", q.double(), k.double(), v.double())
    q5, k5, v5 = make_qkv(1, 2, 2, 3, 3, 512)
    assert "head dim 512" in attention.unsupported_reason("prefill", q5, k5, v5)
    q8, k8, v8 = make_qkv(1, 2, 2, 3, 3, 8)
    assert "head dim 8" in attention.unsupported_reason("decode", q8, k8, v8)
    assert "value head dim 300" in attention.unsupported_reason("prefill", q, k, torch.zeros(1, 2, 3, 300))
    assert "k = 500" in attention.unsupported_reason("regularizer", q, k, k=500)


def test_bfloat16_is_refused_under_the_interpreter():
    # D3: the interpreter's bfloat16 tl.dot returns garbage, so backend="triton" must refuse it, not run it.
    if not config.INTERPRET:
        pytest.skip("only the interpreter refuses bfloat16")
    q, k, v = make_qkv(1, 2, 2, 3, 3, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 does not run under TRITON_INTERPRET=1"):
        sparse_attention.top_theta_attention(q, k, v, backend="triton")
    # "auto" on CPU is the reference, which is right in bfloat16
    out = sparse_attention.top_theta_attention(q, k, v)
    assert torch.equal(out, reference.top_theta_attention(q, k, v))


def test_triton_backend_refuses_unsupported_calls():
    q, k, v = make_qkv(1, 2, 2, 3, 3, 16)
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: .*float64"):
        sparse_attention.top_theta_attention(q.double(), k.double(), v.double(), backend="triton")


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(config, "INTERPRET", False)
    q, k, v = make_qkv(1, 2, 2, 3, 3, 16)
    assert "TRITON_INTERPRET=1" in attention.unsupported_reason("prefill", q, k, v)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sparse_attention.top_theta_attention(q, k, v, backend="triton")
    # "auto" uses the reference for CPU tensors: the same numbers as the reference.
    out = sparse_attention.top_theta_attention(q, k, v, 0.0, backend="auto")
    assert torch.equal(out, reference.top_theta_attention(q, k, v, 0.0))


def test_auto_policy():
    q, k, v = make_qkv(1, 2, 2, 3, 3, 16)
    # CPU tensors: the reference, silently, even under the interpreter.
    assert attention.pick_backend("auto", "prefill", q, k, v) == "reference"
    assert attention.pick_backend("reference", "prefill", q, k, v) == "reference"
    if config.INTERPRET:
        assert attention.pick_backend("triton", "prefill", q, k, v) == "triton"


def test_decode_and_prefill_are_chosen_by_query_rows():
    q, k, v = make_qkv(1, 2, 2, config.DECODE_MAX_Q, 9, 16)
    call = sparse_attention.ops.contract.prepare_call(q, k, v)
    assert attention.attention_op(call) == "decode"
    q, k, v = make_qkv(1, 2, 2, config.DECODE_MAX_Q + 1, 9, 16)
    assert attention.attention_op(sparse_attention.ops.contract.prepare_call(q, k, v)) == "prefill"


def test_return_stats_shapes():
    q, k, v = make_qkv(2, 4, 2, 1, 9, 16)
    out, stats = sparse_attention.top_theta_attention(q, k, v, 0.0, backend="reference", return_stats=True)
    assert stats.kept.shape == (2, 4, 1) and stats.visible.shape == (2, 4, 1)
    assert stats.kept_v_rows.shape == (2, 2)
    assert 0.0 < stats.kept_fraction < 1.0
