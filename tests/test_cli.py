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


# Small runs, per command (each command takes only the options it uses).
FAST = ["--seq-len", "64", "--windows", "4", "--calib-windows", "4", "--new-tokens", "4", "--quiet"]  # demo
CALIB = ["--seq-len", "64", "--calib-windows", "4", "--quiet"]
EVAL = ["--seq-len", "64", "--windows", "4", "--new-tokens", "4", "--quiet"]


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
    args = ["--model", str(tiny_model_dir), "--text", str(text_dir), *CALIB]
    assert main(["calibrate", *args, "--k", "6", "--out", str(th), "--save-model", str(ckpt), "--vmc"]) == 0
    assert th.is_file() and (ckpt / "config.json").is_file()
    config = json.loads((ckpt / "config.json").read_text())
    assert config["top_theta"]["vmc"] is True and config["top_theta"]["thresholds"]["k"] == 6
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(ckpt), "--text", str(text_dir), "--out", str(out), *EVAL]) == 0
    records = json.loads((out / "report.json").read_text())["records"]
    assert [r["method"] for r in records] == ["dense", "top-theta"]
    assert records[1]["kept_fraction_pruned_layers"] < 1.0 and records[1]["vmc"] is True
    out2 = tmp_path / "eval2"
    args2 = ["--model", str(tiny_model_dir), "--text", str(text_dir), "--thresholds", str(th), "--out", str(out2)]
    assert main(["evaluate", *args2, *EVAL]) == 0
    # --sdc / --vmc override a configured checkpoint's own settings.
    out3 = tmp_path / "eval3"
    argv3 = ["--model", str(ckpt), "--text", str(text_dir), "--out", str(out3), "--sdc", "threshold", "--no-vmc"]
    assert main(["evaluate", *argv3, *EVAL]) == 0
    top = json.loads((out3 / "report.json").read_text())["records"][1]
    assert top["sdc"] == "threshold" and top["vmc"] is False


