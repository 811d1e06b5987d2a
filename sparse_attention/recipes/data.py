"""Data for jobs on a model: text corpora, token streams and token windows.

The default corpus is the Python standard library source of the running interpreter. It is found at run
time and never copied into the repository, and it is split by module (one file = one module) into
``"train"``, ``"calibration"`` and ``"heldout"`` sets with a stable hash of each file's path relative to
the stdlib root. The split therefore does not depend on the machine, the install prefix, the order the
file system lists files in, or ``PYTHONHASHSEED``; a file keeps its split across Python versions as long
as its relative path does not change.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

__all__ = [
    "SPLITS",
    "SPLIT_FRACTIONS",
    "TEXT_SUFFIXES",
    "batches",
    "PROSE_SPLITS",
    "load_texts",
    "prose_texts",
    "read_texts",
    "split_of",
    "stdlib_files",
    "stdlib_root",
    "stdlib_texts",
    "token_stream",
    "token_windows",
]

SPLITS: tuple[str, ...] = ("train", "calibration", "heldout")
"""Names accepted by :func:`stdlib_files`, in hash-bucket order."""

SPLIT_FRACTIONS: dict[str, float] = {"train": 0.90, "calibration": 0.05, "heldout": 0.05}
"""Target share of stdlib modules in each split (the realised shares vary by a few points)."""

# Directory names that hold tests, installed third-party code, bundled wheels, build configuration or
# generated data rather than library source; they would skew a "Python library code" corpus.
_EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "testdata",
        "lib-dynload",
        "pydoc_data",
        "_bundled",
    }
)
# ``config-3.11-x86_64-linux-gnu`` and friends hold the interpreter's build files, not library code.
_EXCLUDED_DIR_PREFIXES = ("config-",)

TEXT_SUFFIXES: frozenset[str] = frozenset(
    {".py", ".pyi", ".txt", ".md", ".rst", ".json", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".c", ".h", ".csv"}
)
"""File suffixes :func:`load_texts` reads when given a directory."""

_HASH_BUCKETS = 10_000


def stdlib_root() -> Path:
    """Return the directory holding the running interpreter's pure-Python standard library.

    Returns:
        ``Path(sysconfig.get_paths()["stdlib"])``; inside a virtual environment this is the base
        interpreter's library, not the environment's.

    Raises:
        ValueError: if that directory does not exist (a stripped or frozen interpreter).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"the Python standard library directory {root} does not exist on this interpreter")
    return root


def _is_excluded_dir(name: str) -> bool:
    return name in _EXCLUDED_DIRS or name.startswith(_EXCLUDED_DIR_PREFIXES)


def split_of(relative_path: str | os.PathLike[str]) -> str:
    """Return the split a stdlib module belongs to.

    The split is chosen from the SHA-1 of the POSIX form of ``relative_path`` (for example
    ``"json/decoder.py"``), so it is the same on every machine and in every process.

    Args:
        relative_path: path of the module relative to :func:`stdlib_root`.

    Returns:
        One of :data:`SPLITS`.
    """
    key = Path(relative_path).as_posix().encode("utf-8")
    bucket = int.from_bytes(hashlib.sha1(key).digest()[:8], "big") % _HASH_BUCKETS
    upper = 0.0
    for name in SPLITS:
        upper += SPLIT_FRACTIONS[name] * _HASH_BUCKETS
        if bucket < round(upper):
            return name
    return SPLITS[-1]


def stdlib_files(split: str | None = None) -> list[Path]:
    """List the standard library's ``*.py`` modules, optionally restricted to one split.

    Files under ``site-packages``, test directories (``test``, ``tests``, ``idlelib/idle_test``, ...),
    ``__pycache__``, ``pydoc_data`` and the build ``config-*`` directory are left out.

    Args:
        split: ``"train"``, ``"calibration"``, ``"heldout"``, or ``None`` (default) for every module.

    Returns:
        Absolute paths, sorted by their POSIX path relative to :func:`stdlib_root`, so the order is the
        same on every run. The splits are disjoint and together cover ``stdlib_files(None)``.

    Raises:
        ValueError: if ``split`` is not one of the names above, or the stdlib directory is missing.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} or None")
    root = stdlib_root()
    found: list[tuple[str, Path]] = []
    # os.walk lets excluded directories be pruned before they are read: Lib/test alone holds more files
    # than the rest of the library.
    for directory, subdirectories, filenames in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if not _is_excluded_dir(name)]
        for filename in filenames:
            if not filename.endswith(".py"):
                continue
            path = Path(directory, filename)
            relative = path.relative_to(root)
            if split is None or split_of(relative) == split:
                found.append((relative.as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def read_texts(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Read files as UTF-8 text, skipping the ones that cannot be read.

    Args:
        paths: files to read, in the order wanted.

    Returns:
        One string per readable, non-empty file, in input order. Files that are missing, unreadable,
        not valid UTF-8, or empty are skipped silently (the stdlib ships a few Latin-1 test fixtures).
    """
    texts: list[str] = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text:
            texts.append(text)
    return texts


