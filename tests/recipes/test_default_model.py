"""Tests for sparse_attention.recipes.default_model and the shipped checkpoint under assets/default."""

from __future__ import annotations

import math
import re

import pytest
import torch

from sparse_attention.recipes import data as corpus
from sparse_attention.recipes.default_model import (
    DEFAULT_MODEL_DIR,
    load_default_model,
    load_default_tokenizer,
    load_model_and_tokenizer,
)

ASSET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md")
SNIPPET = (
    'def add(a, b):\n    """Return a + b."""\n\treturn a + b  # sum, café π\n\n\nx = [add(i, 2) for i in range(3)]\n'
)


@pytest.fixture(scope="module")
def model():
    return load_default_model()


@pytest.fixture(scope="module")
def tokenizer():
    return load_default_tokenizer()


def card_perplexity() -> float:
    text = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text(encoding="utf-8")
    match = re.search(r"Held-out perplexity: ([0-9.]+)", text)
    assert match, "MODEL_CARD.md does not state the held-out perplexity"
    return float(match.group(1))


def test_assets_present_and_small():
    for name in ASSET_FILES:
        assert (DEFAULT_MODEL_DIR / name).is_file(), name
    total = sum(path.stat().st_size for path in DEFAULT_MODEL_DIR.iterdir() if path.is_file())
    assert total < 20 * 1024 * 1024


def test_tokenizer_round_trips_python(tokenizer):
    ids = tokenizer(SNIPPET)["input_ids"]
    assert ids and max(ids) < len(tokenizer)
    assert tokenizer.decode(ids) == SNIPPET
    # BPE merges learned on Python code make it several characters per token.
    assert len(ids) < len(SNIPPET) / 2
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"


def test_model_config_matches_tokenizer(model, tokenizer):
    config = model.config
    assert config.model_type == "gpt2"
    assert config.vocab_size == len(tokenizer)
    assert config.n_positions == 512
    assert config.eos_token_id == config.bos_token_id == config.pad_token_id == tokenizer.eos_token_id
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training


def test_logits_finite_with_right_shape(model, tokenizer):
    ids = torch.tensor([tokenizer(SNIPPET)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_full_length_rows_and_attention_implementations_agree(model):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, model.config.n_positions), generator=generator)
    sdpa = load_default_model(attn_implementation="sdpa")
    with torch.no_grad():
        eager_logits = model(input_ids=ids).logits
        sdpa_logits = sdpa(input_ids=ids).logits
    assert torch.isfinite(eager_logits).all()
    torch.testing.assert_close(sdpa_logits, eager_logits, atol=1e-4, rtol=1e-4)


def test_float16_load(model):
    # Half precision matmuls are slow on CPU, so a short sequence is enough to check the dtype path.
    ids = torch.arange(32).unsqueeze(0)
    half = load_default_model(dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16
    with torch.no_grad():
        half_logits = half(input_ids=ids).logits
        full_logits = model(input_ids=ids).logits
    assert half_logits.dtype == torch.float16
    torch.testing.assert_close(half_logits.float(), full_logits, atol=0.1, rtol=0.05)


def test_heldout_loss_shows_the_model_learned(model, tokenizer):
    # Windows from the middle of the first held-out modules: code the model never trained on.
    windows = []
    for path in corpus.stdlib_files("heldout"):
        texts = corpus.read_texts([path])
        if not texts:
            continue
        ids = tokenizer.backend_tokenizer.encode(texts[0]).ids
        if len(ids) >= 256:
            middle = len(ids) // 2
            windows.append(ids[middle - 64 : middle + 64])
        if len(windows) == 6:
            break
    assert len(windows) == 6
    batch = torch.tensor(windows)
    with torch.no_grad():
        loss = model(input_ids=batch, labels=batch).loss.item()
    perplexity = math.exp(loss)
    vocab = model.config.vocab_size
    # An untrained model scores about log(vocab) nats; the trained one is far below.
    assert perplexity < vocab / 10, perplexity
    # Short windows have less context than the card's 512-token windows and come from another sample of
    # modules (a different Python version splits different files), so allow a wide margin around it.
    assert perplexity < 3 * card_perplexity(), (perplexity, card_perplexity())


def test_load_model_and_tokenizer_from_directory():
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL_DIR, attn_implementation="sdpa")
    assert model.config.vocab_size == len(tokenizer)
    assert not model.training


def test_load_model_and_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="has no config.json"):
        load_model_and_tokenizer(tmp_path)
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_model_and_tokenizer(file)
    with pytest.raises(ValueError, match="empty"):
        load_model_and_tokenizer("")


def test_condensed_model_ships_beside_the_default_and_is_condensed(model, tokenizer):
    from sparse_attention import condensation
    from sparse_attention.recipes.default_model import CONDENSED_MODEL_DIR, load_condensed_model

    for name in (*ASSET_FILES, "train_log.json"):
        assert (CONDENSED_MODEL_DIR / name).is_file(), name
    total = sum(path.stat().st_size for path in CONDENSED_MODEL_DIR.iterdir() if path.is_file())
    assert total < 20 * 1024 * 1024
    condensed = load_condensed_model()
    assert not condensed.training
    assert condensed.config.to_diff_dict() | {"_name_or_path": None} == model.config.to_diff_dict() | {
        "_name_or_path": None
    }
    # Same tokenizer files, other weights.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (CONDENSED_MODEL_DIR / name).read_bytes() == (DEFAULT_MODEL_DIR / name).read_bytes(), name
    assert any(not torch.equal(a, b) for a, b in zip(condensed.parameters(), model.parameters(), strict=True))
    # The card states the recipe of the training log and a held-out perplexity.
    log = __import__("json").loads((CONDENSED_MODEL_DIR / "train_log.json").read_text())
    card = (CONDENSED_MODEL_DIR / "MODEL_CARD.md").read_text(encoding="utf-8")
    recipe = log["recipe"]
    assert f"k = {recipe['k']}, λ = {recipe['lam']}" in card and f"α = {recipe['distill']}" in card
    assert len(log["steps"]) == recipe["steps"]
    assert float(re.search(r"Held-out perplexity \(dense attention\): ([0-9.]+)", card).group(1)) > 1.0
    # Its attention is condensed: the regularized layers put more mass on their top k keys than the default model's.
    ids = corpus.token_windows(tokenizer, corpus.stdlib_texts("heldout"), 128, 2)
    masses = []
    for m in (model, condensed):
        m.train()
        with condensation(m, k=recipe["k"], lam=0.0, dense_layers=recipe["dense_layers"]) as reg, torch.no_grad():
            m(input_ids=ids)
            masses.append(reg.topk_mass)
        m.eval()
    assert masses[1] > masses[0] + 0.1, masses
