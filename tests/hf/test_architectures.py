"""Every decoder a user brings (issue 12): tiny random models of each architecture through the ``top_theta`` backend.

For gpt2, llama, mistral (window smaller than the sequence), qwen2, gemma2 (softcap), gemma3, phi3, gpt_neox, gpt_oss
(attention sinks), deepseek_v3 (value head dim != query/key head dim) and llava (a multimodal wrapper): dense parity
with eager attention under left padding, greedy generation with dynamic and static caches, and calibrate + configure +
save/reload. Models come from ``tests/support/architectures.py`` (float32, fixed seeds, peaked attention).
"""

import architectures as A
import pytest
import torch

import sparse_attention as sa
from sparse_attention.hf.backend import language_model

CORE = list(A.CORE)
# Peaked attention (init std 0.2) so that pruning has something to prune and parity is a real test.
INIT = 0.2


def _model(name, attn="eager"):
    return A.make_or_skip(name, attn_implementation=attn, init_std=INIT)


def _inputs(info):
    return A.batch(info, image=info.is_wrapper)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


@pytest.mark.parametrize("name", CORE)
def test_dense_parity_with_eager_under_left_padding(name):
    model, info = _model(name)
    inputs = _inputs(info)
    eager = _logits(model, inputs)
    sa.ensure_registered()
    model.set_attn_implementation("top_theta")
    dense = _logits(model, inputs)
    valid = A.valid_positions(inputs["attention_mask"])
    diff = float((dense - eager)[valid].abs().max())
    # eager and sdpa differ by up to 7e-6 at this init (measured); the backend must be as close.
    assert diff < 2e-5, f"{name}: max |logits(top_theta) - logits(eager)| = {diff:.3e}"


@pytest.mark.parametrize("name", CORE)
def test_greedy_generation_matches_eager_with_dynamic_and_static_caches(name):
    model, info = _model(name)
    inputs = _inputs(info)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**inputs, **kwargs)
        model.set_attn_implementation("top_theta")
        assert torch.equal(model.generate(**inputs, **kwargs), expected), "dynamic cache"
        static = model.generate(**inputs, **kwargs, cache_implementation="static")
    assert torch.equal(static, expected), "static cache"


@pytest.mark.parametrize("name", CORE)
def test_calibrate_configure_prune_save_and_reload(name, tmp_path):
    model, info = _model(name)
    inputs = _inputs(info)
    th = sa.calibrate(model, [inputs], k=3, dense_layers=(0,), progress=False)
    lm, config = language_model(model)
    assert th.num_layers == info.num_layers and th.num_heads == info.num_heads
    assert th.model_type == config.model_type
    sa.configure(model, th, sdc="threshold", vmc=True)
    with sa.collect_stats(model) as stats:
        pruned = _logits(model, inputs)
    assert torch.isfinite(pruned).all()
    assert stats.kept_fraction(include_dense=False) < 1.0, "nothing was pruned"
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path, attn_implementation="top_theta").eval()
    if info.is_wrapper:
        # "top_theta" for the whole wrapper also runs the vision tower through the backend (dense, float32)
        torch.testing.assert_close(_logits(again, inputs), pruned, atol=1e-5, rtol=0)
    else:
        assert torch.equal(_logits(again, inputs), pruned)
    assert torch.equal(sa.thresholds_of(again).theta, th.theta)


def test_softcap_is_applied_not_swallowed():
    # Gemma-2 with a strong cap: the backend must cap (a swallowed softcap differed by 2.19 in logits).
    model, info = A.make_or_skip("gemma2", attn_implementation="eager", init_std=INIT, attn_logit_softcapping=2.0)
    inputs = _inputs(info)
    eager = _logits(model, inputs)
    model.set_attn_implementation("top_theta")
    valid = A.valid_positions(inputs["attention_mask"])
    assert float((_logits(model, inputs) - eager)[valid].abs().max()) < 2e-5


def test_sinks_reach_the_attention():
    # gpt-oss passes its sink logits as s_aux; dropping them changed logits by 5.2 (measured).
    model, info = _model("gpt_oss")
    inputs = _inputs(info)
    eager = _logits(model, inputs)
    model.set_attn_implementation("top_theta")
    valid = A.valid_positions(inputs["attention_mask"])
    assert float((_logits(model, inputs) - eager)[valid].abs().max()) < 2e-5
    # and the sinks matter: without them the logits move far
    attn = [m for m in model.modules() if hasattr(m, "sinks")][0]
    with torch.no_grad():
        attn.sinks.fill_(-1e4)
    assert float((_logits(model, inputs) - eager)[valid].abs().max()) > 1e-2


