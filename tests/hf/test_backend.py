"""The Hugging Face ``top_theta`` backend: parity with eager, caches, padding, configuration round trip."""

import pytest
import torch
from sa_testing import tiny_gpt2, tiny_llama

import sparse_attention as sa
from sparse_attention.hf import backend as hf

MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def _padded_batch(b=3, length=21, vocab=97, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, length), generator=gen)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, : length // 3] = 0  # left padding
    if b > 2:
        mask[2, : 2 * length // 3] = 0
    return ids, mask


def _logits(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.fixture(scope="module")
def calibrated():
    """Per model: (model, thresholds) calibrated with k=8 on random text."""
    out = {}
    for name, make in MODELS.items():
        model = make()
        gen = torch.Generator().manual_seed(3)
        batches = [torch.randint(1, 97, (2, 48), generator=gen) for _ in range(3)]
        out[name] = (model, sa.calibrate(model, batches, k=8, progress=False))
    return out


def test_registered_on_import():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert "top_theta" in AttentionInterface._global_mapping
    assert "top_theta" in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("name", MODELS)
def test_unconfigured_top_theta_matches_eager_with_left_padding(name):
    model = MODELS[name]()
    ids, mask = _padded_batch()
    ref = _logits(model, "eager", ids, mask)
    out = _logits(model, "top_theta", ids, mask)
    valid = mask.bool()
    assert (out - ref)[valid].abs().max().item() < 1e-5


@pytest.mark.parametrize("name", MODELS)
def test_dense_generate_matches_eager(name):
    model = MODELS[name]()
    ids, mask = _padded_batch(b=2, length=9)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("eager")
    ref = model.generate(**kwargs)
    model.set_attn_implementation("top_theta")
    assert torch.equal(model.generate(**kwargs), ref)
    assert torch.equal(model.generate(**kwargs, use_cache=False), ref)
    assert torch.equal(model.generate(**kwargs, cache_implementation="static"), ref)


@pytest.mark.parametrize("name", MODELS)
def test_configured_model_prunes_and_reports(name, calibrated):
    model, th = calibrated[name]
    sa.configure(model, th)
    ids, mask = _padded_batch(b=2, length=40)
    with sa.collect_stats(model) as stats, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    frac = stats.kept_fraction(include_dense=False)
    per_layer = stats.kept_fraction_per_layer()
    assert 0.0 < frac < 0.7, frac
    assert per_layer[0] == 1.0 and per_layer[1] == 1.0  # dense layers keep everything
    assert per_layer[2] < 0.7
    assert len(stats.kept_fraction_per_head()[2]) == model.config.num_attention_heads
    report = stats.report()
    assert report["kept_fraction_pruned_layers"] == pytest.approx(frac)
    hf.configure(model, None)


@pytest.mark.parametrize("name", MODELS)
def test_pruned_generate_agrees_across_caches(name, calibrated):
    model, th = calibrated[name]
    sa.configure(model, th, sdc="threshold", vmc=True)
    ids, mask = _padded_batch(b=2, length=24)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with sa.collect_stats(model) as stats:
        cached = model.generate(**kwargs)
    assert stats.kept_v_fraction(include_dense=False) < 1.0
    assert torch.equal(model.generate(**kwargs, use_cache=False), cached)
    assert torch.equal(model.generate(**kwargs, cache_implementation="static"), cached)
    hf.configure(model, None)


@pytest.mark.parametrize("name", MODELS)
def test_save_and_load_restore_identical_outputs(name, calibrated, tmp_path):
    from transformers import AutoModelForCausalLM

    model, th = calibrated[name]
    sa.configure(model, th, sdc="calibrated", vmc=True)
    ids, mask = _padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="top_theta").eval()
    with torch.no_grad():
        after = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    back = sa.thresholds_of(loaded)
    assert torch.equal(back.theta, th.theta) and back.k == 8
    # Pruning changed the outputs relative to dense attention (the thresholds are not a no-op).
    dense = _logits(MODELS[name](), "eager", ids, mask)
    assert not torch.allclose(after, dense, atol=1e-4)
    hf.configure(model, None)


def test_configure_errors(calibrated):
    model, th = calibrated["gpt2"]
    llama, _ = calibrated["llama"]
    wrong = sa.Thresholds(n_points=th.n_points, theta=th.theta[:, :2], k=8)
    with pytest.raises(ValueError, match="heads per layer"):
        sa.configure(model, wrong)
    with pytest.raises(ValueError, match="calibrated on a 'gpt2' model"):
        sa.configure(llama, th)
    with pytest.raises(ValueError, match="placement='post'"):
        sa.configure(model, th, placement="post")
    no_table = sa.Thresholds(n_points=th.n_points, theta=th.theta, k=8, model_type="gpt2")
    with pytest.raises(ValueError, match="sdc table"):
        sa.configure(model, no_table, sdc="calibrated")
    with pytest.raises(ValueError, match="sdc must be"):
        sa.configure(model, th, sdc="bogus")
    with pytest.raises(ValueError, match="backend must be"):
        sa.configure(model, th, backend="cuda")
    with pytest.raises(TypeError, match="Thresholds"):
        sa.configure(model, {"theta": 1})


def test_collect_stats_needs_top_theta():
    model = tiny_gpt2()
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="top_theta"):
        with sa.collect_stats(model):
            pass


