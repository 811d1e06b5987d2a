"""The model shipped with the package, and loading of any causal LM with its tokenizer.

The default model is a small GPT-2 (``transformers.GPT2LMHeadModel``) trained from scratch on the Python
standard library by :mod:`sparse_attention.recipes.pretrain`. Its weights and tokenizer are package data
under :data:`DEFAULT_MODEL_DIR`, so it loads with no network access; its ``MODEL_CARD.md`` (in the same
folder) records how it was trained and its held-out perplexity.

Beside it ships the condensed model, :data:`CONDENSED_MODEL_DIR`: the default model fine-tuned with the
attention-condensation regularizer and distillation to the default model
(:mod:`sparse_attention.recipes.condense`), so that Top-θ prunes it harder for the same perplexity. Its
``MODEL_CARD.md`` records the recipe.

``transformers`` is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CONDENSED_MODEL_DIR",
    "DEFAULT_MODEL_DIR",
    "load_condensed_model",
    "load_default_model",
    "load_default_tokenizer",
    "load_model_and_tokenizer",
    "load_model",
    "load_tokenizer",
]

DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "default"
"""Directory of the shipped checkpoint: ``config.json``, ``model.safetensors``, ``tokenizer.json``, ... ."""

CONDENSED_MODEL_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "condensed"
"""Directory of the shipped condensed checkpoint (same files and tokenizer as :data:`DEFAULT_MODEL_DIR`)."""


def _resolve(name_or_path: str | os.PathLike[str]) -> tuple[str, bool]:
    """Return ``(name, is_local)``; raise ``ValueError`` for a local path that is not a model directory."""
    text = os.fspath(name_or_path)
    if not text.strip():
        raise ValueError("model name or path is empty")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json")
        return str(path), True
    if path.exists():
        raise ValueError(f"{path} is a file; expected a model directory or a Hugging Face Hub model id")
    # A Hub id is "name" or "owner/name"; anything else (absolute, ~, ./, several slashes) was meant as a path.
    looks_like_path = (
        path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text or text.endswith("/")
    )
    if looks_like_path:
        raise ValueError(f"model directory {text} does not exist")
    return text, False


def _hub_error(name: str, error: Exception) -> ValueError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(
        f"cannot load {name!r}: no such local directory, and loading it as a Hugging Face Hub id failed ({first_line})"
    )


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local model directory or a Hugging Face Hub id.

    Args:
        name_or_path: a directory holding the tokenizer files, or a Hub id such as ``"gpt2"`` (needs
            network access or a populated Hugging Face cache).

    Returns:
        The ``transformers`` tokenizer (``AutoTokenizer``). When it has no pad token, its eos token is
        used as pad so that batches can be padded.

    Raises:
        ValueError: the path does not exist, is not a model directory, or the Hub id cannot be loaded.
    """
    from transformers import AutoTokenizer

    name, local = _resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as error:
        if local:
            raise ValueError(f"cannot load a tokenizer from {name}: {str(error).strip().splitlines()[0]}") from error
        raise _hub_error(name, error) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike[str],
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Load a causal language model from a local directory or a Hugging Face Hub id, in eval mode.

    Args:
        name_or_path: a directory holding ``config.json`` and the weights, or a Hub id.
        attn_implementation: any name ``transformers`` accepts (``"eager"``, default; ``"sdpa"``; or one
            registered with ``transformers.AttentionInterface``, such as this package's Top-θ backend).
        dtype: parameter dtype, default ``torch.float32``.
        device: where to put the model; ``None`` (default) leaves it on the CPU.

    Returns:
        An ``AutoModelForCausalLM`` instance with ``.eval()`` applied.

    Raises:
        ValueError: the path does not exist, has no ``config.json``, or the Hub id cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    name, local = _resolve(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, attn_implementation=attn_implementation, dtype=dtype, local_files_only=local
        )
    except OSError as error:
        if local:
            raise ValueError(f"cannot load a model from {name}: {str(error).strip().splitlines()[0]}") from error
        raise _hub_error(name, error) from error
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str],
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer; see :func:`load_model` and :func:`load_tokenizer`.

    A local directory is read with ``local_files_only=True`` (never touches the network); any other
    string is treated as a Hugging Face Hub id.

    Returns:
        ``(model, tokenizer)``, the model in eval mode with ``dtype`` parameters on ``device``.

    Raises:
        ValueError: the path does not exist, has no ``config.json``, or the Hub id cannot be loaded.
    """
    tokenizer = load_tokenizer(name_or_path)
    model = load_model(name_or_path, attn_implementation=attn_implementation, dtype=dtype, device=device)
    return model, tokenizer


def _default_dir() -> Path:
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise ValueError(
            f"the default model is missing from {DEFAULT_MODEL_DIR}; the package was installed without its "
            "package data (reinstall it, or run python -m sparse_attention.recipes.pretrain)"
        )
    return DEFAULT_MODEL_DIR


def _condensed_dir() -> Path:
    if not (CONDENSED_MODEL_DIR / "config.json").is_file():
        raise ValueError(
            f"the condensed model is missing from {CONDENSED_MODEL_DIR}; the package was installed without its "
            "package data (reinstall it, or run python -m sparse_attention.recipes.condense)"
        )
    return CONDENSED_MODEL_DIR


def load_default_model(
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Load the shipped GPT-2 from :data:`DEFAULT_MODEL_DIR`, in eval mode, with no network access.

    Args:
        attn_implementation: as in :func:`load_model`; default ``"eager"``.
        dtype: parameter dtype, default ``torch.float32`` (the checkpoint is stored in float32).
        device: where to put the model; ``None`` (default) leaves it on the CPU.

    Returns:
        A ``GPT2LMHeadModel`` (4 layers, 4 heads, ``n_positions`` 512; see ``MODEL_CARD.md``).

    Raises:
        ValueError: the package data is missing.
    """
    return load_model(_default_dir(), attn_implementation=attn_implementation, dtype=dtype, device=device)


def load_default_tokenizer() -> PreTrainedTokenizerBase:
    """Load the shipped byte-level BPE tokenizer from :data:`DEFAULT_MODEL_DIR`.

    Its only special token, ``<|endoftext|>``, is the eos, bos and pad token; ``decode(encode(text))``
    returns ``text`` unchanged.

    Raises:
        ValueError: the package data is missing.
    """
    return load_tokenizer(_default_dir())


def load_condensed_model(
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Load the shipped condensed GPT-2 from :data:`CONDENSED_MODEL_DIR`, in eval mode, with no network access.

    The default model after a condensation fine-tune (its ``MODEL_CARD.md`` gives the recipe); same architecture and
    tokenizer (:func:`load_default_tokenizer`). Arguments as :func:`load_default_model`.

    Raises:
        ValueError: the package data is missing.
    """
    return load_model(_condensed_dir(), attn_implementation=attn_implementation, dtype=dtype, device=device)
