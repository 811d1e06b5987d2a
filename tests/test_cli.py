"""The command line on a tiny model: demo, calibrate, evaluate, and one-line errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sa_testing import tiny_gpt2

from sparse_attention.cli import main

SOURCE_DIR = Path(__file__).resolve().parents[1] / "sparse_attention"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny GPT-2 and a byte-level BPE tokenizer trained on this package's sources, saved as a checkpoint."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    files = sorted(str(p) for p in SOURCE_DIR.rglob("*.py"))
    bpe = ByteLevelBPETokenizer()
    bpe.train(files, vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    model = tiny_gpt2(n_layer=3, vocab=len(tok), positions=128)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    for p in sorted(SOURCE_DIR.rglob("*.py"))[:6]:
        (d / (p.stem + ".txt")).write_text(p.read_text())
    return d


FAST = ["--seq-len", "64", "--windows", "4", "--calib-windows", "4", "--new-tokens", "4", "--quiet"]


def test_demo_writes_report(tiny_model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(
        ["demo", "--model", str(tiny_model_dir), "--text", str(text_dir), "--k", "4,8", "--out", str(out), *FAST]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "top-theta" in printed and "top-k" in printed and "dense" in printed
    report = json.loads((out / "report.json").read_text())
    methods = [(r["method"], r["k"]) for r in report["records"]]
    assert methods == [("dense", None), ("top-k", 4), ("top-theta", 4), ("top-k", 8), ("top-theta", 8)]
    dense = report["records"][0]
    assert dense["kept_fraction"] == 1.0 and dense["kept_v_fraction"] == 1.0
    for r in report["records"][1:]:
        assert r["kept_fraction_pruned_layers"] < 1.0
        assert r["kept_v_fraction"] < 1.0
        assert r["perplexity"] > 1.0 and 0.0 <= r["accuracy"] <= 1.0
        assert set(r["per_layer"]) == {"0", "1", "2"}
    topk4 = report["records"][1]
    assert topk4["kept_per_k"] == pytest.approx(1.0)  # exact top-k keeps exactly k of each long row
    assert report["command"].startswith("sparse-attention demo --model")
    assert report["commit"] and report["torch"] and report["triton"]
    pytest.importorskip("matplotlib")
    assert (out / "report.png").stat().st_size > 1000


def test_calibrate_then_evaluate(tiny_model_dir, text_dir, tmp_path, capsys):
    th = tmp_path / "th.safetensors"
    ckpt = tmp_path / "configured"
    args = ["--model", str(tiny_model_dir), "--text", str(text_dir), *FAST]
    assert main(["calibrate", *args, "--k", "6", "--out", str(th), "--save-model", str(ckpt), "--vmc"]) == 0
    assert th.is_file() and (ckpt / "config.json").is_file()
    config = json.loads((ckpt / "config.json").read_text())
    assert config["top_theta"]["vmc"] is True and config["top_theta"]["thresholds"]["k"] == 6
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(ckpt), "--text", str(text_dir), "--out", str(out), *FAST]) == 0
    records = json.loads((out / "report.json").read_text())["records"]
    assert [r["method"] for r in records] == ["dense", "top-theta"]
    assert records[1]["kept_fraction_pruned_layers"] < 1.0 and records[1]["vmc"] is True
    out2 = tmp_path / "eval2"
    args2 = ["--model", str(tiny_model_dir), "--text", str(text_dir), "--thresholds", str(th), "--out", str(out2)]
    assert main(["evaluate", *args2, *FAST]) == 0


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_bad_inputs_give_one_line(tiny_model_dir, text_dir, tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "nope"), *FAST]) == 2
    assert "does not exist" in _error_line(capsys)
    assert main(["demo", "--model", str(tiny_model_dir), "--text", str(tmp_path / "missing.txt"), *FAST]) == 2
    assert "does not exist" in _error_line(capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["demo", "--model", str(tiny_model_dir), "--text", str(empty), *FAST]) == 2
    assert "no non-empty" in _error_line(capsys)
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    assert main(["demo", "--model", str(tiny_model_dir), "--text", str(short), *FAST]) == 2
    assert "fewer than one window" in _error_line(capsys)
    # Thresholds calibrated for another model (4 heads) refused by a model with 2 heads.
    th = tmp_path / "th.safetensors"
    assert main(["calibrate", "--model", str(tiny_model_dir), "--text", str(text_dir), "--out", str(th), *FAST]) == 0
    capsys.readouterr()
    other = tmp_path / "other"
    tiny_gpt2(n_layer=3, n_head=2, vocab=300, positions=128).save_pretrained(other)
    for f in tiny_model_dir.glob("tokenizer*"):
        (other / f.name).write_bytes(f.read_bytes())
    assert main(["evaluate", "--model", str(other), "--text", str(text_dir), "--thresholds", str(th), *FAST]) == 2
    assert "heads per layer" in _error_line(capsys)
    assert main(["evaluate", "--model", str(tiny_model_dir), "--text", str(text_dir), *FAST]) == 2
    assert "no Top-θ configuration" in _error_line(capsys)
    assert main(["evaluate", "--model", str(tiny_model_dir), "--thresholds", str(empty), *FAST]) == 2
    assert "not a readable safetensors" in _error_line(capsys)
    # A model whose attention does not go through transformers' AttentionInterface.
    from transformers import XLNetConfig, XLNetLMHeadModel

    xlnet = tmp_path / "xlnet"
    XLNetLMHeadModel(XLNetConfig(d_model=32, n_layer=1, n_head=2, d_inner=64, vocab_size=300)).save_pretrained(xlnet)
    for f in tiny_model_dir.glob("tokenizer*"):
        (xlnet / f.name).write_bytes(f.read_bytes())
    assert main(["demo", "--model", str(xlnet), "--text", str(text_dir), *FAST]) == 2
    assert "does not route its attention" in _error_line(capsys)


def test_argument_errors_exit_2(capsys):
    for argv in (["demo", "--k", "0"], ["demo", "--k", "a,b"], ["demo", "--placement", "inside"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        capsys.readouterr()


def test_module_entry_point_from_another_directory(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "sparse_attention", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "demo" in done.stdout


def test_default_model_demo_runs_offline(tmp_path):
    pytest.importorskip("sparse_attention.recipes.default_model")
    from sparse_attention import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.fail("the shipped default model is missing from the package data")
    out = tmp_path / "report"
    argv = ["demo", "--k", "8", "--seq-len", "96", "--windows", "2", "--calib-windows", "2", "--new-tokens", "3"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    records = json.loads((out / "report.json").read_text())["records"]
    assert records[-1]["method"] == "top-theta" and records[-1]["kept_fraction_pruned_layers"] < 1.0
    assert torch.isfinite(torch.tensor([r["perplexity"] for r in records])).all()


def test_train_saves_a_checkpoint_and_log(tiny_model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "trained"
    argv = ["train", "--model", str(tiny_model_dir), "--text", str(text_dir), "--k", "4", "--steps", "4"]
    assert main([*argv, "--seq-len", "32", "--batch-size", "2", "--lam", "0.5", "--distill", "0.5", "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    log = json.loads((out / "train_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == [0, 1, 2, 3]
    assert log["distill"] == 0.5 and all(s["kl"] >= 0.0 for s in log["steps"])
    assert all(0.0 < s["topk_mass"] <= 1.0 and s["lm_loss"] > 0 for s in log["steps"])
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert "wrote the fine-tuned checkpoint" in capsys.readouterr().out