class _Module(torch.nn.Module):
    def __init__(self, layer_idx=0, **attrs):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_causal = True
        for k, v in attrs.items():
            setattr(self, k, v)


def test_attention_function_mask_forms():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 16).transpose(1, 2).contiguous().transpose(1, 2)  # strided like HF's view
    k, v = torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    module = _Module().eval()
    boolean = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6).clone()
    boolean[1, :, :, :2] = False
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~boolean, torch.finfo(torch.float32).min)
    a, w = hf.top_theta_attention_forward(module, q, k, v, boolean, scaling=0.25)
    b, _ = hf.top_theta_attention_forward(module, q, k, v, additive, scaling=0.25)
    assert w is None and a.shape == (2, 6, 4, 16)
    assert torch.equal(a, b)
    # Rows 0 and 1 of batch 1 see nothing: zeros, not NaN.
    assert torch.equal(a[1, :2], torch.zeros_like(a[1, :2]))
    # A None mask with Lq > 1 is top-left causal; equal to the explicit causal mask here (Lq == Lk).
    c, _ = hf.top_theta_attention_forward(module, q, k, v, None, scaling=0.25)
    d, _ = hf.top_theta_attention_forward(module, q, k, v, boolean[:1].expand(2, 1, 6, 6), scaling=0.25)
    assert torch.equal(c[0], d[0])
    with pytest.raises(ValueError, match="not attention biases"):
        hf.top_theta_attention_forward(module, q, k, v, torch.randn(2, 1, 6, 6))


def test_none_mask_top_left_for_static_prefill_and_all_keys_for_decode():
    torch.manual_seed(1)
    module = _Module().eval()
    k, v = torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    q = torch.randn(1, 2, 4, 16)
    out, _ = hf.top_theta_attention_forward(module, q, k, v, None)
    ref = sa.top_theta_attention(q, k[:, :, :4], v[:, :, :4])  # unused static slots 4.. are invisible
    torch.testing.assert_close(out.transpose(1, 2), ref)
    out1, _ = hf.top_theta_attention_forward(module, q[:, :, :1], k, v, None)
    ref1 = sa.top_theta_attention(q[:, :, :1], k, v, causal=False)
    torch.testing.assert_close(out1.transpose(1, 2), ref1)


def test_scaling_derived_like_gpt2_eager():
    q = torch.randn(1, 2, 3, 16)
    assert hf._scaling(_Module(), q, None) == pytest.approx(0.25)
    assert hf._scaling(_Module(scaling=0.5), q, None) == 0.5
    m = _Module(layer_idx=3, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=True)
    assert hf._scaling(m, q, None) == pytest.approx(0.25 / 4)
    assert hf._scaling(_Module(scale_attn_weights=False), q, None) == 1.0
    assert hf._scaling(_Module(), q, 0.3) == 0.3


def test_output_attentions_returns_no_weights():
    model = tiny_gpt2()
    model.set_attn_implementation("top_theta")
    ids, mask = _padded_batch(b=2)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert out.attentions is None or all(a is None for a in out.attentions)


def test_training_mode_is_dense_with_gradients():
    model = tiny_gpt2()
    ids, mask = _padded_batch()
    ref = _logits(model, "eager", ids, mask)
    model.set_attn_implementation("top_theta")
    model.config.attn_pdrop = 0.0
    model.train()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert (out.logits - ref)[mask.bool()].abs().max().item() < 1e-5
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None


@pytest.mark.parametrize("name", MODELS)
def test_triton_backend_generates_the_reference_tokens(name, calibrated):
    """End to end through the kernels (the interpreter on CPU): same tokens as the reference backend."""
    model, th = calibrated[name]
    ids, mask = _padded_batch(b=2, length=20)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    sa.configure(model, th, sdc="threshold", vmc=True, backend="reference")
    expected = model.generate(**kwargs)
    sa.configure(model, th, sdc="threshold", vmc=True, backend="triton")
    with sa.collect_stats(model) as stats:
        got = model.generate(**kwargs)
    assert torch.equal(got, expected)
    assert stats.kept_v_fraction(include_dense=False) < 1.0
    assert torch.equal(model.generate(**kwargs, cache_implementation="static"), expected)
    hf.configure(model, None)


