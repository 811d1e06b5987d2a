"""Bad input raises TypeError/ValueError naming the argument (issue 2, "Bad input")."""

import pytest
import torch

from sparse_attention.validation import head_table, prepare_call


def _qkv(b=1, hq=4, hkv=2, lq=3, lk=5, d=16, dtype=torch.float32):
    return (
        torch.randn(b, hq, lq, d, dtype=dtype),
        torch.randn(b, hkv, lk, d, dtype=dtype),
        torch.randn(b, hkv, lk, d, dtype=dtype),
    )


BAD = [
    pytest.param(lambda q, k, v: ((q[0], k, v), {}), ValueError, "query must have rank 4", id="query-rank"),
    pytest.param(lambda q, k, v: ((q, k[0], v), {}), ValueError, "key must have rank 4", id="key-rank"),
    pytest.param(lambda q, k, v: ((q, k, v[..., :8]), {}), ValueError, "value", id="value-headdim"),
    pytest.param(lambda q, k, v: ((q, k, v[:, :, :4]), {}), ValueError, "value shape", id="value-length"),
    pytest.param(lambda q, k, v: ((q[:, :3], k, v), {}), ValueError, "multiple of key/value heads", id="gqa-heads"),
    pytest.param(lambda q, k, v: ((q, k.half(), v), {}), TypeError, "key has dtype", id="key-dtype"),
    pytest.param(lambda q, k, v: ((q, k, v.half()), {}), TypeError, "value has dtype", id="value-dtype"),
    pytest.param(lambda q, k, v: ((q.long(), k, v), {}), TypeError, "query must be a floating", id="int-query"),
    pytest.param(lambda q, k, v: (([1.0], k, v), {}), TypeError, "query must be a torch.Tensor", id="list-query"),
    pytest.param(lambda q, k, v: ((q, k[..., :8], v), {}), ValueError, "key head dim", id="key-headdim"),
    pytest.param(lambda q, k, v: ((q, torch.cat([k, k]), v), {}), ValueError, "batch size", id="batch"),
    pytest.param(lambda q, k, v: ((q, k, v), {"placement": "mid"}), ValueError, "placement", id="placement"),
    pytest.param(lambda q, k, v: ((q, k, v), {"sdc": "magic"}), ValueError, "sdc must be", id="sdc"),
    pytest.param(lambda q, k, v: ((q, k, v), {"sdc": "calibrated"}), ValueError, "sdc_table", id="sdc-table-missing"),
    pytest.param(
        lambda q, k, v: ((q, k, v), {"sdc_table": torch.ones(4, 2)}), ValueError, "only used", id="sdc-table-unused"
    ),
    pytest.param(lambda q, k, v: ((q, k, v), {"placement": "post", "sdc": "none"}), ValueError, "post", id="post-sdc"),
    pytest.param(lambda q, k, v: ((q, k, v, torch.ones(3)), {}), ValueError, "theta has 3", id="theta-heads"),
    pytest.param(lambda q, k, v: ((q, k, v, torch.ones(3, 7)), {}), ValueError, "theta has 3", id="theta-heads-2d"),
    pytest.param(lambda q, k, v: ((q, k, v, torch.ones(4, 0)), {}), ValueError, "at least one", id="theta-empty"),
    pytest.param(lambda q, k, v: ((q, k, v, torch.ones(4, 2, 2)), {}), ValueError, "theta must be", id="theta-rank"),
    pytest.param(lambda q, k, v: ((q, k, v, float("nan")), {}), ValueError, "NaN", id="theta-nan"),
    pytest.param(lambda q, k, v: ((q, k, v), {"k_dense": -1}), ValueError, "k_dense", id="k-dense"),
    pytest.param(lambda q, k, v: ((q, k, v), {"scale": float("inf")}), ValueError, "scale", id="scale"),
    pytest.param(lambda q, k, v: ((q, k, v), {"q_offset": 1.5}), ValueError, "q_offset", id="q-offset"),
    pytest.param(
        lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(1, 1, 3, 5)}), TypeError, "torch.bool", id="float-mask"
    ),
    pytest.param(
        lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(2, 1, 3, 5, dtype=torch.bool)}),
        ValueError,
        "does not broadcast",
        id="mask-shape",
    ),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_bad_input_names_the_argument(make, exc, match):
    args, kwargs = make(*_qkv())
    with pytest.raises(exc, match=match):
        prepare_call(*args, **kwargs)


def test_defaults_are_resolved():
    q, k, v = _qkv()
    call = prepare_call(q, k, v, 0.5)
    assert call.scale == pytest.approx(16**-0.5)
    assert call.q_offset == 2
    assert call.theta.shape == (4, 1) and call.theta.dtype == torch.float32
    assert call.groups == 2


def test_tables_broadcast():
    assert torch.equal(head_table("theta", 0.25, 3, torch.device("cpu")), torch.full((3, 1), 0.25))
    t = head_table("theta", torch.tensor([1.0, 2.0]), 2, torch.device("cpu"))
    assert torch.equal(t, torch.tensor([[1.0], [2.0]]))
    t = head_table("theta", torch.arange(5.0)[None], 3, torch.device("cpu"))
    assert t.shape == (3, 5) and torch.equal(t[2], torch.arange(5.0))


def test_mask_views_are_broadcast_not_copied():
    q, k, v = _qkv()
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    call = prepare_call(q, k, v, attn_mask=mask)
    assert call.attn_mask.shape == (1, 4, 3, 5)
    assert call.attn_mask.stride()[1:3] == (0, 0)
