"""One rule for every file the package writes: a good result is never replaced by a half-written or mismatched one,
and nothing the package did not write is overwritten unless the caller says ``overwrite=True``.

- A file is written to a temporary file beside its target and renamed over it (:func:`write_file`): readers see the
  old file or the new one, never a torn one.
- A folder (a checkpoint, a report) is written into a temporary folder beside its target and swapped in as a whole
  (:func:`write_folder`): the old folder is renamed aside, the new one renamed into place, then the old one removed.
  If writing fails, the target is untouched.
- :func:`check_target` is called before any long job: a target that exists and was not written by the package (as
  told by the ``ours`` predicate) is refused, as is a file where a folder is expected and the reverse.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


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
            raise TargetError(f"{path} is a folder: cannot write the {what} file there")
        if not overwrite and not (folder and not any(path.iterdir())) and not ours(path):
            raise TargetError(
                f"{path} exists and is not a {what} written by sparse_attention; choose another path or pass "
                "overwrite=True (--overwrite)"
            )
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TargetError(f"cannot create the folder {parent} for the {what}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK):
        raise TargetError(f"cannot write the {what} into {parent}: permission denied")
    return path


def write_file(path, write: Callable[[Path], None]) -> Path:
    """Write a file atomically: ``write(tmp)`` fills a temporary file beside ``path``, which is then renamed over it.
    Any exception leaves ``path`` as it was (and removes the temporary)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
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
    ``path``. Any exception leaves ``path`` as it was (and removes the temporary folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
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
        shutil.rmtree(old, ignore_errors=True)
    return path
