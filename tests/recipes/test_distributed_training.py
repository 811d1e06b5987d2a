"""Condensation fine-tuning on two processes (gloo, CPU) equals one process on the global batch.

The global batch has 3 windows (shares of 2 and 1), the last left-padded, so the ranks hold different numbers of LM
tokens and regularized rows: per-rank means would weigh them wrongly (checked below to make a difference), the
global normalisation (``num_items_in_batch`` for the LM loss, the all-reduced row count for ``reg.loss``) is exact.
Dropout is off (a data-parallel run draws other masks).

Tolerances (float32): one step's losses to ``rtol 1e-6``, gradients to ``atol 1e-6, rtol 1e-5`` (measured max abs
difference 3.0e-8); weights after three AdamW steps (lr 1e-3, so each weight moves at most 3e-3) to ``atol 5e-5``
(measured 3.3e-6: AdamW divides by the root of the squared gradient, which magnifies the all-reduce's rounding in
weights with gradients near zero).
"""

import pytest
import torch
from sa_distributed import gloo_skip_reason, run_scenario

SKIP = gloo_skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

LOSS = dict(rtol=1e-6, atol=1e-6)
GRAD = dict(rtol=1e-5, atol=1e-6)
WEIGHT = dict(rtol=0.0, atol=5e-5)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_scenario("training", tmp_path_factory.mktemp("training"))


def assert_tensors_close(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name, **tol)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"], ids=["DDP", "FSDP2-fully_shard"])
def test_one_step_loss_and_gradients_equal_one_process(ranks, engine):
    assert "fsdp_error" not in ranks[0], ranks[0].get("fsdp_error")
    single = ranks[0]["single"]
    for rank in ranks:
        # [LM loss, R, total], each the global batch's mean.
        torch.testing.assert_close(rank[engine]["losses"], single["losses"], **LOSS)
        assert_tensors_close(rank[engine]["grads"], single["grads"], **GRAD)


def test_per_rank_means_would_not_equal_one_process(ranks):
    # The same DDP step with each rank's own means: the gradients are visibly off, so the test above can fail.
    single = ranks[0]["single"]["grads"]
    naive = ranks[0]["ddp_per_rank_means"]["grads"]
    assert max(float((naive[n] - single[n]).abs().max()) for n in single) > 1e-2


def test_fsdp2_adamw_steps_equal_one_process(ranks):
    assert "fsdp_error" not in ranks[0], ranks[0].get("fsdp_error")
    single = ranks[0]["single_steps"]
    for rank in ranks:
        torch.testing.assert_close(torch.tensor(rank["fsdp_steps"]["history"]), torch.tensor(single["history"]), **LOSS)
        assert_tensors_close(rank["fsdp_steps"]["weights"], single["weights"], **WEIGHT)


def test_finetune_under_ddp_equals_one_process(ranks):
    single = ranks[0]["single_finetune"]
    fields = ("lm_loss", "reg_loss", "topk_mass", "lam")
    want = torch.tensor([[step[f] for f in fields] for step in single["history"]], dtype=torch.float64)
    for rank in ranks:
        got = torch.tensor([[step[f] for f in fields] for step in rank["finetune"]["history"]], dtype=torch.float64)
        torch.testing.assert_close(got, want, **LOSS)
        assert_tensors_close(rank["finetune"]["weights"], single["weights"], **WEIGHT)
    # DDP keeps the replicas identical.
    assert_tensors_close(ranks[1]["finetune"]["weights"], ranks[0]["finetune"]["weights"], rtol=0.0, atol=0.0)
    # Training moved the weights by far more than the tolerance.
    initial = ranks[0]["initial"]
    moved = max(float((single["weights"][n] - initial[n]).abs().max()) for n in initial)
    assert moved > 20 * WEIGHT["atol"], moved


def test_finetune_with_distillation_under_ddp_equals_one_process(ranks):
    single = ranks[0]["single_finetune_distill"]
    fields = ("lm_loss", "kl", "reg_loss", "topk_mass", "lam")
    want = torch.tensor([[step[f] for f in fields] for step in single["history"]], dtype=torch.float64)
    assert want[1:, 1].min() > 0  # the student left the teacher: the KL term is live after the first step
    for rank in ranks:
        history = rank["finetune_distill"]["history"]
        got = torch.tensor([[step[f] for f in fields] for step in history], dtype=torch.float64)
        torch.testing.assert_close(got, want, **LOSS)
        assert_tensors_close(rank["finetune_distill"]["weights"], single["weights"], **WEIGHT)


def test_finetune_refuses_fewer_windows_than_processes(ranks):
    assert ranks[0]["one_window_for_two"] == "batch_size=1 windows per step cannot be shared out to 2 processes"


def test_finetune_bad_process_group():
    from sparse_attention.recipes.training import finetune

    with pytest.raises(ValueError, match="process_group must be"):
        finetune(torch.nn.Linear(1, 1), None, torch.arange(100), steps=1, process_group="everyone")
