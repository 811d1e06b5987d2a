"""One rule for every file the package writes: a good result is never replaced by a half-written or mismatched one,
and nothing the package did not write is overwritten unless the caller says ``overwrite=True`` (``--overwrite``).

- A file (a thresholds file) is written to a temporary file beside its target and renamed over it
  (:func:`write_file`): readers see the old file or the new one, never a torn one.
- A folder (a checkpoint, a report) is written into a temporary folder beside its target and swapped in as a whole
  (:func:`write_folder`): the old folder is renamed aside, the new one renamed into place, then the old one removed.
  If writing fails, the target is untouched; files of the old folder that the new one does not have are gone after
  a successful swap, so a folder holding anything else (notes, other runs) is only replaced with ``overwrite=True``.
- :func:`check_target` runs before any long job: a target that exists and was not written by the package is
  refused, as is a file where a folder is expected and the reverse.

What "written by the package" means, per kind of target (the ``ours`` predicates):

- a thresholds file: a safetensors file with ``top_theta`` metadata (``ops.thresholds.is_thresholds_file``);
- a report folder (``demo`` / ``evaluate --out``, :func:`is_report_folder`): it holds the command's
  ``report.json`` (a JSON object with ``records`` and a ``command`` starting with ``sparse-attention``) and no file
  other than ``report.json`` and ``report.png``;
- a checkpoint folder (``calibrate --save-model``, ``train --out``, ``recipes.pretrain --out``,
  :func:`is_checkpoint_folder`): a ``config.json`` with a ``top_theta`` entry (a configured checkpoint), the
  ``train_log.json`` of the ``train`` command, or the ``MODEL_CARD.md`` of ``recipes.pretrain``; and no file but
  those a model's and a tokenizer's ``save_pretrained`` write (:data:`CHECKPOINT_FILES`), so that a README or notes
  added to the folder are never deleted by a swap without ``overwrite=True``;
- an empty folder is fair game for any folder target.

Written files get the permissions an ordinary ``open(path, "w")`` would give them (the temporaries are created
private, then widened to the umask's mode before they replace the target).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

REPORT_FILES = ("report.json", "report.png")
# What a checkpoint folder of the package holds: save_pretrained of a model and of a tokenizer, and our own files.
CHECKPOINT_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
    "chat_template.json", "train_log.json", "MODEL_CARD.md",
)  # fmt: skip
TRAIN_LOG = "train_log.json"
MODEL_CARD = "MODEL_CARD.md"
MODEL_CARD_TITLE = "# sparse-attention default model"


class TargetError(ValueError):
    """An output path that cannot or must not be written."""


def check_target(path, *, folder: bool, ours: Callable[[Path], bool], what: str, overwrite: bool = False) -> Path:
    """Check that ``path`` may be written as a ``what`` (a folder when ``folder``, else a file); return it.

    Raises:
        TargetError: the path is a folder where a file is expected (or the reverse), it exists and is not something
            the package wrote (``ours(path)`` is False) and ``overwrite`` is False, or its parent folder cannot be
            created or written.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if folder and not path.is_dir():
            raise TargetError(f"{path} is a file, not a folder: cannot write the {what} there")
        if not folder and path.is_dir():
            raise TargetError(f"{path} is a folder: cannot write the {what} there")
        if not overwrite and not (folder and not any(path.iterdir())) and not ours(path):
            raise TargetError(
                f"{path} exists and is not a {what} written by sparse_attention; choose another path or pass "
                "overwrite=True (--overwrite)" + (", which replaces the whole folder" if folder else "")
            )
    # The nearest existing ancestor must be a writable folder (missing folders are created when writing, not here:
    # a check has no side effects).
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise TargetError(f"cannot create the folder {path.parent} for the {what}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise TargetError(f"cannot write the {what} into {ancestor}: permission denied")
    return path


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _ours_json(path: Path, command: str, *fields: str) -> bool:
    """A JSON object whose ``command`` starts with ``command`` and that has every one of ``fields``."""
    data = _read_json(path)
    return (
        isinstance(data, dict)
        and str(data.get("command", "")).startswith(command)
        and all(name in data for name in fields)
    )


def is_report_folder(path) -> bool:
    """Whether ``path`` is a report folder written by the ``demo`` or ``evaluate`` command (see the module doc)."""
    path = Path(path)
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    if "report.json" not in names or not names <= set(REPORT_FILES):
        return False
    return _ours_json(path / "report.json", "sparse-attention", "records")


def is_checkpoint_folder(path) -> bool:
    """Whether ``path`` is a checkpoint folder written by the package (see the module doc)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if not all(p.is_file() and any(fnmatch.fnmatchcase(p.name, g) for g in CHECKPOINT_FILES) for p in path.iterdir()):
        return False
    config = _read_json(path / "config.json")
    if isinstance(config, dict) and "top_theta" in config:
        return True
    if _ours_json(path / TRAIN_LOG, "sparse-attention train", "steps"):
        return True
    try:
        return (path / MODEL_CARD).read_text(encoding="utf-8").startswith(MODEL_CARD_TITLE)
    except (OSError, ValueError):
        return False


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_file(path, write: Callable[[Path], None]) -> Path:
    """Write a file atomically: ``write(tmp)`` fills a temporary file beside ``path``, which is then renamed over it.
    Any exception (an interrupt included) leaves ``path`` as it was and removes the temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path, text: str) -> Path:
    """:func:`write_file` for UTF-8 text."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_folder(path, write: Callable[[Path], None]) -> Path:
    """Write a folder as a whole: ``write(tmp_dir)`` fills a temporary folder beside ``path``, which then replaces
    ``path``. Any exception (an interrupt included) leaves ``path`` as it was and removes the temporary folder; a
    ``write`` that returns without writing anything raises ``OSError`` (and leaves ``path`` as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        if not any(tmp.iterdir()):
            raise OSError(f"nothing was written for {path}")
        os.chmod(tmp, 0o777 & ~_umask())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists() or path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        old.rmdir()
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return path
