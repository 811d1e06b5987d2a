"""The file rule (ops/files.py): atomic files, whole-folder swaps, no temporaries left, foreign targets refused."""

import json
import os
import stat

import pytest

from sparse_attention.ops import files
from sparse_attention.ops.files import (
    TargetError,
    check_target,
    is_checkpoint_folder,
    is_report_folder,
    write_file,
    write_folder,
    write_text,
)


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def _never(path):
    return False


# ---- write_file -----------------------------------------------------------------------------------------------


def test_write_file_replaces_atomically(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "old")

    def torn(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_file(target, torn)
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["a.txt"]
    write_text(target, "new")
    assert target.read_text() == "new" and _names(tmp_path) == ["a.txt"]


def test_write_file_interrupted_leaves_the_old_file(tmp_path):
    target = write_text(tmp_path / "a.txt", "old")

    def interrupted(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_file(target, interrupted)
    assert target.read_text() == "old" and _names(tmp_path) == ["a.txt"]


def test_written_files_get_the_usual_permissions(tmp_path):
    # mkstemp creates 0600 files; what the package writes must be readable like any file open() creates.
    mask = os.umask(0o022)
    try:
        path = write_text(tmp_path / "a.txt", "x")
        folder = write_folder(tmp_path / "d", lambda tmp: (tmp / "f").write_text("x"))
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


# ---- write_folder ---------------------------------------------------------------------------------------------


def test_write_folder_replaces_the_whole_folder(tmp_path):
    target = tmp_path / "ckpt"
    write_folder(target, lambda tmp: [(tmp / "a").write_text("1"), (tmp / "stale").write_text("s")])
    write_folder(target, lambda tmp: (tmp / "a").write_text("2"))
    assert _names(target) == ["a"] and (target / "a").read_text() == "2"
    assert _names(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_write_folder_failing_midway_leaves_the_old_folder(tmp_path, error):
    target = tmp_path / "ckpt"
    write_folder(target, lambda tmp: [(tmp / "config.json").write_text("old"), (tmp / "w").write_text("old")])

    def midway(tmp):
        (tmp / "config.json").write_text("new")
        raise error

    with pytest.raises(type(error)):
        write_folder(target, midway)
    assert (target / "config.json").read_text() == "old" and (target / "w").read_text() == "old"
    assert _names(tmp_path) == ["ckpt"]  # no temporary folder left behind


def test_write_folder_that_writes_nothing_fails(tmp_path):
    target = tmp_path / "ckpt"
    write_folder(target, lambda tmp: (tmp / "a").write_text("1"))
    with pytest.raises(OSError, match="nothing was written"):
        write_folder(target, lambda tmp: None)
    assert _names(target) == ["a"] and _names(tmp_path) == ["ckpt"]


def test_write_folder_restores_the_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    write_folder(target, lambda tmp: (tmp / "a").write_text("old"))
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old folder went aside; moving the new one in fails
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        write_folder(target, lambda tmp: (tmp / "a").write_text("new"))
    monkeypatch.undo()
    assert (target / "a").read_text() == "old" and _names(tmp_path) == ["ckpt"]


# ---- check_target ---------------------------------------------------------------------------------------------


def test_check_target_refuses_what_the_package_did_not_write(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    with pytest.raises(TargetError, match="not a thresholds file written by sparse_attention"):
        check_target(notes, folder=False, ours=_never, what="thresholds file")
    assert check_target(notes, folder=False, ours=_never, what="thresholds file", overwrite=True) == notes
    assert check_target(notes, folder=False, ours=lambda p: True, what="thresholds file") == notes
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "mine.txt").write_text("x")
    with pytest.raises(TargetError, match="replaces the whole folder"):
        check_target(folder, folder=True, ours=_never, what="report")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_target(empty, folder=True, ours=_never, what="report") == empty
    assert notes.read_text() == "precious" and (folder / "mine.txt").read_text() == "x"


def test_check_target_refuses_a_file_for_a_folder_and_the_reverse(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(TargetError, match="is a file, not a folder"):
        check_target(a_file, folder=True, ours=_never, what="checkpoint", overwrite=True)
    with pytest.raises(TargetError, match="is a folder"):
        check_target(tmp_path, folder=False, ours=_never, what="thresholds file", overwrite=True)
    with pytest.raises(TargetError, match="is a file"):
        check_target(a_file / "sub" / "report", folder=True, ours=_never, what="report")


def test_check_target_has_no_side_effects(tmp_path):
    target = tmp_path / "a" / "b" / "report"
    assert check_target(target, folder=True, ours=_never, what="report") == target
    assert _names(tmp_path) == []  # missing parents are created when writing, not when checking
    write_folder(target, lambda tmp: (tmp / "report.json").write_text("{}"))
    assert (target / "report.json").is_file()


# ---- what "written by the package" means ---------------------------------------------------------------------


def _report(folder, command="sparse-attention demo --k 8", extra=()):
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"command": command, "records": []}))
    for name in extra:
        (folder / name).write_text("x")
    return folder


def test_report_folders(tmp_path):
    assert is_report_folder(_report(tmp_path / "ok", extra=["report.png"]))
    assert not is_report_folder(_report(tmp_path / "foreign-command", command="other-tool run"))
    assert not is_report_folder(_report(tmp_path / "with-notes", extra=["notes.md"]))  # a swap would delete notes.md
    bad = tmp_path / "not-json"
    bad.mkdir()
    (bad / "report.json").write_text("{")
    assert not is_report_folder(bad)
    assert not is_report_folder(tmp_path / "missing")


def test_checkpoint_folders(tmp_path):
    configured = tmp_path / "configured"
    configured.mkdir()
    (configured / "config.json").write_text(json.dumps({"model_type": "gpt2", "top_theta": {"thresholds": None}}))
    assert is_checkpoint_folder(configured)
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (trained / "train_log.json").write_text(json.dumps({"command": "sparse-attention train --k 4", "steps": []}))
    assert is_checkpoint_folder(trained)
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    (pretrained / "MODEL_CARD.md").write_text(files.MODEL_CARD_TITLE + "\n\nA small GPT-2 ...")
    assert is_checkpoint_folder(pretrained)
    with_notes = tmp_path / "with-notes"
    with_notes.mkdir()
    (with_notes / "config.json").write_text(json.dumps({"model_type": "gpt2", "top_theta": None}))
    (with_notes / "README.md").write_text("my notes")  # a swap would delete it
    assert not is_checkpoint_folder(with_notes)
    plain = tmp_path / "plain-hf"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (plain / "train_log.json").write_text(json.dumps({"command": "someone else's trainer", "steps": []}))
    assert not is_checkpoint_folder(plain)
    assert not is_checkpoint_folder(tmp_path / "missing")
