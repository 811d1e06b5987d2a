"""Tests for sparse_attention.recipes.data: the stdlib split and text loading."""

from __future__ import annotations

import pytest

from sparse_attention.recipes import data as corpus


@pytest.fixture(scope="module")
def splits() -> dict[str, list]:
    return {name: corpus.stdlib_files(name) for name in corpus.SPLITS}


def test_stdlib_root_is_the_interpreters_library():
    root = corpus.stdlib_root()
    assert root.is_dir()
    assert (root / "os.py").is_file()


def test_stdlib_files_sorted_and_filtered():
    root = corpus.stdlib_root()
    files = corpus.stdlib_files()
    assert len(files) > 100
    relative = [path.relative_to(root).as_posix() for path in files]
    assert relative == sorted(relative)
    assert "os.py" in relative
    for name in relative:
        assert name.endswith(".py")
        parts = name.split("/")[:-1]
        assert not {"site-packages", "test", "tests", "idle_test", "__pycache__"} & set(parts), name


def test_splits_are_deterministic(splits):
    assert {name: corpus.stdlib_files(name) for name in corpus.SPLITS} == splits


def test_splits_are_disjoint_nonempty_and_cover_everything(splits):
    everything = corpus.stdlib_files()
    for name, files in splits.items():
        assert files, f"split {name} is empty"
    sets = {name: set(files) for name, files in splits.items()}
    assert not sets["train"] & sets["calibration"]
    assert not sets["train"] & sets["heldout"]
    assert not sets["calibration"] & sets["heldout"]
    assert sets["train"] | sets["calibration"] | sets["heldout"] == set(everything)
    assert sum(len(files) for files in splits.values()) == len(everything)
    assert 0.8 < len(splits["train"]) / len(everything) < 0.97


def test_split_of_is_a_stable_hash():
    # Golden values: the shipped model's held-out set depends on these never changing.
    assert corpus.split_of("os.py") == "train"
    assert corpus.split_of("json/decoder.py") == "train"
    assert corpus.split_of("argparse.py") == "heldout"
    assert corpus.split_of("asyncio/sslproto.py") == "heldout"
    assert corpus.split_of("calendar.py") == "calibration"
    assert corpus.split_of("collections/abc.py") == "calibration"


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="unknown split"):
        corpus.stdlib_files("validation")


def test_read_texts_skips_bad_files(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("x = 1\n", encoding="utf-8")
    latin = tmp_path / "latin.py"
    latin.write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    empty = tmp_path / "empty.py"
    empty.write_text("", encoding="utf-8")
    assert corpus.read_texts([good, latin, empty, tmp_path / "missing.py", good]) == ["x = 1\n", "x = 1\n"]


def test_load_texts_file_directory_and_list(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mod.py").write_text("def f():\n    pass\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "c.md").write_text("# gamma", encoding="utf-8")
    (tmp_path / "weights.bin").write_bytes(b"\x00\xff")
    (tmp_path / "bad.py").write_bytes(b"\xff\xfe\xfa")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "y.py").write_text("cached", encoding="utf-8")

    assert corpus.load_texts(tmp_path) == ["alpha", "def f():\n    pass\n", "# gamma"]
    assert corpus.load_texts(str(tmp_path / "a.txt")) == ["alpha"]
    # A file named directly is read whatever its suffix.
    (tmp_path / "notes.log").write_text("log line", encoding="utf-8")
    assert corpus.load_texts([tmp_path / "notes.log", tmp_path / "b"]) == ["log line", "def f():\n    pass\n"]


def test_load_texts_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        corpus.load_texts(tmp_path / "missing")
    with pytest.raises(ValueError, match="empty list"):
        corpus.load_texts([])
    with pytest.raises(ValueError, match="no non-empty UTF-8 text"):
        corpus.load_texts(tmp_path)
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty UTF-8 text"):
        corpus.load_texts(tmp_path / "empty.txt")
    (tmp_path / "binary.py").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="not UTF-8"):
        corpus.load_texts(tmp_path / "binary.py")


def test_prose_splits_are_disjoint_stable_halves_of_the_documentation_topics():
    from pydoc_data.topics import topics

    calibration, heldout = corpus.prose_texts("calibration"), corpus.prose_texts("heldout")
    assert calibration and heldout
    assert not set(calibration) & set(heldout)
    assert sorted(calibration + heldout) == sorted(t for t in topics.values() if t.strip())
    # Half and half by name hash, give or take a few topics.
    assert abs(len(calibration) - len(heldout)) < 0.3 * len(topics)
    assert corpus.prose_texts("heldout") == heldout
    # English prose, not code: mostly letters and spaces.
    text = "".join(heldout)
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.85 * len(text)
    with pytest.raises(ValueError, match="unknown prose split 'train'"):
        corpus.prose_texts("train")
