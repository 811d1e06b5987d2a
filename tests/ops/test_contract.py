"""The one validation (ops/contract.py): bad input raises TypeError/ValueError naming the argument and the fix, and
the normalised call is what the backends rely on."""

import numpy as np
import pytest
import torch

from sparse_attention.ops.contract import IdentityCache, KeyPadding, head_table, prepare_call


def _qkv(b=1, hq=4, hkv=2, lq=3, lk=5, d=16, dv=None, dtype=torch.float32):
    return (
        torch.randn(b, hq, lq, d, dtype=dtype),
        torch.randn(b, hkv, lk, d, dtype=dtype),
        torch.randn(b, hkv, lk, d if dv is None else dv, dtype=dtype),
    )


def _bad(make, exc, match, id):
    return pytest.param(make, exc, match, id=id)


BAD = [
    _bad(lambda q, k, v: ((q[0], k, v), {}), ValueError, "query must have rank 4", "query-rank"),
    _bad(lambda q, k, v: ((q, k[0], v), {}), ValueError, "key must have rank 4", "key-rank"),
    _bad(lambda q, k, v: ((q, k, v[:, :, :4]), {}), ValueError, "value shape", "value-length"),
    _bad(lambda q, k, v: ((q[:, :3], k, v), {}), ValueError, "multiple of key/value heads", "gqa-heads"),
    _bad(lambda q, k, v: ((q, k.half(), v), {}), TypeError, "key has dtype", "key-dtype"),
    _bad(lambda q, k, v: ((q, k, v.half()), {}), TypeError, "value has dtype", "value-dtype"),
    _bad(lambda q, k, v: ((q.long(), k, v), {}), TypeError, "query must be a floating", "int-query"),
    _bad(lambda q, k, v: (([1.0], k, v), {}), TypeError, "query must be a torch.Tensor", "list-query"),
    _bad(lambda q, k, v: ((q, k[..., :8], v), {}), ValueError, "key head dim", "key-headdim"),
    _bad(lambda q, k, v: ((q, torch.cat([k, k]), v), {}), ValueError, "batch size", "batch"),
    # D2: head dim 0 used to raise a bare ZeroDivisionError from the default scale.
    _bad(lambda q, k, v: ((q[..., :0], k[..., :0], v), {}), ValueError, "query has head dim 0", "head-dim-0"),
    _bad(lambda q, k, v: ((q, k, v[..., :0]), {}), ValueError, "value has head dim 0", "value-head-dim-0"),
    _bad(lambda q, k, v: ((q.to("meta"), k.to("meta"), v.to("meta")), {}), ValueError, "meta tensor", "meta"),
    _bad(lambda q, k, v: ((q, k, v), {"placement": "mid"}), ValueError, "placement", "placement"),
    _bad(lambda q, k, v: ((q, k, v), {"sdc": "magic"}), ValueError, "sdc must be", "sdc"),
    _bad(lambda q, k, v: ((q, k, v), {"sdc": "calibrated"}), ValueError, "sdc_table", "sdc-table-missing"),
    _bad(lambda q, k, v: ((q, k, v), {"sdc_table": torch.ones(4, 2)}), ValueError, "only used", "sdc-table-unused"),
    _bad(lambda q, k, v: ((q, k, v), {"placement": "post", "sdc": "none"}), ValueError, "post", "post-sdc"),
    _bad(lambda q, k, v: ((q, k, v, torch.ones(3)), {}), ValueError, "theta has 3", "theta-heads"),
    _bad(lambda q, k, v: ((q, k, v, torch.ones(3, 7)), {}), ValueError, "theta has 3", "theta-heads-2d"),
    _bad(lambda q, k, v: ((q, k, v, torch.ones(4, 0)), {}), ValueError, "at least one", "theta-empty"),
    _bad(lambda q, k, v: ((q, k, v, torch.ones(4, 2, 2)), {}), ValueError, "theta must be", "theta-rank"),
    _bad(lambda q, k, v: ((q, k, v, float("nan")), {}), ValueError, "theta contains NaN", "theta-nan"),
    # D12: theta of the wrong kind.
    _bad(lambda q, k, v: ((q, k, v, "0.5"), {}), TypeError, "theta must be a number", "theta-string"),
    _bad(lambda q, k, v: ((q, k, v, [[1.0, 2.0], [3.0]]), {}), TypeError, "theta must be", "theta-ragged"),
    _bad(lambda q, k, v: ((q, k, v, 1j), {}), TypeError, "theta must be real", "theta-complex"),
    _bad(lambda q, k, v: ((q, k, v, torch.ones(4, dtype=torch.cfloat)), {}), TypeError, "real tensor", "theta-ctensor"),
    _bad(lambda q, k, v: ((q, k, v, torch.ones(4, device="meta")), {}), ValueError, "meta tensor", "theta-meta"),
    # D5: the calibrated table is a mass of exponentials.
    _bad(
        lambda q, k, v: ((q, k, v, 0.0), {"sdc": "calibrated", "sdc_table": -1.0}), ValueError, ">= 0", "sdc-negative"
    ),
    _bad(
        lambda q, k, v: ((q, k, v, 0.0), {"sdc": "calibrated", "sdc_table": float("-inf")}),
        ValueError,
        "finite",
        "sdc-inf",
    ),
    _bad(lambda q, k, v: ((q, k, v), {"k_dense": -1}), ValueError, "k_dense", "k-dense"),
    _bad(lambda q, k, v: ((q, k, v), {"k_dense": True}), ValueError, "k_dense", "k-dense-bool"),
    # D12: scale must be a finite positive real number, never a string, a bool, a vector or complex.
    _bad(lambda q, k, v: ((q, k, v), {"scale": float("inf")}), ValueError, "scale must be finite", "scale-inf"),
    _bad(lambda q, k, v: ((q, k, v), {"scale": "abc"}), TypeError, "scale must be a real number", "scale-abc"),
    _bad(lambda q, k, v: ((q, k, v), {"scale": "0.5"}), TypeError, "scale must be a real number", "scale-str"),
    _bad(lambda q, k, v: ((q, k, v), {"scale": True}), TypeError, "scale must be a real number", "scale-bool"),
    _bad(lambda q, k, v: ((q, k, v), {"scale": torch.ones(2)}), TypeError, "scale must be a real", "scale-vector"),
    _bad(lambda q, k, v: ((q, k, v), {"scale": 1j}), TypeError, "scale must be a real number", "scale-complex"),
    _bad(lambda q, k, v: ((q, k, v), {"scale": -0.5}), ValueError, "scale must be > 0", "scale-negative"),
    _bad(lambda q, k, v: ((q, k, v), {"causal": "False"}), TypeError, "causal must be True or False", "causal-str"),
    _bad(lambda q, k, v: ((q, k, v), {"vmc": "no"}), TypeError, "vmc must be True or False", "vmc-str"),
    _bad(lambda q, k, v: ((q, k, v), {"q_offset": 1.5}), ValueError, "q_offset", "q-offset"),
    _bad(lambda q, k, v: ((q, k, v), {"softcap": 0.0}), ValueError, "softcap must be > 0", "softcap-zero"),
    _bad(lambda q, k, v: ((q, k, v), {"softcap": "2"}), TypeError, "softcap must be a real", "softcap-str"),
    _bad(lambda q, k, v: ((q, k, v, 0.0), {"cap": 0}), ValueError, "cap must be an int >= 1", "cap-zero"),
    _bad(lambda q, k, v: ((q, k, v, 0.0), {"sdc_scale": -1.0}), ValueError, "sdc_scale must be >= 0", "sdc-scale"),
    _bad(lambda q, k, v: ((q, k, v), {"sinks": torch.ones(3)}), ValueError, "sinks must be", "sinks-heads"),
    _bad(lambda q, k, v: ((q, k, v), {"sinks": "x"}), TypeError, "sinks must be", "sinks-str"),
    _bad(lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(1, 1, 3, 5)}), TypeError, "torch.bool", "float-mask"),
    _bad(
        lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(2, 1, 3, 5, dtype=torch.bool)}),
        ValueError,
        "does not broadcast",
        "mask-shape",
    ),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_bad_input_names_the_argument(make, exc, match):
    args, kwargs = make(*_qkv())
    with pytest.raises(exc, match=match):
        prepare_call(*args, **kwargs)