def _adapted(mask, lq, lk, module=None):
    q, k = torch.randn(2, 2, lq, 16), torch.randn(2, 2, lk, 16)
    return hf.adapt(module or _Module().eval(), q, k, k, mask, scaling=None, is_causal=None, softcap=None, sinks=None)


def test_standard_causal_padding_masks_are_decomposed_once_per_forward():
    from transformers.masking_utils import sliding_window_causal_mask_function

    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[1, :2] = False
    mask = hf.build_mask(batch_size=2, q_length=6, kv_length=6, attention_mask=padding)
    call = _adapted(mask, 6, 6)
    assert call.causal and call.q_offset == 0 and call.attn_mask is None
    assert torch.equal(call.key_padding.mask, padding)
    # every layer of the forward reuses the same key padding (no rebuild, no scan)
    assert _adapted(mask, 6, 6).key_padding is call.key_padding
    # the decomposition is exact: the same visibility as transformers' mask
    assert torch.equal(call.visibility(0, 6).expand(2, 1, 6, 6), mask)
    # with a cache (keys before the queries) the causal part is bottom-right aligned
    cached = hf.build_mask(batch_size=2, q_length=3, kv_length=8, q_offset=5, attention_mask=torch.ones(2, 8).bool())
    assert _adapted(cached, 3, 8).q_offset == 5 and torch.equal(
        _adapted(cached, 3, 8).visibility(0, 3)[0, 0], cached[0, 0]
    )
    # a static cache (a tensor offset, read only on the device) and a sliding window stay general masks
    static = hf.build_mask(
        batch_size=2, q_length=3, kv_length=8, q_offset=torch.tensor(0), attention_mask=padding[:, :1].expand(2, 8)
    )
    assert _adapted(static, 3, 8).attn_mask is not None and not _adapted(static, 3, 8).causal
    window = hf.build_mask(
        batch_size=2, q_length=6, kv_length=6, mask_function=sliding_window_causal_mask_function(3),
        attention_mask=padding, allow_is_causal_skip=False,
    )  # fmt: skip
    general = _adapted(window, 6, 6)
    assert general.attn_mask is not None and torch.equal(general.visibility(0, 6).expand(2, 2, 6, 6)[:, :1], window)


def test_key_only_masks_are_key_paddings_built_once():
    keys = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    keys[0, ..., :3] = False
    first = _adapted(keys, 1, 8)
    assert first.attn_mask is None and not first.causal and torch.equal(first.key_padding.mask, keys[:, 0, 0])
    assert _adapted(keys, 1, 8).key_padding is first.key_padding


def test_unknown_keywords_are_refused_by_name():
    module = _Module().eval()
    q = torch.randn(1, 2, 3, 16)
    with pytest.raises(NotImplementedError, match="'alibi_slopes'"):
        hf.top_theta_attention_forward(module, q, q, q, None, alibi_slopes=torch.ones(2))
    with pytest.raises(NotImplementedError, match=r"does not implement 'head_mask' \(from"):  # named once
        hf.top_theta_attention_forward(module, q, q, q, None, head_mask=torch.ones(2))
    # keywords whose information is already in q, k and the mask are accepted
    out, _ = hf.top_theta_attention_forward(module, q, q, q, None, sliding_window=None, position_ids=torch.arange(3))
    assert out.shape == (1, 3, 2, 16)


def test_softcap_and_sinks_reach_the_call():
    torch.manual_seed(2)
    module = _Module().eval()
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 24)
    sinks = torch.randn(4)
    out, _ = hf.top_theta_attention_forward(module, q, k, v, None, scaling=0.3, softcap=2.0, s_aux=sinks)
    ref = sa.top_theta_attention(q, k, v, scale=0.3, softcap=2.0, sinks=sinks, q_offset=0)
    assert out.shape == (1, 5, 4, 24)
    torch.testing.assert_close(out.transpose(1, 2), ref)


def _model_without_attention_interface():
    from transformers import XLNetConfig, XLNetLMHeadModel

    return XLNetLMHeadModel(XLNetConfig(d_model=32, n_layer=1, n_head=2, d_inner=64, vocab_size=97)).eval()


