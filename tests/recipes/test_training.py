"""Tests of sparse_attention.recipes.training.finetune on a tiny random GPT-2 (no download, CPU, reference backend)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sparse_attention.recipes.training import StepLog, distillation_loss, finetune

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


def test_distillation_loss_is_the_kl_divergence():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen) * 2
    got = distillation_loss(student, teacher)
    # Written out in float64, position by position: Σ_v p_t(v) (log p_t(v) - log p_s(v)).
    total = 0.0
    for row_s, row_t in zip(student.double().reshape(-1, 7), teacher.double().reshape(-1, 7), strict=True):
        p_t = [math.exp(x) for x in row_t.tolist()]
        z_t, z_s = sum(p_t), sum(math.exp(x) for x in row_s.tolist())
        total += sum(
            (p / z_t) * (math.log(p / z_t) - (s - math.log(z_s))) for p, s in zip(p_t, row_s.tolist(), strict=True)
        )
    assert got.item() == pytest.approx(total / 6, rel=1e-5)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(student.float(), teacher).dtype == torch.float32
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_loss(student, teacher[..., :5])


def test_distillation_gradient_flows_into_the_student_only():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(4, 9, generator=gen, requires_grad=True)
    teacher = torch.randn(4, 9, generator=gen, requires_grad=True)
    distillation_loss(student, teacher).backward()
    assert teacher.grad is None
    # d KL / d student logits = (p_s - p_t) / positions.
    want = (torch.softmax(student, -1) - torch.softmax(teacher, -1)).detach() / 4
    torch.testing.assert_close(student.grad, want, rtol=1e-5, atol=1e-7)


def test_finetune_distills_the_teacher_and_leaves_it_untouched(stream):
    model, teacher = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    history = finetune(
        model, None, stream, k=K, lam=0.0, steps=25, lr=3e-3, batch_size=8, seq_len=32, dense_layers=(),
        backend="reference", progress=False, distill=1.0, teacher=teacher,
    )  # fmt: skip
    # The student moves towards the teacher: the KL falls by more than half ...
    first, last = history[0].kl, sum(s.kl for s in history[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    # ... and the teacher neither changes nor collects gradients.
    for name, p in teacher.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None and not p.requires_grad, name
    assert not teacher.training
    # The logged KL is the distillation term of the teacher's logits on the same kind of windows.
    windows = stream[:256].view(8, 32)
    with torch.no_grad():
        direct = distillation_loss(model(input_ids=windows).logits[:, :-1], teacher(input_ids=windows).logits[:, :-1])
    assert direct.item() == pytest.approx(last, rel=0.5)


def test_default_teacher_is_the_model_before_training(stream):
    model = tiny_gpt2(seed=0)
    history = finetune(
        model, None, stream, k=K, lam=0.5, steps=3, lr=1e-3, batch_size=4, seq_len=32, dense_layers=(),
        backend="reference", progress=False, distill=0.5,
    )  # fmt: skip
    # The first step's student is the teacher itself: KL zero up to rounding (different attention code paths).
    assert history[0].kl == pytest.approx(0.0, abs=1e-6)
    assert all(s.kl is not None and s.kl >= 0 for s in history) and history[-1].kl > history[0].kl
    plain = finetune(tiny_gpt2(), None, stream, k=K, lam=0.0, steps=1, seq_len=32, progress=False, dense_layers=())
    assert plain[0].kl is None and "kl" not in str(plain[0])


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"distill": 1.5}, r"distill must be a number in \[0, 1\]"),
        ({"distill": -0.1}, r"distill must be a number in \[0, 1\]"),
        ({"teacher": "model"}, "a teacher was given with distill=0"),
        ({"teacher": "self", "distill": 1.0}, "must be a separate, frozen model"),
    ],
    ids=["distill-above-1", "distill-negative", "teacher-without-distill", "teacher-is-model"],
)
def test_bad_distillation_arguments(kwargs, pattern):
    model = tiny_gpt2()
    if "teacher" in kwargs:
        kwargs = kwargs | {"teacher": model if kwargs["teacher"] == "self" else tiny_gpt2(seed=1)}
    with pytest.raises(ValueError, match=pattern):
        finetune(model, None, torch.arange(100), seq_len=16, steps=1, progress=False, **kwargs)