def test_defaults_are_resolved():
    q, k, v = _qkv(dv=24)
    call = prepare_call(q, k, v, 0.5)
    assert call.scale == pytest.approx(16**-0.5)  # the query/key head dim, not the value's
    assert call.q_offset == 2
    assert call.theta.shape == (4, 1) and call.theta.dtype == torch.float32
    assert call.groups == 2
    assert call.softcap == 0.0 and call.cap == 0 and call.sdc_scale == 1.0 and call.sinks is None


def test_numbers_of_other_real_types_are_accepted():
    q, k, v = _qkv()
    call = prepare_call(q, k, v, 0.5, scale=np.float32(0.25), causal=np.bool_(False), k_dense=np.int64(3))
    assert call.scale == 0.25 and call.causal is False and call.k_dense == 3
    assert prepare_call(q, k, v, scale=torch.tensor(0.5)).scale == 0.5


def test_cap_is_ignored_without_thresholds():
    q, k, v = _qkv()
    assert prepare_call(q, k, v, cap=3).cap == 0
    assert prepare_call(q, k, v, 0.0, cap=3).cap == 3


def test_infinite_thresholds_are_accepted():
    q, k, v = _qkv()
    theta = torch.tensor([[float("-inf"), float("inf")]]).expand(4, 2)
    assert torch.equal(prepare_call(q, k, v, theta).theta, theta)


