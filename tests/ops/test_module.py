"""TopThetaAttention (ops/module.py): a drop-in for F.scaled_dot_product_attention in a model without transformers."""

import math

import pytest
import torch

import sparse_attention as sa


class Block(torch.nn.Module):
    """A nanoGPT-style causal self-attention block (its attention op is swappable)."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.attn_op = torch.nn.functional.scaled_dot_product_attention

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = self.attn_op(q, k, v, is_causal=True, dropout_p=0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TinyGPT(torch.nn.Module):
    def __init__(self, vocab=50, d=64, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(Block(d) for _ in range(layers))
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for blk in self.blocks:
            x = x + blk(x)
        return self.head(x)


def test_dense_module_equals_sdpa_in_a_gpt():
    model = TinyGPT().eval()
    ids = torch.randint(0, 50, (2, 17))
    with torch.no_grad():
        expected = model(ids)
        for blk in model.blocks:
            blk.attn_op = sa.TopThetaAttention(record_stats=True)
        model.eval()  # new modules start in training mode, where they compute SDPA themselves
        got = model(ids)
    assert model.blocks[0].attn_op.last_stats is not None  # the Top-θ path ran
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)


def test_swapped_module_prunes_and_matches_the_functional_api():
    model = TinyGPT().eval()
    ids = torch.randint(0, 50, (2, 17))
    th = sa.Thresholds(n_points=[4, 17], theta=torch.full((2, 4, 2), 0.05), k=3, dense_layers=(0,))
    for i, blk in enumerate(model.blocks):
        blk.attn_op = sa.TopThetaAttention.from_thresholds(th, i, sdc="threshold", record_stats=True)
    model.eval()
    with torch.no_grad():
        model(ids)
    assert model.blocks[0].attn_op.theta is None  # a dense layer
    stats = model.blocks[1].attn_op.last_stats
    assert 0.0 < stats.kept_fraction < 1.0
    q, k, v = (torch.randn(2, 4, 17, 16) for _ in range(3))
    op = model.blocks[1].attn_op
    direct = sa.top_theta_attention(q, k, v, th.table(1), k_dense=3, sdc="threshold", q_offset=0)
    torch.testing.assert_close(op(q, k, v, is_causal=True), direct)


def test_training_mode_is_sdpa_with_dropout_and_eval_refuses_dropout():
    op = sa.TopThetaAttention(theta=0.0).train()
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    torch.manual_seed(1)
    a = op(q, k, v, is_causal=True, dropout_p=0.5)
    torch.manual_seed(1)
    b = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.5)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="dropout_p=0.5 in evaluation mode"):
        op.eval()(q, k, v, is_causal=True, dropout_p=0.5)


def test_is_causal_is_top_left_like_sdpa():
    op = sa.TopThetaAttention().eval()
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(op(q, k, v, is_causal=True), expected, atol=2e-6, rtol=0)
    mask = torch.rand(1, 1, 3, 7) > 0.3
    mask[..., 0] = True
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(op(q, k, v, attn_mask=mask), expected, atol=2e-6, rtol=0)
    assert math.isclose(op(q, k, v, scale=0.5).abs().sum().item(), op(q, k, v, scale=0.5).abs().sum().item())


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="placement"):
        sa.TopThetaAttention(placement="middle")
    with pytest.raises(TypeError, match="Thresholds"):
        sa.TopThetaAttention.from_thresholds({"theta": 1}, 0)
