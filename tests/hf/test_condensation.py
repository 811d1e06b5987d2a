"""Tests of sparse_attention.hf.condensation: the training context manager and its seam with the "top_theta" backend.

The end-to-end checks compare ``reg.loss`` and its parameter gradients with the same loss computed independently from
the attention probabilities that transformers' eager implementation returns (``output_attentions=True``).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import sparse_attention  # noqa: F401  (registers "top_theta")
from sparse_attention.hf.backend import active_contexts
from sparse_attention.hf.condensation import Condensation, condensation
from sparse_attention.ops.contract import DEFAULT_DENSE_LAYERS
from sparse_attention.ops.regularizer import regularizer_terms


def active_for(module):
    found = [c for c in active_contexts(module) if isinstance(c, Condensation)]
    return found[0] if found else None


# The package exports the function `condensation`, which shadows the submodule's attribute name.

VOCAB = 64


def tiny_gpt2(n_layer=2, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def left_padding(lengths, length):
    pos = torch.arange(length)
    return torch.stack([(pos >= length - n).long() for n in lengths])


def eager_regularizer(model, input_ids, attention_mask, k, layers, kind="logmass"):
    """The regularizer from eager attention probabilities, differentiable; also returns the mean top-k mass."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    length = input_ids.shape[1]
    visible = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    if attention_mask is not None:
        visible = visible & attention_mask.bool()[:, None, None, :]
    losses, masses = [], []
    for layer in layers:
        probs = out.attentions[layer]  # [B, H, L, L]
        rows = visible.sum(-1).expand(probs.shape[:3]) > k
        mass = probs.masked_fill(~visible, 0.0).topk(k, -1).values.sum(-1)[rows]
        losses.append(-torch.log(mass) if kind == "logmass" else 1.0 - mass)
        masses.append(mass.detach())
    return torch.cat(losses).mean(), torch.cat(masses).mean().item()


def attention_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "attn" in n}


@pytest.mark.parametrize(
    ("make_model", "padded", "kind"),
    [(tiny_gpt2, False, "logmass"), (tiny_gpt2, True, "mass"), (tiny_llama, True, "logmass")],
    ids=["gpt2-causal-logmass", "gpt2-left-padding-mass", "llama-gqa-left-padding-logmass"],
)
def test_loss_and_gradients_match_eager_attention(make_model, padded, kind):
    model = make_model()
    model.train()
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, VOCAB, (3, 23), generator=gen)
    attention_mask = left_padding([23, 17, 9], 23) if padded else None
    k = 4

    want, want_mass = eager_regularizer(model, input_ids, attention_mask, k, layers=[0, 1], kind=kind)
    model.zero_grad()
    want.backward()
    want_grads = attention_grads(model)

    model.zero_grad()
    with condensation(model, k=k, kind=kind, dense_layers=()) as reg:
        model(input_ids=input_ids, attention_mask=attention_mask)
        got = reg.loss
        got.backward()
        assert reg.topk_mass == pytest.approx(want_mass, rel=1e-5)
        assert set(reg.layer_mass()) == {0, 1}
    got_grads = attention_grads(model)

    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert set(got_grads) == set(want_grads) and want_grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item(), msg=name)


def test_dense_layers_are_not_regularized():
    model = tiny_gpt2(n_layer=3)
    model.train()
    input_ids = torch.randint(1, VOCAB, (2, 16))
    with condensation(model, k=3) as reg:
        assert reg.dense_layers == frozenset(DEFAULT_DENSE_LAYERS)
        model(input_ids=input_ids)
        assert set(reg.layer_mass()) == {2}
        assert reg.rows == 2 * 2 * (16 - 3)  # batch x heads x rows with more than 3 visible keys
        got = reg.loss.item()
    want, _ = eager_regularizer(model, input_ids, None, 3, layers=[2])
    assert got == pytest.approx(want.item(), rel=1e-5)
    with condensation(model, k=3, dense_layers=[0, 2]) as reg:
        model(input_ids=input_ids)
        assert set(reg.layer_mass()) == {1}


def test_only_dense_layers_gives_a_zero_loss():
    model = tiny_gpt2()
    model.train()
    with condensation(model, k=3) as reg:  # the default dense layers are all two layers of this model
        model(input_ids=torch.randint(1, VOCAB, (2, 16)))
        assert reg.rows == 0
        assert reg.loss.item() == 0.0
        assert math.isnan(reg.topk_mass)


def test_switches_the_attention_implementation_and_restores_it():
    model = tiny_gpt2()
    before = model.config._attn_implementation
    assert before != "top_theta"
    attention = model.transformer.h[0].attn
    assert active_for(attention) is None
    with condensation(model, k=3) as reg:
        assert isinstance(reg, Condensation)
        assert model.config._attn_implementation == "top_theta"
        assert active_for(attention) is reg
        assert active_for(model.transformer.h[1].attn) is reg
    assert model.config._attn_implementation == before
    assert active_for(attention) is None


