"""CondensationTrainer (transformers' Trainer with the condensation regularizer) on two processes equals one process.

Three optimizer steps on a global batch of 4 windows, three of them left-padded so that the two processes hold
different numbers of LM tokens and regularized rows; launched by ``torchrun`` and by ``accelerate launch``, against
the same script run as one plain process. Weights after three AdamW steps (lr 1e-3) agree to ``atol 5e-5``
(measured 3.4e-6; the same run with per-process means of the regularizer, ``process_group=None``, differs by 4.0e-3);
the logged losses to ``rtol 1e-6``.
"""

import pytest
import torch
from sa_distributed import finish, gloo_skip_reason, start, trainer_command

SKIP = gloo_skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process run, started at once and collected when first needed (it overlaps the first launch)."""
    out = tmp_path_factory.mktemp("trainer-single")
    process = start(trainer_command("single", out), out)
    cache = {}

    def result() -> dict:
        if not cache:
            finish(process, "single-process Trainer")
            cache["result"] = torch.load(out / "trainer-1-rank0.pt", weights_only=False)
        return cache["result"]

    yield result
    if process.poll() is None:
        process.kill()


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_equal_one(single, launcher, tmp_path):
    finish(start(trainer_command(launcher, tmp_path), tmp_path), f"Trainer under {launcher}")
    want = single()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"trainer-2-rank{rank}.pt", weights_only=False)
        assert got["world"] == 2 and len(got["logs"]) == len(want["logs"]) == 3
        for name in want["weights"]:
            torch.testing.assert_close(got["weights"][name], want["weights"][name], rtol=0.0, atol=5e-5, msg=name)
        for field in ("loss", "condensation_loss", "topk_mass"):
            torch.testing.assert_close(
                torch.tensor([e[field] for e in got["logs"]]), torch.tensor([e[field] for e in want["logs"]]),
                rtol=1e-6, atol=1e-6, msg=field,
            )  # fmt: skip


def _tiny_run(tmp_path, batch: int, accumulation: int, windows: torch.Tensor):
    from sa_distributed import LAM, K, no_dropout
    from sa_testing import tiny_gpt2
    from transformers import TrainingArguments

    import sparse_attention as sa

    model = no_dropout(tiny_gpt2(n_layer=3))
    args = TrainingArguments(
        output_dir=str(tmp_path / f"b{batch}-g{accumulation}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=2, learning_rate=1e-3, save_strategy="no", report_to=[],
        use_cpu=True, train_sampling_strategy="sequential", disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    data = [{"input_ids": w, "labels": w} for w in windows]
    with sa.condensation(model, K, lam=LAM, dense_layers=(), backend="reference") as reg:
        trainer = sa.CondensationTrainer(model=model, args=args, train_dataset=data, condensation=reg)
        trainer.train()
    logs = [e for e in trainer.state.log_history if "condensation_loss" in e]
    return dict(model.named_parameters()), logs


def test_gradient_accumulation_keeps_the_weight_of_lambda(tmp_path):
    windows = torch.randint(1, 97, (8, 20), generator=torch.Generator().manual_seed(5))
    whole, whole_logs = _tiny_run(tmp_path, 4, 1, windows)
    accumulated, accumulated_logs = _tiny_run(tmp_path, 2, 2, windows)
    for name, p in whole.items():
        torch.testing.assert_close(accumulated[name], p, rtol=0.0, atol=5e-5, msg=name)
    assert [e["condensation_loss"] for e in accumulated_logs] == pytest.approx(
        [e["condensation_loss"] for e in whole_logs], rel=1e-5
    )


def test_condensation_argument_is_checked(tmp_path):
    from sa_testing import tiny_gpt2
    from transformers import TrainingArguments

    import sparse_attention as sa

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    model, other = tiny_gpt2(n_layer=1), tiny_gpt2(n_layer=1)
    with pytest.raises(TypeError, match="condensation must be the Condensation of the model"):
        sa.CondensationTrainer(model=model, args=args, condensation=None)
    with sa.condensation(other, 4) as reg, pytest.raises(ValueError, match="regularizes another model"):
        sa.CondensationTrainer(model=model, args=args, condensation=reg)