def test_tables_broadcast():
    assert torch.equal(head_table("theta", 0.25, 3, torch.device("cpu")), torch.full((3, 1), 0.25))
    t = head_table("theta", torch.tensor([1.0, 2.0]), 2, torch.device("cpu"))
    assert torch.equal(t, torch.tensor([[1.0], [2.0]]))
    t = head_table("theta", torch.arange(5.0)[None], 3, torch.device("cpu"))
    assert t.shape == (3, 5) and torch.equal(t[2], torch.arange(5.0))


def test_general_mask_views_are_broadcast_not_copied():
    q, k, v = _qkv()
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    call = prepare_call(q, k, v, attn_mask=mask)
    assert call.attn_mask.shape == (1, 4, 3, 5) and call.key_padding is None
    assert call.attn_mask.stride()[1] == 0


def test_key_only_masks_become_key_padding():
    q, k, v = _qkv(b=3, lk=6)
    keys = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    call = prepare_call(q, k, v, attn_mask=keys[:, None, None, :])
    assert call.attn_mask is None
    pad = call.key_padding
    assert torch.equal(pad.mask, keys)
    assert pad.prefix.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4], [0] * 7]
    assert pad.bounds.tolist() == [[0, 6], [2, 6], [0, 0]]
    # visibility combines causality and the padding exactly as the dense mask would
    dense = prepare_call(q, k, v, attn_mask=keys[:, None, None, :].expand(3, 1, 3, 6).clone())
    assert torch.equal(call.visibility(0, 3).expand(3, 4, 3, 6), dense.visibility(0, 3).expand(3, 4, 3, 6))


def test_key_padding_of_an_empty_key_axis():
    pad = KeyPadding.from_mask(torch.ones(2, 0, dtype=torch.bool))
    assert pad.prefix.shape == (2, 1) and pad.bounds.tolist() == [[0, 0], [0, 0]]


def test_identity_cache_never_compares_tensors():
    cache = IdentityCache()
    a, b = torch.ones(3, 4), torch.ones(3, 4)
    cache[a] = "a"
    assert cache.get(a) == "a" and cache.get(b) is None and a in cache and b not in cache
    del a
    import gc

    gc.collect()
    assert len(cache) == 0
