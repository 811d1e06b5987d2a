"""Training the default model (recipes/pretrain.py): its output folder follows the file rule."""

import pytest

from sparse_attention.ops.files import MODEL_CARD_TITLE
from sparse_attention.recipes import data, pretrain

TINY = ["--vocab-size", "300", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--n-positions", "64",
        "--context", "32", "--eval-context", "32", "--batch-size", "2", "--steps", "2", "--warmup", "1",
        "--log-every", "1", "--eval-windows", "2"]  # fmt: skip


def test_out_is_checked_before_training(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.md").write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        pretrain.parse_args(["--out", str(foreign)])
    assert exc.value.code == 2
    assert "is not a checkpoint written by sparse_attention" in capsys.readouterr().err
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--out", str(a_file), "--overwrite"])
    assert pretrain.parse_args(["--out", str(foreign), "--overwrite"]).overwrite
    assert pretrain.parse_args([]).out == pretrain.DEFAULT_OUT  # the shipped folder is one it wrote
    assert (foreign / "notes.md").read_text() == "keep me"


def test_a_failed_run_leaves_the_old_folder_and_a_good_one_replaces_it(tmp_path, monkeypatch):
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 40 for i in range(12)]
    monkeypatch.setattr(data, "stdlib_texts", lambda split=None: texts)
    out = tmp_path / "model"
    assert pretrain.main(["--out", str(out), *TINY]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert first["MODEL_CARD.md"].decode().startswith(MODEL_CARD_TITLE) and "model.safetensors" in first

    def broken(folder, facts):
        (folder / "MODEL_CARD.md").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(pretrain, "write_model_card", broken)
    with pytest.raises(OSError, match="disk full"):
        pretrain.main(["--out", str(out), "--seed", "1", *TINY])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
