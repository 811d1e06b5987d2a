"""Compact threshold tables: interpolation, serialisation, model checks."""

import pytest
import torch

from sparse_attention import Thresholds, TopThetaSettings


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
        (dict(theta=torch.zeros(1, 2, 2)), "'theta' must be"),
        (dict(theta=torch.full((1, 2, 3), float("nan"))), "NaN"),
        (dict(k=0), "'k' must be"),
        (dict(k=[3, 4]), "'k' lists 2 layers"),
        (dict(k={1: 3}), "'k' as a mapping must give every layer"),
        (dict(placement="middle"), "placement"),
        (dict(sdc_table=torch.zeros(1, 2, 2)), "'sdc_table' must have shape"),
        (dict(sdc_table=-torch.ones(1, 2, 3)), "'sdc_table' must be finite and >= 0"),
        (dict(sdc_table=torch.full((1, 2, 3), float("inf"))), "'sdc_table' must be finite"),
        (dict(n_points=[1, 2, 2**40]), "beyond the supported"),
        (dict(n_points=[1.5, 2, 3]), "'n_points' must hold ints"),
        (dict(dense_layers=5), "'dense_layers' must be a list"),
        (dict(dense_layers=[3]), "'dense_layers' has layer 3"),
        (dict(sigma="big"), "'sigma' must be a finite number"),
    ],
    ids=[
        "dup-points",
        "zero-point",
        "theta-shape",
        "theta-nan",
        "k0",
        "k-list-length",
        "k-mapping-missing",
        "placement",
        "sdc-shape",
        "sdc-negative",
        "sdc-inf",
        "huge-table",
        "float-points",
        "dense-int",
        "dense-range",
        "sigma",
    ],
)
def test_construction_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _th(**kw)


def test_load_refuses_a_file_with_a_bad_sdc_table(tmp_path):
    # D5: thresholds files with negative (or infinite) sdc tables were accepted, and amplified the output.
    import json

    from safetensors.torch import save_file

    good = _th(sdc_table=torch.rand(1, 2, 3))
    meta = {k: v for k, v in good.to_dict().items() if k not in ("n_points", "theta", "sdc_table")}
    for bad, match in ((-torch.ones(1, 2, 3), ">= 0"), (torch.full((1, 2, 3), -float("inf")), "finite")):
        path = tmp_path / "crafted.safetensors"
        tensors = {"n_points": good.n_points, "theta": good.theta, "sdc_table": bad}
        save_file(tensors, str(path), metadata={"top_theta": json.dumps(meta)})
        with pytest.raises(ValueError, match=f"{path}: 'sdc_table' must be finite and >= 0") as info:
            Thresholds.load(path)
        assert match in str(info.value)


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


def test_infinite_points_interpolate_without_nan():
    # Issue 12: "never prune" as -inf used to turn into NaN through inf * 0.
    inf = float("inf")
    th = _th(n_points=torch.tensor([8, 32]), theta=torch.tensor([[[-inf, -inf], [1.0, inf]]]))
    table = th.table(0)
    assert not table.isnan().any()
    assert torch.isneginf(table[0]).all()
    assert table[1, 7].item() == 1.0  # exact at its own point
    assert torch.isposinf(table[1, 8:]).all()  # the infinite point dominates the open interval next to it
    mixed = _th(n_points=torch.tensor([8, 16]), theta=torch.tensor([[[-inf, inf], [0.0, 0.0]]]))
    row = mixed.table(0)[0]
    assert not row.isnan().any() and torch.isneginf(row[:8]).all() and torch.isposinf(row[15])
    back = Thresholds.from_dict(th.to_dict())
    assert torch.equal(back.theta, th.theta)