def test_wrapper_configures_its_language_model_only():
    model, info = _model("llava")
    inputs = _inputs(info)
    th = sa.calibrate(model, [inputs], k=3, progress=False)
    sa.configure(model, th)
    lm, text = language_model(model)
    assert lm is A.submodule(model, info.language_model_path)
    assert text is model.config.get_text_config() and text.top_theta is not None
    assert getattr(model.config, "top_theta", None) is None or model.config.top_theta is text.top_theta
    assert text._attn_implementation == "top_theta"
    vision = A.submodule(model, info.extra["vision_path"])
    assert vision.config._attn_implementation != "top_theta"  # the vision tower is not causal and is never pruned


def test_vmc_is_honoured_while_calibrating_post():
    # Issue 12: post-softmax calibration must zero the probabilities outside the top-k without renormalising (and
    # add the V-mean term with vmc), as post-softmax inference does; pre-softmax renormalises over the top-k.
    model, info = _model("llama")
    inputs = _inputs(info)
    pre = sa.calibrate(model, [inputs], k=2, dense_layers=(), placement="pre", progress=False)
    post = sa.calibrate(model, [inputs], k=2, dense_layers=(), placement="post", progress=False)
    post_vmc = sa.calibrate(model, [inputs], k=2, dense_layers=(), placement="post", vmc=True, progress=False)
    assert pre.placement == "pre" and post.placement == "post"
    # layer 0 sees the same (unpruned) inputs in every run; deeper layers see what the placement's top-k computed
    assert not torch.equal(post.theta[1], post_vmc.theta[1])
    assert torch.equal(post.theta[0], post_vmc.theta[0])


def test_post_calibration_applies_top_k_as_post_inference_does():
    from sparse_attention.ops import reference
    from sparse_attention.ops.contract import prepare_call

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 9, 16) * 2, torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    call = prepare_call(q, k, v, placement="post", vmc=True)
    out, _ = reference.topk(call, 3)
    # Expected: full softmax, probabilities outside the top-3 set to zero (no renormalisation), plus the V-mean term.
    s = (q @ k.transpose(-1, -2)) / 4
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    top = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, p.topk(3, -1).indices, True) & causal
    kept = p * top
    v_mean = (causal.float() @ v) / causal.sum(-1, keepdim=True)
    expected = kept @ v + (1 - kept.sum(-1, keepdim=True)) * v_mean
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_a_k_per_layer():
    model, info = _model("llama")
    inputs = _inputs(info)
    th = sa.calibrate(model, [inputs], k={0: 8, 1: 2}, dense_layers=(), progress=False)
    assert th.k == (8, 2) and th.k_of(0) == 8
    sa.configure(model, th)
    with sa.collect_stats(model) as stats:
        _logits(model, inputs)
    rows = stats.kept_fraction_per_layer()
    assert rows[0] > rows[1]  # layer 0 keeps rows of up to 8 keys whole
    with pytest.raises(ValueError, match="missing \\[1\\]"):
        sa.calibrate(model, [inputs], k={0: 4}, progress=False)


def test_models_without_attention_interface_are_refused_clearly():
    model, info = A.make_or_skip("falcon")
    with pytest.raises(ValueError, match="does not route its attention through"):
        sa.configure(model, None)


@pytest.mark.parametrize("name", ["gemma2", "gpt_oss", "deepseek_v3"])
def test_the_triton_kernels_run_the_new_features(name):
    """softcap (gemma2), sinks (gpt_oss), Dv != D (deepseek_v3) through the kernels (the interpreter on CPU):
    the same logits as the reference backend, the same greedy tokens, real pruning."""
    from sparse_attention.kernels import config

    if not (config.INTERPRET or torch.cuda.is_available()):
        pytest.skip("the kernels need CUDA or TRITON_INTERPRET=1")
    model, info = _model(name)
    inputs = _inputs(info)
    # Calibrated on other text: thresholds equal to a score of the evaluated text (a row calibrated alone) would be
    # ties that the two backends, which round differently, may break differently.
    th = sa.calibrate(model, [A.batch(info, seed=1)], k=3, dense_layers=(0,), progress=False)
    sa.configure(model, th, sdc="threshold", vmc=True, backend="reference")
    expected = _logits(model, inputs)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        tokens = model.generate(**inputs, **kwargs)
    sa.configure(model, th, sdc="threshold", vmc=True, backend="triton")
    with sa.collect_stats(model) as stats:
        got = _logits(model, inputs)
    valid = A.valid_positions(inputs["attention_mask"])
    torch.testing.assert_close(got[valid], expected[valid], atol=2e-4, rtol=1e-4)
    assert stats.kept_fraction(include_dense=False) < 1.0
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, **kwargs), tokens)
