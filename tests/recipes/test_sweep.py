"""Tests of sparse_attention.recipes.sweep and the ``sweep`` command on tiny random GPT-2s (CPU, reference backend).

The numbers are checked for what is guaranteed: dense keeps everything and has the model's own perplexity, exact top-k
keeps exactly ``Σ min(k, n) / Σ n`` of a known causal shape (prefill and decode), every record's all-layer fraction is
the layer-weighted mean of the dense layers' 1.0 and its pruned-layer fraction, Top-θ never prunes rows of at most k
keys, and a Top-θ record is reproduced by calibrating and configuring by hand.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from sa_testing import tiny_gpt2

from sparse_attention import calibrate, configure
from sparse_attention.recipes.data import batches
from sparse_attention.recipes.evaluation import lm_metrics
from sparse_attention.recipes.sweep import METHODS, TOP_THETA_METHODS, check_methods, fronts, plot_sweep, sweep

VOCAB, L, N_LAYER, DENSE = 97, 32, 3, (0,)
KS = (2, 8)
PROMPT, NEW, PROMPTS = 8, 5, 2
REQUIRED = (
    "checkpoint", "method", "k", "ppl", "accuracy", "dense_ppl_original", "kept_element_fraction_pruned",
    "kept_v_fraction_pruned", "kept_element_fraction_all", "kept_v_fraction_all",
)  # fmt: skip


def windows(n, seed):
    return torch.randint(1, VOCAB, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def data():
    return {"heldout": windows(4, 1), "calibration": windows(4, 2)}


@pytest.fixture(scope="module")
def models():
    return {name: tiny_gpt2(n_layer=N_LAYER, vocab=VOCAB, seed=seed) for seed, name in enumerate(("orig", "other"))}


def run(models, data, **kwargs):
    args = dict(original="orig", ks=KS, dense_layers=DENSE, prompt_len=PROMPT, new_tokens=NEW, num_prompts=PROMPTS,
                batch_size=2, progress=False)  # fmt: skip
    return sweep(models, data["heldout"], data["calibration"], **(args | kwargs))


@pytest.fixture(scope="module")
def records(models, data):
    # "other" is measured dense only: it checks that every checkpoint's records carry the original's perplexity.
    return run(models, data, dense_only={"other"})


def by(records, checkpoint, method, k=None):
    (rec,) = [r for r in records if (r["checkpoint"], r["method"], r["k"]) == (checkpoint, method, k)]
    return rec


def topk_prefill_fraction(k, length):
    """Exact top-k on causal rows n = 1..length keeps min(k, n) of n."""
    return sum(min(k, n) for n in range(1, length + 1)) / sum(range(1, length + 1))


def topk_decode_fraction(k):
    """Greedy generation of NEW tokens: the prompt's prefill gives the first, then NEW - 1 decode steps see
    PROMPT + 1 .. PROMPT + NEW - 1 keys, PROMPTS rows each."""
    ns = range(PROMPT + 1, PROMPT + NEW)
    return sum(min(k, n) for n in ns) / sum(ns)


def test_every_checkpoint_method_and_k_once_with_the_required_fields(records):
    expected = [(c, "dense", None) for c in ("orig", "other")] + [("orig", m, k) for m in METHODS[1:] for k in KS]
    assert sorted(map(str, ((r["checkpoint"], r["method"], r["k"]) for r in records))) == sorted(map(str, expected))
    for r in records:
        assert all(key in r for key in REQUIRED), [key for key in REQUIRED if key not in r]
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["tokens"] == 4 * (L - 1)
    assert [r["method"] for r in records[:1]] == ["dense"] and records[0]["checkpoint"] == "orig"


def test_dense_keeps_everything_and_has_the_models_own_perplexity(records, models, data):
    for name, model in models.items():
        rec = by(records, name, "dense")
        for field in ("kept_element_fraction_pruned", "kept_element_fraction_all", "kept_v_fraction_pruned",
                      "kept_v_fraction_all"):  # fmt: skip
            assert rec[field] == 1.0, field
        # The model's own attention (SDPA), a path that shares no code with the sweep's dense measurement.
        assert model.config._attn_implementation == "sdpa"
        assert rec["ppl"] == pytest.approx(lm_metrics(model, data["heldout"])["perplexity"], rel=1e-5)
    orig = by(records, "orig", "dense")["ppl"]
    for r in records:
        assert r["dense_ppl_original"] == orig
        assert r["ppl_vs_original"] == pytest.approx(r["ppl"] / orig - 1.0)
        assert r["dense_ppl"] == by(records, r["checkpoint"], "dense")["ppl"]


@pytest.mark.parametrize("k", KS, ids=[f"k{k}" for k in KS])
def test_topk_keeps_exactly_min_k_n_of_each_row(records, k):
    for name in ("orig",):
        rec = by(records, name, "top-k", k)
        assert rec["kept_element_fraction_pruned"] == pytest.approx(topk_prefill_fraction(k, L), abs=1e-15)
        assert rec["kept_v_fraction_pruned"] == pytest.approx(topk_decode_fraction(k), abs=1e-15)
        assert rec["kept_per_k"] == 1.0
        rows = 4 * 4 * (N_LAYER - len(DENSE))  # windows x heads x pruned layers
        kept = sum(min(k, n) for n in range(1, L + 1))
        assert rec["prefill_counts_pruned"] == [kept * rows, sum(range(1, L + 1)) * rows]


def test_all_layer_fractions_weigh_the_dense_layers_at_one(records):
    # Every layer sees the same visible keys, so "all" is the layer-weighted mean of 1.0 and the pruned fraction.
    pruned = N_LAYER - len(DENSE)
    for r in records:
        for part in ("element", "v"):
            want = (len(DENSE) + pruned * r[f"kept_{part}_fraction_pruned"]) / N_LAYER
            assert r[f"kept_{part}_fraction_all"] == pytest.approx(want, rel=1e-12), (r["method"], r["k"], part)


@pytest.mark.parametrize("method", list(TOP_THETA_METHODS), ids=list(TOP_THETA_METHODS))
def test_top_theta_fractions_are_fractions_and_short_rows_are_kept(records, method):
    for name in ("orig",):
        for k in KS:
            rec = by(records, name, method, k)
            assert 0.0 < rec["kept_element_fraction_pruned"] <= 1.0
            assert 0.0 < rec["kept_v_fraction_pruned"] <= 1.0
            # Rows with n <= k are never pruned: at least Σ_{n<=k} n of Σ n is kept.
            floor = sum(range(1, k + 1)) / sum(range(1, L + 1))
            assert rec["kept_element_fraction_pruned"] >= floor
            placement, sdc, vmc = TOP_THETA_METHODS[method]
            assert (rec["placement"], rec["sdc"], rec["vmc"]) == (placement, sdc, vmc)


@pytest.mark.parametrize(
    ("method", "k"), [("top-theta pre threshold", 8), ("top-theta post vmc", 2)], ids=["pre-threshold", "post-vmc"]
)
def test_a_top_theta_record_is_reproduced_by_hand(records, models, data, method, k):
    model = models["orig"]
    placement, sdc, vmc = TOP_THETA_METHODS[method]
    th = calibrate(model, batches(data["calibration"], 2), k=k, placement=placement, dense_layers=DENSE, vmc=vmc,
                   progress=False)  # fmt: skip
    try:
        configure(model, th, sdc=sdc, vmc=vmc)
        ppl = lm_metrics(model, data["heldout"], batch_size=2)["perplexity"]
    finally:
        model.config.top_theta = None
        model.set_attn_implementation("sdpa")
    assert by(records, "orig", method, k)["ppl"] == pytest.approx(ppl, rel=1e-12)


def test_models_are_restored(models, records):
    for model in models.values():
        assert getattr(model.config, "top_theta", None) is None
        assert model.config._attn_implementation == "sdpa"


def test_resume_measures_only_what_is_missing(models, data, records):
    done = [r for r in records if r["checkpoint"] == "orig" and r["method"] in ("dense", "top-k")]
    seen = []
    again = run(models, data, methods=["top-k", "top-theta pre exact"], ks=(8,), done=done, dense_only={"other"},
                on_record=lambda rs: seen.append(len(rs)))  # fmt: skip
    new = again[len(done) :]
    assert again[: len(done)] == done
    assert [(r["checkpoint"], r["method"], r["k"]) for r in new] == [
        ("orig", "top-theta pre exact", 8),
        ("other", "dense", None),
    ]
    assert seen == [len(done) + 1, len(done) + 2]
    # Deterministic: the same measurement gives the same numbers.
    assert new[0]["ppl"] == by(records, "orig", "top-theta pre exact", 8)["ppl"]
    assert new[1]["ppl"] == by(records, "other", "dense")["ppl"]


def test_fronts_pick_the_least_work_within_budget():
    def rec(method, k, ppl, f, fv):
        fields = {"kept_element_fraction_pruned": f, "kept_v_fraction_pruned": fv, "ppl_vs_original": ppl / 100 - 1}
        return {"checkpoint": "a", "method": method, "k": k, "ppl": ppl, "dense_ppl_original": 100.0, **fields}

    rs = [rec("dense", None, 100.0, 1.0, 1.0), rec("m", 2, 105.0, 0.05, 0.1), rec("m", 4, 101.0, 0.1, 0.3),
          rec("m", 8, 100.5, 0.2, 0.25), rec("n", 2, 103.0, 0.05, 0.1)]  # fmt: skip
    front = {e["method"]: e for e in fronts(rs, budget=0.01)}
    assert front["m"]["best_elements"]["k"] == 4  # 101.0 is exactly at the budget: within it
    assert front["m"]["best_v_rows"]["k"] == 8  # the fewest V rows within budget come from another k
    assert front["n"]["best_elements"] is None and front["n"]["best_ppl_increase"] == pytest.approx(0.03)
    assert front["dense"]["best_elements"]["fraction"] == 1.0


def test_bad_arguments(models, data):
    with pytest.raises(ValueError, match="unknown sweep method"):
        check_methods(["top-theta pre none"])
    with pytest.raises(ValueError, match="original='missing' is not one of the checkpoints"):
        run(models, data, original="missing")
    with pytest.raises(ValueError, match="cannot give 2 prompts of 40 tokens"):
        run(models, data, prompt_len=40)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        run(models, data, ks=(0,))


def test_plot(records, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sweep.png"
    assert plot_sweep(records, path, title="tiny")
    assert path.stat().st_size > 10_000


def test_the_sweep_command_writes_resumes_and_refuses_foreign_files(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sparse_attention.cli import main

    words = [f"w{i}" for i in range(VOCAB - 1)] + ["[EOS]"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[EOS]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[EOS]", pad_token="[EOS]")
    ckpt = tmp_path / "tiny"
    tiny_gpt2(n_layer=N_LAYER, vocab=VOCAB, seed=0).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    gen = torch.Generator().manual_seed(3)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(words[i] for i in torch.randint(0, VOCAB - 1, (800,), generator=gen).tolist()))
    out = tmp_path / "res" / "sweep.json"
    argv = ["sweep", "--model", f"tiny={ckpt}", "--original", "tiny", "--text", str(text), "--k", "4",
            "--methods", "top-k", "--seq-len", "32", "--windows", "3", "--calib-windows", "2", "--prompt-len", "8",
            "--new-tokens", "3", "--num-prompts", "2", "--dense-layers", "0", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    body = json.loads(out.read_text())
    assert body["kind"] == "sparse-attention sweep" and body["settings"]["heldout_windows"] == 3
    assert [(r["method"], r["k"]) for r in body["records"]] == [("dense", None), ("top-k", 4)]
    assert body["records"][1]["kept_element_fraction_pruned"] == pytest.approx(topk_prefill_fraction(4, 32))
    assert body["command"].startswith("sparse-attention sweep --model") and body["commit"]
    capsys.readouterr()
    # Resuming adds only the new method; other settings are refused.
    assert main([*argv, "--methods", "top-k", "top-theta pre exact", "--resume"]) == 0
    again = json.loads(out.read_text())["records"]
    assert again[:2] == body["records"] and [(r["method"], r["k"]) for r in again[2:]] == [("top-theta pre exact", 4)]
    assert [i["records_measured"] for i in json.loads(out.read_text())["invocations"]] == [2, 1]
    assert main([*argv, "--windows", "2", "--resume"]) == 2
    assert "--resume" in capsys.readouterr().err
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}')
    assert main([*argv[:-1], str(foreign)]) == 2
    assert "exists and is not a sweep results" in capsys.readouterr().err
    assert json.loads(foreign.read_text()) == {"mine": True}
