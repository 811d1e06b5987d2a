"""Calibration records the (k+1)-th largest visible score per (layer, head, n) and pools it into thresholds."""

import pytest
import torch
from sa_testing import tiny_gpt2

import sparse_attention as sa


def _batches(n=3, b=2, length=24, vocab=97, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, length), generator=gen) for _ in range(n)]


def _expected_from_probs(probs: torch.Tensor, k: int, sigma: float) -> dict[int, torch.Tensor]:
    """From dense eager attention probabilities [N, H, L, L] of one layer: θ per row length n > k, per head."""
    out = {}
    length = probs.shape[-1]
    for i in range(length):
        n = i + 1
        if n <= k:
            continue
        vals = probs[:, :, i, :n].double().sort(-1, descending=True).values[..., k]  # [N, H]
        out[n] = vals.mean(0) + sigma * vals.std(0, unbiased=False)
    return out


def test_post_thresholds_match_eager_attention_probabilities():
    model = tiny_gpt2(n_layer=2)
    batches = _batches()
    k, sigma = 4, 0.5
    # One point per row length, so each point pools exactly the rows of that length.
    th = sa.calibrate(
        model, batches, k=k, placement="post", sigma=sigma, dense_layers=(), topk_at_calibration=False,
        num_points=400, progress=False,
    )  # fmt: skip
    assert th.n_points.tolist() == list(range(k + 1, 25))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        atts = [model(input_ids=b, output_attentions=True).attentions for b in batches]
    for layer in range(2):
        probs = torch.cat([a[layer] for a in atts])
        expected = _expected_from_probs(probs, k, sigma)
        for p, n in enumerate(th.n_points.tolist()):
            torch.testing.assert_close(th.theta[layer, :, p].double(), expected[n], atol=1e-6, rtol=1e-5)


def test_pre_thresholds_match_scores_of_a_one_layer_gpt2():
    model = tiny_gpt2(n_layer=1)
    batches = _batches(n=2, length=16)
    k, sigma = 3, 0.0
    th = sa.calibrate(model, batches, k=k, sigma=sigma, dense_layers=(), num_points=400, progress=False)
    ids = torch.cat(batches)
    with torch.no_grad():
        h = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(16))
        x = model.transformer.h[0].ln_1(h)
        q, key, _ = model.transformer.h[0].attn.c_attn(x).split(64, dim=2)
    q = q.view(4, 16, 4, 16).transpose(1, 2).double()
    key = key.view(4, 16, 4, 16).transpose(1, 2).double()
    s = q @ key.transpose(-1, -2) / 4.0
    for p, n in enumerate(th.n_points.tolist()):
        vals = s[:, :, n - 1, :n].sort(-1, descending=True).values[..., k]
        torch.testing.assert_close(th.theta[0, :, p].double(), vals.mean(0), atol=1e-5, rtol=1e-5)


def test_thresholds_shape_and_pooling():
    model = tiny_gpt2()
    th = sa.calibrate(model, _batches(length=40), k=4, progress=False)
    assert th.theta.shape == (3, 4, th.n_points.numel()) and th.n_points.numel() <= 16
    assert th.n_points[0] == 5 and th.n_points[-1] == 40
    assert th.dense_layers == (0, 1) and th.placement == "pre" and th.k == 4
    assert th.sdc_table is not None and (th.sdc_table >= 0).all()
    assert torch.isfinite(th.theta).all()
    # A larger sigma moves every threshold up (std >= 0).
    th2 = sa.calibrate(model, _batches(length=40), k=4, sigma=1.0, progress=False)
    assert (th2.theta >= th.theta - 1e-6).all() and (th2.theta > th.theta).any()


def test_topk_at_calibration_changes_deeper_layers_only():
    model = tiny_gpt2()
    a = sa.calibrate(model, _batches(), k=3, dense_layers=(), topk_at_calibration=True, progress=False)
    b = sa.calibrate(model, _batches(), k=3, dense_layers=(), topk_at_calibration=False, progress=False)
    torch.testing.assert_close(a.theta[0], b.theta[0])
    assert not torch.allclose(a.theta[2], b.theta[2])


def test_dict_batches_with_padding_and_max_rows():
    model = tiny_gpt2()
    ids = torch.randint(0, 97, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :10] = 0
    th = sa.calibrate(model, [{"input_ids": ids, "attention_mask": mask}], k=4, max_rows=8, progress=False)
    assert th.n_points[-1] == 30 and torch.isfinite(th.theta).all()
    # The model is back on its own attention implementation afterwards.
    assert model.config._attn_implementation != "top_theta"


def test_calibration_errors():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="k must be"):
        sa.calibrate(model, _batches(), k=0)
    with pytest.raises(ValueError, match="placement"):
        sa.calibrate(model, _batches(), k=2, placement="inside")
    with pytest.raises(ValueError, match="no row longer than k=50"):
        sa.calibrate(model, _batches(length=20), k=50, progress=False)
    with pytest.raises(TypeError, match="input_ids tensors or dicts"):
        sa.calibrate(model, ["some text"], k=2, progress=False)
    with pytest.raises(ValueError, match="max_rows"):
        sa.calibrate(model, _batches(), k=2, max_rows=0)