def _text_files_under(directory: Path) -> list[Path]:
    files = [
        path
        for path in directory.rglob("*")
        if path.is_file()
        and path.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(directory).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def load_texts(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Load text from a file, a directory, or a list of files and directories.

    A directory contributes every file under it (recursively) whose suffix is in :data:`TEXT_SUFFIXES`
    (``.py``, ``.txt``, ``.md``, ...), sorted by relative path, skipping hidden entries and
    ``__pycache__``. A file named directly is read whatever its suffix.

    Args:
        source: a path, or a list or tuple of paths.

    Returns:
        One string per non-empty file that decodes as UTF-8, in a deterministic order.

    Raises:
        ValueError: if ``source`` is an empty list, a path does not exist, a file named directly is not
            UTF-8 text or cannot be read, or nothing non-empty was found in total.
    """
    if isinstance(source, (str, os.PathLike)):
        sources: list[str | os.PathLike[str]] = [source]
    else:
        sources = list(source)
        if not sources:
            raise ValueError("load_texts got an empty list of paths")
    texts: list[str] = []
    for item in sources:
        path = Path(item)
        if path.is_dir():
            texts.extend(read_texts(_text_files_under(path)))
        elif path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path} is not UTF-8 text: {error}") from None
            except OSError as error:
                raise ValueError(f"cannot read {path}: {error}") from None
            if text:
                texts.append(text)
        else:
            raise ValueError(f"text source {path} does not exist")
    if not texts:
        raise ValueError(f"no non-empty UTF-8 text found in {', '.join(str(Path(s)) for s in sources)}")
    return texts


def stdlib_texts(split: str | None = None) -> list[str]:
    """The text of the standard library modules of one split (see :func:`stdlib_files`), in a stable order."""
    return read_texts(stdlib_files(split))


PROSE_SPLITS: tuple[str, ...] = ("calibration", "heldout")
"""Names accepted by :func:`prose_texts`."""


def prose_texts(split: str) -> list[str]:
    """English prose that every interpreter ships: the topics of the Python documentation in ``pydoc_data``.

    ``pydoc_data.topics.topics`` maps topic names (``"assert"``, ``"lambda"``, ...) to the text of that section of
    the language reference, as ``help()`` shows it. It is left out of the code corpus (:func:`stdlib_files`), so it
    is a second domain for cross-domain calibration. Topics are split by a SHA-1 of their name, half to
    ``"calibration"`` and half to ``"heldout"``, and returned sorted by name: the same texts on every machine.

    Raises:
        ValueError: an unknown split, or an interpreter without ``pydoc_data`` (a stripped install).
    """
    if split not in PROSE_SPLITS:
        raise ValueError(f"unknown prose split {split!r}; expected one of {', '.join(PROSE_SPLITS)}")
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ValueError("this Python has no pydoc_data (the documentation topics): no prose corpus") from None
    names = sorted(topics)
    chosen = [
        name
        for name in names
        if (int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16) % 2 == 0) == (split == "calibration")
    ]
    return [topics[name] for name in chosen if topics[name].strip()]


def token_stream(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Concatenate the token ids of ``texts``, each document followed by the tokenizer's eos token (when it has one),
    as a 1-D int64 tensor. The one tokenise-with-eos helper of the package (training, evaluation, pretraining)."""
    if tokenizer is None:
        raise ValueError("text needs a tokenizer to become tokens; got tokenizer=None")
    if isinstance(texts, str):
        texts = [texts]
    eos = getattr(tokenizer, "eos_token_id", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ids: list[int] = []
    if backend is not None:
        encodings = [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    else:
        encodings = [tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] for text in texts]
    for enc in encodings:
        ids.extend(enc)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def token_windows(tokenizer, texts: Sequence[str], seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Tokenise ``texts`` (:func:`token_stream`) and cut non-overlapping windows ``[N, seq_len]``.

    When there are more than ``max_windows`` windows, evenly spaced ones are kept (deterministic).

    Raises:
        ValueError: ``seq_len < 2``, ``max_windows < 1``, or text too short for one window.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if max_windows is not None and (
        isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1
    ):
        raise ValueError(f"max_windows must be an int >= 1 or None, got {max_windows!r}")
    ids = token_stream(tokenizer, texts)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * seq_len].view(n, seq_len)
    if max_windows is not None and n > max_windows:
        windows = windows[torch.linspace(0, n - 1, max_windows).round().long()]
    return windows


def batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``windows [N, L]`` in consecutive batches of at most ``batch_size`` rows."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]
