"""Tests of sparse_attention.recipes.training.finetune on a tiny random GPT-2 (no download, CPU, reference backend)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sparse_attention.recipes.training import StepLog, finetune

VOCAB = 64
K = 4


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def markov_stream(n, seed=0):
    """Tokens of a random Markov chain where each token has three equally likely successors: learnable structure."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, VOCAB, (VOCAB, 3), generator=gen)
    choices = torch.randint(0, 3, (n,), generator=gen)
    tokens = [0]
    for i in range(n - 1):
        tokens.append(int(successors[tokens[-1], choices[i]]))
    return torch.tensor(tokens)


def measure(model, windows):
    """``(mean top-k attention mass over rows with more than K keys, LM loss)`` from eager attention probabilities."""
    model.eval()
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(input_ids=windows, labels=windows, output_attentions=True)
    model.set_attn_implementation(previous)
    mass = torch.cat([a.topk(K, -1).values.sum(-1)[:, :, K:].flatten() for a in out.attentions])
    return mass.mean().item(), out.loss.item()


@pytest.fixture(scope="module")
def stream():
    return markov_stream(12_000)


@pytest.fixture(scope="module")
def heldout():
    gen = torch.Generator().manual_seed(1)
    data = markov_stream(4_000, seed=0)  # same chain, other windows
    return data[torch.randint(0, len(data) - 32, (16, 1), generator=gen) + torch.arange(32)]


def test_regularizer_condenses_attention_while_lm_loss_falls(stream, heldout):
    runs = {}
    for lam in (0.0, 0.5):
        model = tiny_gpt2()
        before = measure(model, heldout)
        history = finetune(
            model, None, stream, k=K, lam=lam, steps=40, lr=3e-3, batch_size=8, seq_len=32, dense_layers=(),
            backend="reference", progress=False,
        )  # fmt: skip
        runs[lam] = (before, measure(model, heldout), history)
    (mass0, lm0), (plain_mass, plain_lm), plain_history = runs[0.0]
    _, (reg_mass, reg_lm), reg_history = runs[0.5]
    # The regularizer condenses attention far beyond what LM training alone does...
    assert reg_mass > mass0 + 0.3, (mass0, reg_mass)
    assert reg_mass > plain_mass + 0.3, (plain_mass, reg_mass)
    # ... and the LM still learns: held-out loss falls well below the uniform guess ln(64) = 4.16.
    assert lm0 > 4.0
    assert reg_lm < lm0 - 1.0 and plain_lm < lm0 - 1.0, (lm0, plain_lm, reg_lm)
    # The per-step history tells the same story on the training batches (means of the first and last five steps).
    first, last = reg_history[:5], reg_history[-5:]

    def mean(steps, field):
        return sum(getattr(s, field) for s in steps) / len(steps)

    assert mean(last, "lm_loss") < mean(first, "lm_loss") - 0.8
    assert mean(last, "topk_mass") > mean(first, "topk_mass") + 0.3
    assert mean(last, "reg_loss") < 0.5 * mean(first, "reg_loss")
    # The history's mass, measured by the regularizer during training, agrees with the eager measurement at the start.
    assert reg_history[0].topk_mass == pytest.approx(measure(tiny_gpt2(), stream[:256].view(8, 32))[0], abs=0.05)
    assert all(s.lam == 0.0 for s in plain_history) and all(s.lam == 0.5 for s in reg_history)


def test_windows_tensor_log_callback_and_warmup():
    windows = markov_stream(2_000).view(-1, 40)
    seen = []
    history = finetune(
        tiny_gpt2(), None, windows, k=K, lam=1.0, warmup=4, steps=5, lr=1e-3, batch_size=4, seq_len=32,
        dense_layers=(), progress=False, log=seen.append,
    )  # fmt: skip
    assert seen == history and len(history) == 5
    assert [s.step for s in history] == list(range(5))
    assert [s.lam for s in history] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert all(isinstance(s, StepLog) and math.isfinite(s.lm_loss) and 0 < s.topk_mass < 1 for s in history)
    assert "lm_loss" in history[0].to_dict() and str(history[0]).startswith("step 1: lm_loss")


def test_text_with_a_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["def", "return", "x", "y", "(", ")", ":", "+", "if", "else", "[UNK]", "[EOS]"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")
    texts = ["def ( x ) : return x + y", "if x : return y else : return x"] * 20
    history = finetune(tiny_gpt2(), tokenizer, texts, k=2, lam=0.1, steps=2, batch_size=2, seq_len=16, progress=True)
    assert len(history) == 2
    # The default dense layers (0, 1) are this model's only layers: nothing is regularized.
    assert all(math.isnan(s.topk_mass) and s.reg_loss == 0.0 for s in history)


@pytest.mark.parametrize(
    ("data", "kwargs", "pattern"),
    [
        ("some text", {}, "text needs a tokenizer"),
        (torch.arange(20), {"seq_len": 32}, "the token stream has 20 tokens"),
        (torch.zeros(4, 16, dtype=torch.long), {"seq_len": 32}, "shorter than seq_len=32"),
        (torch.rand(100), {}, "data must be a 1-D token stream"),
        (torch.arange(100), {"steps": 0}, "steps must be an int >= 1"),
        (torch.arange(100), {"batch_size": 0}, "batch_size must be an int >= 1"),
        (torch.arange(100), {"lr": 0.0}, "lr must be a finite number > 0"),
        (torch.arange(100), {"k": 0}, "k must be an int >= 1"),
        (torch.arange(100), {"lam": -1.0}, "lam must be a finite number >= 0"),
    ],
    ids=[
        "text-no-tokenizer",
        "stream-too-short",
        "windows-too-short",
        "float-data",
        "steps",
        "batch",
        "lr",
        "k",
        "lam",
    ],
)
def test_bad_arguments(data, kwargs, pattern):
    args = {"seq_len": 16, "steps": 1, "progress": False} | kwargs
    with pytest.raises(ValueError, match=pattern):
        finetune(tiny_gpt2(), None, data, **args)
