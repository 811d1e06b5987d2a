"""Compact threshold tables: interpolation, serialisation, model checks."""

import pytest
import torch

from sparse_attention import Thresholds


def _th(**kw):
    base = dict(
        n_points=torch.tensor([4, 8, 16]),
        theta=torch.tensor([[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]]),
        k=3,
        dense_layers=(),
    )
    base.update(kw)
    return Thresholds(**base)


def test_interpolation_is_linear_and_clamped():
    th = _th()
    table = th.table(0)
    assert table.shape == (2, 16)
    # Clamped below the first point and at the last.
    assert table[0, 0].item() == 0.0 and table[0, 3].item() == 0.0
    assert table[0, 15].item() == 3.0
    # Linear in between: n=6 is halfway from 4 to 8, n=12 halfway from 8 to 16.
    assert table[0, 5].item() == pytest.approx(0.5)
    assert table[0, 11].item() == pytest.approx(2.0)
    assert th.value_at(0, 0, 1000) == 3.0 and th.value_at(0, 1, 7) == 2.0


def test_single_point():
    th = _th(n_points=torch.tensor([5]), theta=torch.tensor([[[1.5]]]))
    assert torch.equal(th.table(0), torch.full((1, 5), 1.5))


def test_save_load_round_trip(tmp_path):
    th = _th(sdc_table=torch.rand(1, 2, 3), placement="post", sigma=0.3, model_type="gpt2", dense_layers=(0,))
    path = th.save(tmp_path / "th.safetensors")
    back = Thresholds.load(path)
    assert torch.equal(back.n_points, th.n_points) and torch.equal(back.theta, th.theta)
    assert torch.equal(back.sdc_table, th.sdc_table)
    assert (back.k, back.placement, back.sigma, back.model_type, back.dense_layers) == (3, "post", 0.3, "gpt2", (0,))
    again = Thresholds.from_dict(th.to_dict())
    assert torch.equal(again.theta, th.theta)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Thresholds.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        Thresholds.load(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.ones(2)}, str(other))
    with pytest.raises(ValueError, match="not a Top-θ thresholds file"):
        Thresholds.load(other)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(n_points=torch.tensor([4, 4, 16])), "strictly increasing"),
        (dict(n_points=torch.tensor([0, 4, 16])), "strictly increasing"),
        (dict(theta=torch.zeros(1, 2, 2)), "theta must be"),
        (dict(theta=torch.full((1, 2, 3), float("nan"))), "NaN"),
        (dict(k=0), "k must be"),
        (dict(placement="middle"), "placement"),
        (dict(sdc_table=torch.zeros(1, 2, 2)), "sdc_table shape"),
    ],
    ids=["dup-points", "zero-point", "theta-shape", "theta-nan", "k0", "placement", "sdc-shape"],
)
def test_construction_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _th(**kw)


def test_check_model():
    class Cfg:
        num_hidden_layers, num_attention_heads, model_type = 1, 2, "gpt2"

    th = _th(model_type="gpt2")
    th.check_model(Cfg)
    Cfg.num_attention_heads = 4
    with pytest.raises(ValueError, match="2 heads per layer but the model has 4"):
        th.check_model(Cfg)
    Cfg.num_attention_heads, Cfg.num_hidden_layers = 2, 3
    with pytest.raises(ValueError, match="1 layers but the model has 3"):
        th.check_model(Cfg)
    Cfg.num_hidden_layers, Cfg.model_type = 1, "llama"
    with pytest.raises(ValueError, match="calibrated on a 'gpt2' model"):
        th.check_model(Cfg)


def test_sdc_table_required():
    with pytest.raises(ValueError, match="no sdc table"):
        _th().sdc(0)
    with pytest.raises(ValueError, match="out of range"):
        _th().table(5)