def test_exit_on_an_exception_cleans_up():
    model = tiny_gpt2()
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with condensation(model, k=3):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    assert active_for(model.transformer.h[0].attn) is None
    assert not model._forward_pre_hooks


def test_a_second_context_on_the_same_model_is_refused():
    model = tiny_gpt2()
    with condensation(model, k=3):
        with pytest.raises(RuntimeError, match="already active"):
            with condensation(model, k=5):
                pass


def test_each_forward_starts_a_fresh_record_and_counts_training_steps():
    model = tiny_gpt2()
    model.train()
    short = torch.randint(1, VOCAB, (1, 8))
    long = torch.randint(1, VOCAB, (2, 20))
    with condensation(model, k=3, dense_layers=()) as reg:
        assert reg.step == -1
        model(input_ids=long)
        assert reg.step == 0 and reg.rows == 2 * 2 * 2 * (20 - 3)
        model(input_ids=short)
        assert reg.step == 1 and reg.rows == 2 * 2 * (8 - 3)
        model.eval()
        with torch.no_grad():
            model(input_ids=long)
        assert reg.step == 1 and reg.rows == 0  # evaluation records nothing and is not a training step
        model.train()
        model(input_ids=short)
        reg.reset()
        assert reg.rows == 0


def test_warmup_ramps_lambda():
    model = tiny_gpt2()
    model.train()
    with condensation(model, k=3, lam=0.5, warmup=4, dense_layers=()) as reg:
        assert [reg.lam_at(s) for s in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
        model(input_ids=torch.randint(1, VOCAB, (1, 12)))
        model(input_ids=torch.randint(1, VOCAB, (1, 12)))
        assert reg.current_lam == 0.25
        assert reg.penalty.item() == pytest.approx(0.25 * reg.loss.item())
    with condensation(model, k=3, lam=0.5, dense_layers=()) as reg:
        assert reg.current_lam == 0.5


def test_lam_zero_only_measures():
    model = tiny_gpt2()
    model.train()
    with condensation(model, k=3, lam=0.0, dense_layers=()) as reg:
        model(input_ids=torch.randint(1, VOCAB, (1, 12)))
        assert reg.rows > 0 and 0.0 < reg.topk_mass < 1.0
        assert not reg.loss.requires_grad


def test_record_directly():
    # The seam the backend uses: record(module, query, key, mask) with GQA keys and a boolean mask.
    model = tiny_gpt2()
    module = model.transformer.h[0].attn
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 16, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, 10, 16, generator=gen, requires_grad=True)
    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool).tril()
    mask[1, :, :, :3] = False
    with condensation(model, k=2, dense_layers=()) as reg:
        reg.record(module, q, k, mask, scale=0.3)
        reg.record(module, q[:, :, 4:], k, None, scale=0.3)  # Lq < Lk: plain bottom-right causal
        terms = [
            regularizer_terms(q, k, 2, scale=0.3, causal=False, attn_mask=mask),
            regularizer_terms(q[:, :, 4:], k, 2, scale=0.3),
        ]
        want = sum(t.loss_sum for t in terms) / sum(t.rows for t in terms)
        assert reg.loss.item() == pytest.approx(want.item(), rel=1e-6)
        assert reg.rows == int(sum(t.rows for t in terms).item())
        reg.loss.backward()
        assert q.grad is not None and k.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"k": 0}, "k must be an int >= 1"),
        ({"kind": "entropy"}, "kind must be one of"),
        ({"lam": -1.0}, "lam must be a finite number >= 0"),
        ({"lam": float("inf")}, "lam must be a finite number >= 0"),
        ({"warmup": -2}, "warmup must be an int >= 0"),
        ({"dense_layers": ["a"]}, "dense_layers must be an iterable"),
        ({"backend": "gpu"}, "backend must be one of"),
    ],
    ids=["k", "kind", "lam-negative", "lam-inf", "warmup", "dense-layers", "backend"],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        condensation(tiny_gpt2(), **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        condensation("gpt2", k=3)


def test_trainer_compute_loss_recipe(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from sparse_attention import CondensationTrainer

    model = tiny_gpt2()
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(1, VOCAB, (32, 24), generator=gen)
    data = [{"input_ids": w, "labels": w} for w in windows]
    _, mass_before = eager_regularizer(model, windows[:8], None, 3, layers=[0, 1])
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2, report_to=[],
        lr_scheduler_type="constant", use_cpu=True, save_strategy="no", logging_steps=100, disable_tqdm=True,
    )  # fmt: skip
    with condensation(model, k=3, lam=1.0, dense_layers=()) as reg:
        CondensationTrainer(model=model, args=args, train_dataset=data, condensation=reg).train()
        assert reg.step == 7
    _, mass_after = eager_regularizer(model, windows[:8], None, 3, layers=[0, 1])
    assert mass_after > mass_before + 0.1, (mass_before, mass_after)