def test_per_layer_k():
    th = _th(theta=torch.zeros(3, 2, 3), k={0: 512, 1: 512, 2: 16}, dense_layers=())
    assert th.k == (512, 512, 16) and th.k_of(0) == 512 and th.k_of(2) == 16
    assert _th(theta=torch.zeros(2, 2, 3), k=[7, 7]).k == 7  # a uniform list is one k
    assert Thresholds.from_dict(th.to_dict()).k == (512, 512, 16)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda d: d.pop("k"), "'k' is missing"),
        (lambda d: d.update(version="2"), "'version' must be an int"),
        (lambda d: d.update(version=99), "newer than this package"),
        (lambda d: d.update(dense_layers=5), "'dense_layers' must be a list"),
        (lambda d: d.update(theta=[[["a", 1, 2], [0, 0, 0]]]), "'theta' must hold numbers"),
        (lambda d: d.update(theta="x"), "'theta' must hold numbers"),
        (lambda d: d.update(theta=[[[0.0, 1.0], [2.0]]]), "'theta' must be a rectangular"),
        (lambda d: d.update(n_points=[1, 2**40, 2**41]), "beyond the supported"),
        (lambda d: d.update(bogus=1), "unknown thresholds fields"),
    ],
    ids=[
        "missing-k",
        "version-str",
        "version-new",
        "dense-int",
        "theta-str",
        "theta-junk",
        "ragged",
        "huge",
        "unknown",
    ],
)
def test_malformed_records_name_the_field(change, match):
    # D10: malformed thresholds leaked KeyError / TypeError, and nothing bounded the table.
    d = _th().to_dict()
    change(d)
    with pytest.raises(ValueError, match=match):
        Thresholds.from_dict(d, where="file.safetensors")
    with pytest.raises(ValueError, match="file.safetensors"):
        Thresholds.from_dict(d, where="file.safetensors")


def test_save_refuses_files_it_did_not_write(tmp_path):
    # D13: calibrate --out X used to overwrite whatever X was.
    other = tmp_path / "notes.txt"
    other.write_text("precious")
    with pytest.raises(ValueError, match="not a thresholds file written by sparse_attention"):
        _th().save(other)
    assert other.read_text() == "precious"
    _th().save(other, overwrite=True)
    assert Thresholds.load(other).k == 3
    mine = _th().save(tmp_path / "th.safetensors")
    _th(k=4).save(mine)  # replacing its own file is fine
    assert Thresholds.load(mine).k == 4
    with pytest.raises(ValueError, match="is a folder"):
        _th().save(tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = _th().save(tmp_path / "th.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        _th(k=5).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["th.safetensors"]  # no temporary left behind


@pytest.mark.parametrize(
    "raw,match",
    [
        ("x", "must be a dict"),
        ({"vmc": "no"}, "'vmc' must be true or false"),
        ({"sdc": "magic"}, "'sdc' must be one of"),
        ({"backend": "gpu"}, "'backend' must be one of"),
        ({"sdc_scale": -1}, "'sdc_scale' must be a finite number >= 0"),
        ({"cap": 0}, "'cap' must be an int >= 1"),
        ({"thresholds": {"theta": [[[0.0]]], "n_points": [4]}}, "'k' is missing"),
        ({"thresholds": {"theta": [[[0.0]]], "n_points": [4], "k": 2, "placement": "post"}, "sdc": "none"}, "exact"),
        ({"sdc": "calibrated", "thresholds": {"theta": [[[0.0]]], "n_points": [4], "k": 2}}, "no sdc table"),
        ({"extra": 1}, "unknown fields"),
    ],
    ids=[
        "not-dict",
        "vmc-str",
        "sdc",
        "backend",
        "sdc-scale",
        "cap",
        "thresholds-k",
        "post-sdc",
        "calibrated",
        "extra",
    ],
)
def test_settings_parse_strictly(raw, match):
    # D9: a malformed config.top_theta loaded and failed at the first forward (KeyError 'k'; "vmc": "no" read as True).
    with pytest.raises(ValueError, match=match):
        TopThetaSettings.from_dict(raw, where="ckpt/config.json")


def test_settings_round_trip():
    settings = TopThetaSettings(_th(), sdc="threshold", sdc_scale=0.5, cap=64, vmc=True, backend="reference")
    back = TopThetaSettings.from_dict(settings.to_dict())
    assert (back.sdc, back.sdc_scale, back.cap, back.vmc, back.backend) == ("threshold", 0.5, 64, True, "reference")
    assert torch.equal(back.thresholds.theta, settings.thresholds.theta)