def test_models_without_attention_interface_are_refused():
    """transformers only warns for such models and keeps them dense; we refuse instead of pruning nothing."""
    model = _model_without_attention_interface()
    with pytest.raises(ValueError, match="does not route its attention through"):
        sa.configure(model, None)
    assert getattr(model.config, "top_theta", None) is None
    with pytest.raises(ValueError, match="does not use attn_implementation='top_theta'"):
        with sa.collect_stats(model):
            pass
    with pytest.raises(ValueError, match="does not route its attention through"):
        sa.calibrate(model, [torch.randint(0, 97, (1, 12))], k=2, progress=False)


# ---- issue 13: checkpoints are validated by from_pretrained, naming the file and the field --------------------


def _checkpoint(root, name, top_theta=None, **model_kwargs):
    """A tiny GPT-2 checkpoint (4 layers, 4 heads unless told) whose config.json holds ``top_theta`` (when given)."""
    import json

    folder = root / name
    tiny_gpt2(**{"n_layer": 4, **model_kwargs}).save_pretrained(folder)
    if top_theta is not None:
        config = json.loads((folder / "config.json").read_text())
        config["top_theta"] = top_theta
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _settings(layers=4, heads=4, model_type="gpt2", **settings):
    th = sa.Thresholds(n_points=[1, 16], theta=torch.zeros(layers, heads, 2), k=4, model_type=model_type)
    return sa.TopThetaSettings(th, **settings).to_dict()


def _load(folder, impl="top_theta"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=impl)


@pytest.mark.parametrize(
    "settings,match",
    [
        (_settings(layers=6), "the thresholds are for 6 layers but the model has 4"),
        (_settings(heads=1), "the thresholds are for 1 heads per layer but the model has 4"),
        (_settings(model_type="llama"), "calibrated on a 'llama' model, not 'gpt2'"),
    ],
    ids=["6-layers-on-4", "1-head-on-4", "llama-on-gpt2"],
)
@pytest.mark.parametrize("impl", ["top_theta", "eager"])
def test_from_pretrained_refuses_thresholds_for_another_model(tmp_path, settings, match, impl):
    # D8: from_pretrained(..., attn_implementation="top_theta") accepted these silently: the model check ran only in
    # configure. Eager loads are checked too: the CLI and collect_stats switch an eager model to top_theta later.
    folder = _checkpoint(tmp_path, "ckpt", settings)
    with pytest.raises(ValueError, match=match) as info:
        _load(folder, impl)
    assert f"{folder}/config.json: top_theta.thresholds" in str(info.value)


def _malformed(change):
    raw = _settings()
    change(raw)
    return raw


@pytest.mark.parametrize(
    "raw,field",
    [
        (_malformed(lambda d: d["thresholds"].pop("k")), "the field 'k' is missing"),
        (_malformed(lambda d: d.update(vmc="no")), "'vmc' must be true or false, got 'no'"),
        (_malformed(lambda d: d["thresholds"].update(theta=[[["a", 0.0]] * 4] * 4)), "'theta' must hold numbers"),
        (_malformed(lambda d: d["thresholds"].update(n_points=[1, 2**40])), "beyond the supported"),
        (_malformed(lambda d: d.update(sdc="magic")), "'sdc' must be one of"),
        ("exact", "top_theta: must be a dict, got str"),
    ],
    ids=["missing-k", "vmc-no", "theta-str", "huge-table", "sdc", "not-a-dict"],
)
def test_from_pretrained_refuses_a_malformed_top_theta(tmp_path, raw, field):
    # D9: a malformed config.top_theta loaded and failed only at the first forward (KeyError: 'k', TypeError: new():
    # invalid data type 'str'); "vmc": "no" was read as True.
    folder = _checkpoint(tmp_path, "ckpt", raw)
    with pytest.raises(ValueError, match=field) as info:
        _load(folder)
    assert str(info.value).startswith(f"{folder}/config.json: top_theta")


def test_from_pretrained_leaves_other_checkpoints_alone(tmp_path):
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = _checkpoint(tmp_path, "plain")
    reference = _load(plain, "eager").eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    dense = _load(plain).eval()  # no top_theta: exact dense attention
    assert dense.config._attn_implementation == "top_theta" and getattr(dense.config, "top_theta", None) is None
    configured = _checkpoint(tmp_path, "configured", _settings(sdc="threshold", vmc=True))
    eager = _load(configured, "eager").eval()  # a valid configuration, loaded with eager: eager, settings kept
    assert eager.config._attn_implementation == "eager"
    assert sa.TopThetaSettings.from_dict(eager.config.top_theta).vmc is True
    with torch.no_grad():
        assert torch.allclose(dense(input_ids=ids).logits, expected, atol=1e-5)
        assert torch.equal(eager(input_ids=ids).logits, expected)
    assert sa.thresholds_of(_load(configured)).k == 4
