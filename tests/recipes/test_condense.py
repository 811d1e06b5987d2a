"""The condensation recipe: its defaults are the shipped checkpoint's, and its checkpoint is written whole."""

import json

import pytest
import torch
from sa_testing import tiny_gpt2

from sparse_attention.recipes import condense
from sparse_attention.recipes.default_model import CONDENSED_MODEL_DIR, DEFAULT_MODEL_DIR
from sparse_attention.recipes.training import StepLog


def test_the_default_recipe_is_the_shipped_checkpoints():
    log = json.loads((CONDENSED_MODEL_DIR / "train_log.json").read_text(encoding="utf-8"))
    assert log["recipe"] == condense.RECIPE.to_dict()
    assert condense.recipe_of(condense.parse_args([])) == condense.RECIPE
    changed = condense.recipe_of(condense.parse_args(["--k", "4", "--lam", "0.1", "--distill", "0"]))
    assert (changed.k, changed.lam, changed.distill, changed.steps) == (4, 0.1, 0.0, condense.RECIPE.steps)


def _facts() -> dict:
    history = [StepLog(step=i, lm_loss=4.0 - i, reg_loss=1.0, topk_mass=0.5, lam=0.3, seconds=0.1, kl=0.01)
               for i in range(3)]  # fmt: skip
    return {
        "recipe": condense.RECIPE.to_dict(), "regularized_layers": [2], "tokens_seen": 6144, "train_seconds": 1.5,
        "device": "cpu", "torch": torch.__version__, "transformers": "x", "commit": "abc", "date": "2026-12-01",
        "command": "python -m sparse_attention.recipes.condense", "train": condense.summarize(history),
        "heldout_ppl": 99.5, "original_heldout_ppl": 100.25, "eval_windows": 3, "eval_context": 512,
        "eval_tokens": 1533, "mass_windows": 2, "heldout_topk_mass": 0.75, "original_heldout_topk_mass": 0.25,
    }, history  # fmt: skip


def test_save_checkpoint_copies_the_tokenizer_and_writes_log_and_card(tmp_path):
    facts, history = _facts()
    out = condense.save_checkpoint(tmp_path / "ckpt", tiny_gpt2(), DEFAULT_MODEL_DIR, facts, history)
    for name in condense.TOKENIZER_FILES:
        assert (out / name).read_bytes() == (DEFAULT_MODEL_DIR / name).read_bytes(), name
    log = json.loads((out / "train_log.json").read_text(encoding="utf-8"))
    assert [s["lm_loss"] for s in log["steps"]] == [4.0, 3.0, 2.0] and log["heldout_ppl"] == 99.5
    card = (out / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "Held-out perplexity (dense attention): 99.500; the default model's, measured the same way: 100.250" in card
    assert f"k = {condense.RECIPE.k}, λ = {condense.RECIPE.lam}" in card and "0.750 (the default model: 0.250)" in card
    # Written again over its own checkpoint; a folder it did not write is refused and left alone.
    condense.save_checkpoint(out, tiny_gpt2(), DEFAULT_MODEL_DIR, facts, history)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a condensed checkpoint written by"):
        condense.save_checkpoint(foreign, tiny_gpt2(), DEFAULT_MODEL_DIR, facts, history)
    assert [p.name for p in foreign.iterdir()] == ["mine.txt"]