def test_calibrate_takes_per_layer_k_and_the_checkpoint_settings(tiny_model_dir, text_dir, tmp_path, capsys):
    from sparse_attention import Thresholds

    th, ckpt = tmp_path / "th.safetensors", tmp_path / "configured"
    args = ["--model", str(tiny_model_dir), "--text", str(text_dir), *CALIB, "--k", "6", "--layer-k", "2:3"]
    assert (
        main(["calibrate", *args, "--out", str(th), "--save-model", str(ckpt), "--sdc-scale", "0.5", "--cap", "4"]) == 0
    )
    assert "k=per layer [6, 6, 3]" in capsys.readouterr().out
    loaded = Thresholds.load(th)
    assert [loaded.k_of(i) for i in range(3)] == [6, 6, 3]
    settings = json.loads((ckpt / "config.json").read_text())["top_theta"]
    assert settings["sdc_scale"] == 0.5 and settings["cap"] == 4 and settings["thresholds"]["k"] == [6, 6, 3]
    # evaluate overrides the checkpoint's cap alone; its other settings stay.
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(ckpt), "--text", str(text_dir), "--out", str(out), "--cap", "2", *EVAL]
    assert main(argv) == 0
    top = json.loads((out / "report.json").read_text())["records"][1]
    assert top["cap"] == 2 and top["sdc_scale"] == 0.5
    assert main(["calibrate", *args[:-2], "--layer-k", "3:4", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--layer-k 3:... is out of range: the model has layers 0..2" in _error_line(capsys)


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
    assert main(["calibrate", "--model", str(tiny_model_dir), "--text", str(text_dir), "--out", str(th), *CALIB]) == 0
    capsys.readouterr()
    other = tmp_path / "other"
    tiny_gpt2(n_layer=3, n_head=2, vocab=300, positions=128).save_pretrained(other)
    for f in tiny_model_dir.glob("tokenizer*"):
        (other / f.name).write_bytes(f.read_bytes())
    assert main(["evaluate", "--model", str(other), "--text", str(text_dir), "--thresholds", str(th), *EVAL]) == 2
    assert "heads per layer" in _error_line(capsys)
    assert main(["evaluate", "--model", str(tiny_model_dir), "--text", str(text_dir), *EVAL]) == 2
    assert "no Top-θ configuration" in _error_line(capsys)
    assert main(["evaluate", "--model", str(tiny_model_dir), "--thresholds", str(empty), *EVAL]) == 2
    assert "not a readable safetensors" in _error_line(capsys)
    # A model whose attention does not go through transformers' AttentionInterface.
    from transformers import XLNetConfig, XLNetLMHeadModel

    xlnet = tmp_path / "xlnet"
    XLNetLMHeadModel(XLNetConfig(d_model=32, n_layer=1, n_head=2, d_inner=64, vocab_size=300)).save_pretrained(xlnet)
    for f in tiny_model_dir.glob("tokenizer*"):
        (xlnet / f.name).write_bytes(f.read_bytes())
    assert main(["demo", "--model", str(xlnet), "--text", str(text_dir), *FAST]) == 2
    assert "does not route its attention" in _error_line(capsys)


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


# ---- issue 13: every argument and output path checked before any long work; one line and exit 2 ---------------


@pytest.fixture
def no_long_work(monkeypatch):
    """Fail the test if a command loads weights, calibrates, evaluates or trains."""
    import sparse_attention.hf.calibration
    import sparse_attention.recipes.default_model
    import sparse_attention.recipes.evaluation
    import sparse_attention.recipes.training

    def started(*args, **kwargs):
        raise AssertionError("the long work started before the arguments were checked")

    for module, name in (
        (sparse_attention.recipes.default_model, "load_model_and_tokenizer"),
        (sparse_attention.hf.calibration, "calibrate"),
        (sparse_attention.recipes.evaluation, "compare"),
        (sparse_attention.recipes.evaluation, "evaluate_configured"),
        (sparse_attention.recipes.training, "finetune"),
    ):
        monkeypatch.setattr(module, name, started)


@pytest.fixture
def configured_ckpt(tiny_model_dir, text_dir, tmp_path_factory):
    """A configured checkpoint (k=6) and its thresholds file, written by the calibrate command."""
    root = tmp_path_factory.mktemp("configured")
    ckpt, th = root / "ckpt", root / "th.safetensors"
    args = ["--model", str(tiny_model_dir), "--text", str(text_dir), "--k", "6", *CALIB]
    assert main(["calibrate", *args, "--out", str(th), "--save-model", str(ckpt)]) == 0
    return ckpt, th


RECORD = {"method": "dense", "k": None, "perplexity": 2.0, "accuracy": 0.5, "kept_fraction": 1.0,
          "kept_fraction_pruned_layers": None, "kept_v_fraction": 1.0, "kept_v_fraction_pruned_layers": None,
          "kept_per_k": None}  # fmt: skip


@pytest.fixture
def quick_compare(monkeypatch):
    """The demo's measurements replaced by one canned record: for tests about writing the report."""
    import sparse_attention.recipes.evaluation

    monkeypatch.setattr(sparse_attention.recipes.evaluation, "compare", lambda *args, **kwargs: [dict(RECORD)])


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# D11: numbers, the device and option combinations, each refused in one line before anything is loaded.
ARG_ERRORS = [
    (["demo", "--windows", "0"], "argument --windows: must be >= 1, got 0"),
    (["demo", "--calib-windows", "0"], "argument --calib-windows: must be >= 1, got 0"),
    (["demo", "--new-tokens", "0"], "argument --new-tokens: must be >= 1"),
    (["demo", "--seq-len", "1"], "argument --seq-len: must be >= 2"),
    (["demo", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["demo", "--windows", "x"], "argument --windows: expected an integer, got 'x'"),
    (["demo", "--sigma", "nan"], "argument --sigma: must be a finite number, got 'nan'"),
    (["demo", "--sigma", "inf"], "argument --sigma: must be a finite number"),
    (["demo", "--dense-layers", "-1"], "argument --dense-layers: must be >= 0, got -1"),
    (["demo", "--k", "0"], "--k values must be >= 1"),
    (["demo", "--k", "a,b"], "--k takes integers"),
    (["demo", "--placement", "inside"], "argument --placement: invalid choice"),
    (["demo", "--device", "bogus"], "--device 'bogus' is not a device; use cpu, cuda or cuda:N"),
    (["demo", "--device", "mps"], "only cpu and cuda devices are supported"),
    (["calibrate", "--k", "4,8"], "calibrate takes one --k, got 4,8"),
    (["calibrate", "--sdc", "none"], "--sdc only applies to the checkpoint written by --save-model"),
    (["calibrate", "--cap", "3"], "--cap only applies to the checkpoint written by --save-model"),
    (["calibrate", "--sdc-scale", "0.5", "--backend", "reference"], "--sdc-scale and --backend only apply"),
    (["calibrate", "--sdc-scale", "-1"], "argument --sdc-scale: must be >= 0.0"),
    (["calibrate", "--cap", "0"], "argument --cap: must be >= 1"),
    (["calibrate", "--layer-k", "2"], "--layer-k takes LAYER:K pairs separated by commas, got '2'"),
    (["calibrate", "--layer-k", "2:0"], "--layer-k needs LAYER >= 0 and K >= 1 in each LAYER:K, got '2:0'"),
    (["calibrate", "--layer-k", "1:4,1:8"], "--layer-k gives layer 1 twice"),
    (["demo", "--layer-k", "1:4"], "unrecognized arguments: --layer-k 1:4"),  # demo sweeps --k
    (["demo", "--condensed", "x", "--no-condensed"], "--condensed and --no-condensed contradict each other"),
    (["train", "--distill", "1.5"], "argument --distill: must be <= 1.0"),
    (["sweep", "--out", "fronts.txt"], "--out must name a .json file"),
    (["sweep", "--text", "a.txt", "--eval-corpus", "prose"], "--text replaces the built-in corpora"),
    (["sweep", "--threads", "0"], "argument --threads: must be >= 1"),
    (["train", "--steps", "0"], "argument --steps: must be >= 1"),
    (["train", "--lr", "nan"], "argument --lr: must be a finite number"),
    (["train", "--lr", "0"], "argument --lr: must be > 0"),
    (["train", "--lam", "-1"], "argument --lam: must be >= 0.0"),
    (["train", "--warmup", "-1"], "argument --warmup: must be >= 0"),
    (["train", "--placement", "post"], "unrecognized arguments: --placement post"),  # train does not prune
    (["evaluate", "--k", "8"], "unrecognized arguments: --k 8"),  # the thresholds carry their k
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: command"),
]


@pytest.mark.parametrize("argv,match", ARG_ERRORS, ids=[" ".join(a) or "no-command" for a, _ in ARG_ERRORS])
def test_bad_arguments_give_one_line_before_any_work(argv, match, no_long_work, capsys):
    assert main(argv) == 2
    line = _error_line(capsys)
    assert line.startswith("error: ") and match in line, line


def test_cuda_without_a_gpu_is_one_line(no_long_work, capsys, monkeypatch):
    # D11: --device cuda without a GPU crashed with "Torch not compiled with CUDA enabled" (exit 1).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["demo", "--device", "cuda"]) == 2
    assert "--device 'cuda': no CUDA device is available" in _error_line(capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["demo", "--device", "cuda:3"]) == 2
    assert "there are only 1 CUDA device(s)" in _error_line(capsys)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--dense-layers", "99"], "--dense-layers 99 is out of range: the model has layers 0..2"),
        (["--dense-layers", "0", "3"], "--dense-layers 3 is out of range"),
        (["--seq-len", "1000"], "--seq-len 1000 exceeds the model's 128 positions"),
        (["--k", "64", "--seq-len", "64"], "--k 64 needs rows longer than k, but windows have 64 tokens"),
        (["--new-tokens", "100", "--seq-len", "64"], "--new-tokens 100 after a prompt of 64 tokens exceeds"),
    ],
    ids=["dense-99", "dense-3", "seq-len", "k-vs-seq-len", "new-tokens"],
)
def test_model_limits_are_checked_from_the_config_before_the_weights(extra, match, tiny_model_dir, text_dir,
                                                                      no_long_work, capsys):  # fmt: skip
    # D11: --dense-layers 99 was reported as "'dense_layers' has layer 99 but the thresholds have 3 layers" after
    # calibrating; it is now checked against the model's config before its weights are read.
    assert main(["demo", "--model", str(tiny_model_dir), "--text", str(text_dir), "--quiet", *extra]) == 2
    assert match in _error_line(capsys)


# Output paths refused before any work: (command and its output arguments, built from a regular file F, a folder W
# holding someone's file, and a fresh folder C; the expected message). F and W stay as they were.
BAD_OUTPUTS = [
    # D14: demo / evaluate with a bad --out failed at the end of the job.
    ("D14-demo-out-file", lambda F, W, C: ["demo", "--out", F], "is a file, not a folder: cannot write the report"),
    ("D14-demo-out-foreign", lambda F, W, C: ["demo", "--out", W], "is not a report written by sparse_attention"),
    ("D14-demo-out-under-file", lambda F, W, C: ["demo", "--out", f"{F}/report"], "is a file"),
    ("D14-evaluate-out-file", lambda F, W, C: ["evaluate", "--out", F], "cannot write the report"),
    # D14: train --out <existing file> trained, then threw the model away.
    ("D14-train-out-file", lambda F, W, C: ["train", "--out", F], "is a file, not a folder: cannot write the checkp"),
    ("D14-train-out-foreign", lambda F, W, C: ["train", "--out", W], "is not a checkpoint written by sparse_attention"),
    # D13: calibrate --out X overwrote whatever X was, with exit 0.
    ("D13-calibrate-out-file", lambda F, W, C: ["calibrate", "--out", F], "is not a thresholds file written by"),
    ("D13-calibrate-out-folder", lambda F, W, C: ["calibrate", "--out", W], "is a folder: cannot write the thresholds"),
    # D15: calibrate --save-model <existing regular file> printed "wrote a configured checkpoint", exit 0, no files.
    ("D15-save-model-file", lambda F, W, C: ["calibrate", "--save-model", F], "is a file, not a folder"),
    ("D15-save-model-foreign", lambda F, W, C: ["calibrate", "--save-model", W], "is not a checkpoint written by"),
    ("out-inside-save-model", lambda F, W, C: ["calibrate", "--out", f"{C}/th.safetensors", "--save-model", C],
     "is inside --save-model"),
]  # fmt: skip


@pytest.mark.parametrize("make,match", [p[1:] for p in BAD_OUTPUTS], ids=[p[0] for p in BAD_OUTPUTS])
def test_bad_output_paths_fail_before_the_job(make, match, tiny_model_dir, text_dir, tmp_path, no_long_work, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("precious")
    foreign = tmp_path / "work"
    foreign.mkdir()
    (foreign / "mine.py").write_text("x = 1")
    command, *outputs = make(str(a_file), str(foreign), str(tmp_path / "ck"))
    assert main([command, "--model", str(tiny_model_dir), "--text", str(text_dir), "--quiet", *outputs]) == 2
    line = _error_line(capsys)
    assert match in line, line
    assert a_file.read_text() == "precious" and _tree(foreign) == {"mine.py": b"x = 1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "work"]  # checks create nothing


def test_overwrite_replaces_a_foreign_target(tiny_model_dir, text_dir, tmp_path, capsys):
    # D13: only with --overwrite does calibrate replace a file it did not write.
    a_file = tmp_path / "notes.txt"
    a_file.write_text("precious")
    argv = ["calibrate", "--model", str(tiny_model_dir), "--text", str(text_dir), "--out", str(a_file), *CALIB]
    assert main([*argv, "--overwrite"]) == 0
    from sparse_attention.ops.thresholds import Thresholds

    assert Thresholds.load(a_file).k == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_report_of_ours_is_replaced_whole(tiny_model_dir, text_dir, tmp_path, quick_compare, capsys):
    out = tmp_path / "report"
    argv = ["demo", "--model", str(tiny_model_dir), "--text", str(text_dir), "--k", "4", "--out", str(out), *FAST]
    assert main(argv) == 0
    first = json.loads((out / "report.json").read_text())
    assert main([*argv, "--seed", "1"]) == 0  # its own report folder: replaced without --overwrite
    second = json.loads((out / "report.json").read_text())
    assert "--seed 1" in second["command"] and "--seed" not in first["command"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_a_failed_checkpoint_write_leaves_the_old_checkpoint(configured_ckpt, text_dir, tiny_model_dir, tmp_path,
                                                              monkeypatch, capsys):  # fmt: skip
    # D16: a calibrate --save-model into an existing checkpoint that failed while writing the weights left the new
    # config.json (new thresholds) beside the old weights. D11: safetensors' error is not an OSError, and crashed.
    import shutil

    import transformers.modeling_utils as modeling_utils
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    import sparse_attention as sa

    ckpt = tmp_path / "ckpt"
    shutil.copytree(configured_ckpt[0], ckpt)
    before = _tree(ckpt)

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(modeling_utils, "safe_save_file", disk_full)
    argv = ["calibrate", "--model", str(tiny_model_dir), "--text", str(text_dir), "--k", "4", *CALIB]
    code = main([*argv, "--out", str(tmp_path / "th.safetensors"), "--save-model", str(ckpt)])
    assert code == 2
    line = _error_line(capsys)
    assert f"cannot write the checkpoint {ckpt}" in line and "No space left on device" in line
    assert _tree(ckpt) == before  # the old config.json with the old weights, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "th.safetensors"]  # no temporaries
    monkeypatch.undo()
    loaded = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="top_theta")
    assert sa.thresholds_of(loaded).k == 6
    # The same command without the failure replaces the checkpoint (one the package wrote) as a whole.
    assert main([*argv, "--out", str(tmp_path / "th.safetensors"), "--save-model", str(ckpt)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="top_theta")
    assert sa.thresholds_of(loaded).k == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "th.safetensors"]


def test_a_failed_thresholds_write_is_one_line(tiny_model_dir, text_dir, tmp_path, monkeypatch, capsys):
    # D11: any failed write crashed with a traceback; safetensors raises SafetensorError, not OSError.
    import safetensors.torch
    from safetensors import SafetensorError

    th = tmp_path / "th.safetensors"

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing: IoError(Input/output error)")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    argv = ["calibrate", "--model", str(tiny_model_dir), "--text", str(text_dir), "--out", str(th), *CALIB]
    assert main(argv) == 2
    assert f"cannot write the thresholds file {th}" in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "error,code", [(OSError(28, "No space left on device"), 2), (KeyboardInterrupt(), 130)], ids=["oserror", "ctrl-c"]
)
def test_a_failed_report_write_leaves_the_old_report(error, code, tiny_model_dir, text_dir, tmp_path, monkeypatch,
                                                     quick_compare, capsys):  # fmt: skip
    import sparse_attention.recipes.report as report

    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"command": "sparse-attention demo", "records": ["old"]}))
    before = _tree(out)

    def fail(records, path, title=None):
        Path(path).write_bytes(b"half a png")
        raise error

    monkeypatch.setattr(report, "plot", fail)
    argv = ["demo", "--model", str(tiny_model_dir), "--text", str(text_dir), "--k", "4", "--out", str(out), *FAST]
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and (f"cannot write the report {out}" in err[0] if code == 2 else err[0] == "interrupted")
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_train_refuses_a_folder_it_did_not_write_before_training(tiny_model_dir, text_dir, tmp_path, no_long_work,
                                                                 capsys):  # fmt: skip
    # D14: the check runs before training; the fixture fails the test if training starts.
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    argv = ["train", "--model", str(tiny_model_dir), "--text", str(text_dir), "--out", str(out), "--quiet"]
    assert main(argv) == 2
    assert "is not a checkpoint written by sparse_attention" in _error_line(capsys)


def test_a_malformed_checkpoint_is_reported_before_its_weights_are_read(tiny_model_dir, text_dir, tmp_path,
                                                                        no_long_work, capsys):  # fmt: skip
    # D9 on the command line: a malformed config.top_theta names the file and the field, before any work.
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["top_theta"] = {"vmc": "no", "thresholds": None}
    (ckpt / "config.json").write_text(json.dumps(config))
    for command in ("evaluate", "demo"):
        assert main([command, "--model", str(ckpt), "--text", str(text_dir), "--quiet"]) == 2
        line = _error_line(capsys)
        assert f"{ckpt}/config.json: top_theta: 'vmc' must be true or false, got 'no'" in line, line
