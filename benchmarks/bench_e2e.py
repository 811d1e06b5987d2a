"""End-to-end benchmark: Hugging Face ``generate`` tokens/s with a long prompt, ``top_theta`` against ``sdpa``.

The model is Llama-shaped with random weights, built from a config (nothing is downloaded): 8 layers, hidden 2048,
32 query heads and 8 kv heads (head dim 64, as Llama-3.2-1B), MLP 8192, a small vocabulary, bf16. One prompt of
``--prompt`` random tokens (32k by default, batch 1) is extended greedily by ``--new-tokens`` tokens with a static
cache. Each implementation is timed as ``generate(max_new_tokens=1)`` (the prompt's prefill and one token) and
``generate(max_new_tokens=1 + N)``, after a warm-up generate that compiles the kernels: the decode time per token is
their difference over N (``ms`` and ``sdpa_ms`` per token; ``tokens_per_s`` = 1000 / ms), the prefill time the
first. These are eager generate loops: Python and launch overhead per layer are part of the number (no
``torch.compile``, no CUDA graphs), as a user of ``generate`` sees them.

Thresholds: ``sparse_attention.calibrate`` on ``--calibration-tokens`` other random tokens with ``k`` =
``KEPT_TARGET`` of that length (the package's rule: the (k+1)-th largest score, mean + 0.1·std), default dense layers
(the first two). Rows longer than the calibration use its last threshold, so a 32k decode row keeps about
``KEPT_TARGET`` of its keys per head, and with 4 query heads per kv head about ``1 - (1 - 0.1)^4 ≈ 0.34`` of the V
rows if the heads chose independently: a prediction; ``kept_v_fraction`` is measured afterwards (one generate with
statistics, when the time budget allows). Check before timing: the logits of the first ``--check-tokens`` prompt
tokens on the kernels against the float32 reference backend, same thresholds (``check_rel_err``).

Run: ``python benchmarks/bench_e2e.py [--out FILE] [--time-budget S]``; ``--smoke`` for a tiny model on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time

import harness
import torch

import sparse_attention as sa

MODEL = dict(num_hidden_layers=8, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=1024)  # fmt: skip
SMOKE_MODEL = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=128)  # fmt: skip
PROMPT = 32768
NEW_TOKENS = 32
CALIBRATION_TOKENS = 2048
CHECK_TOKENS = 512
KEPT_TARGET = 0.1
SMOKE = dict(prompt=64, new_tokens=3, calibration_tokens=48, check_tokens=32)
# Seconds the top_theta part needs at least (its first generate compiles the prefill and decode kernels); with less
# left after SDPA it is not started, and the record keeps the SDPA numbers alone.
TOP_THETA_MIN_SECONDS = 40.0
STATS_MIN_SECONDS = 25.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(harness.RESULTS_DIR / "e2e.json"), help="results JSON path")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on whatever device is there")
    parser.add_argument("--prompt", type=int, default=None, help=f"prompt tokens (default {PROMPT})")
    parser.add_argument("--new-tokens", type=int, default=None, help=f"timed decode tokens (default {NEW_TOKENS})")
    parser.add_argument("--calibration-tokens", type=int, default=None, help=f"default {CALIBRATION_TOKENS}")
    parser.add_argument("--check-tokens", type=int, default=None, help=f"default {CHECK_TOKENS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later parts are skipped after it")
    return parser.parse_args(argv)


def build_model(dims: dict, length: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**dims, max_position_embeddings=length, bos_token_id=None, eos_token_id=None,
                         pad_token_id=0, attn_implementation="sdpa")  # fmt: skip
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def generate_seconds(model, ids, new_tokens: int) -> float:
    """Wall seconds of one greedy ``generate`` with a static cache (synchronised)."""
    _sync(ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, cache_implementation="static", pad_token_id=0,
        )  # fmt: skip
    _sync(ids.device)
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return time.perf_counter() - start


def time_generate(model, ids, new_tokens: int) -> dict:
    """Warm-up, then prefill-plus-one-token and prefill-plus-``1 + new_tokens``: ms per decode token."""
    generate_seconds(model, ids, 2)  # compiles and autotunes outside the timed calls
    first = generate_seconds(model, ids, 1)
    if ids.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    total = generate_seconds(model, ids, 1 + new_tokens)
    peak = (torch.cuda.max_memory_allocated() - base) / harness.MIB if ids.device.type == "cuda" else None
    per_token = max(total - first, 1e-9) / new_tokens * 1e3
    return {"ms": per_token, "prefill_ms": first * 1e3, "total_ms": total * 1e3, "peak_mem_mb": peak}


def check_logits(model, ids, thresholds, dtype) -> dict:
    """Logits of a prompt prefix through the kernels against the reference backend, same thresholds."""
    logits = {}
    for backend in ("reference", "auto"):
        sa.configure(model, thresholds, backend=backend)
        with torch.no_grad():
            logits[backend] = model(ids).logits.float()
    return harness.check_result(logits["auto"], logits["reference"], dtype)


def decode_floor_ms(model, dims: dict, length: int, copy_gbps) -> float | None:
    """Bytes a dense decode step must read (every weight once, the whole K/V cache) over the copy bandwidth."""
    if copy_gbps is None:
        return None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    cache = 2 * dims["num_hidden_layers"] * dims["num_key_value_heads"] * length * head_dim * 2
    return (weights + cache) / (copy_gbps * 1e9) * 1e3


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("no CUDA device: benchmarks measure GPUs only (use --smoke to check the script on CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dims = SMOKE_MODEL if args.smoke else MODEL
    preset = SMOKE if args.smoke else {}
    prompt = args.prompt or preset.get("prompt", PROMPT)
    new_tokens = args.new_tokens or preset.get("new_tokens", NEW_TOKENS)
    cal_tokens = args.calibration_tokens or preset.get("calibration_tokens", CALIBRATION_TOKENS)
    check_tokens = args.check_tokens or preset.get("check_tokens", CHECK_TOKENS)
    deadline = harness.Deadline(args.time_budget)
    writer = harness.ResultWriter(args.out)
    env, rates = harness.environment(), harness.machine_rates()

    torch.manual_seed(args.seed)
    model = build_model(dims, prompt + new_tokens + 2, device, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1, dims["vocab_size"], (1, prompt), generator=gen).to(device)
    cal_ids = torch.randint(1, dims["vocab_size"], (1, cal_tokens), generator=gen).to(device)
    top_k = max(1, round(KEPT_TARGET * cal_tokens))
    harness.log(f"e2e: {dims} prompt={prompt} new={new_tokens}; calibrating k={top_k} on {cal_tokens} tokens")
    thresholds = sa.calibrate(model, [cal_ids], k=top_k, progress=False)
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    shape = {"B": 1, "Hq": dims["num_attention_heads"], "Hkv": dims["num_key_value_heads"], "Lq": new_tokens,
             "Lk": prompt, "D": head_dim, "layers": dims["num_hidden_layers"]}  # fmt: skip

    harness.log("e2e: sdpa")
    sdpa = time_generate(model, ids, new_tokens)  # the model was built with attn_implementation="sdpa"
    record = dict(
        variant=f"generate top_theta (calibrated k={top_k}) vs sdpa", dtype=harness.DTYPE_NAMES[dtype], shape=shape,
        model=dict(dims, random_weights=True), prompt_tokens=prompt, new_tokens=new_tokens,
        threshold={"method": "sparse_attention.calibrate on random tokens", "k": top_k, "tokens": cal_tokens,
                   "kept_target_per_head": KEPT_TARGET, "dense_layers": list(thresholds.dense_layers)},
        ms=None, sdpa_ms=sdpa["ms"], sdpa_prefill_ms=sdpa["prefill_ms"], sdpa_total_ms=sdpa["total_ms"],
        sdpa_tokens_per_s=1e3 / sdpa["ms"], sdpa_peak_mem_mb=sdpa["peak_mem_mb"], sdpa_cudnn_ms=None, flex_ms=None,
        floor_ms=decode_floor_ms(model, dims, prompt, rates["copy_gbps"]), speedup_vs_sdpa=None,
        kept_v_fraction=None, kept_element_fraction=None, skipped_tile_fraction=None, dense_mode=False, gbps=None,
        peak_mem_mb=None, check_ok=None, timing="wall clock around generate, synchronised; eager generate loop",
    )  # fmt: skip
    writer.add(harness.make_record("e2e", env, rates, **record))
    harness.log(f"  sdpa: {sdpa['ms']:.3f} ms/token, prefill {sdpa['prefill_ms']:.1f} ms")
    if deadline.budget is not None and deadline.budget - (time.monotonic() - deadline.start) < TOP_THETA_MIN_SECONDS:
        harness.log("time budget spent: top_theta not timed")
        return 0
    check = check_logits(model, ids[:, :check_tokens], thresholds, dtype)
    harness.log(f"e2e: top_theta (check rel err {check['check_rel_err']})")
    sa.configure(model, thresholds, backend="auto")
    ours = time_generate(model, ids, new_tokens)
    record.update(
        ms=ours["ms"], prefill_ms=ours["prefill_ms"], total_ms=ours["total_ms"], tokens_per_s=1e3 / ours["ms"],
        peak_mem_mb=ours["peak_mem_mb"], speedup_vs_sdpa=harness.ratio(sdpa["ms"], ours["ms"]),
        prefill_speedup_vs_sdpa=harness.ratio(sdpa["prefill_ms"], ours["prefill_ms"]), **check,
    )  # fmt: skip
    writer.records[-1] = harness.make_record("e2e", env, rates, **record)
    writer.flush()
    harness.log(f"  top_theta: {ours['ms']:.3f} ms/token, prefill {ours['prefill_ms']:.1f} ms; "
                f"x_sdpa={record['speedup_vs_sdpa']:.3f}")  # fmt: skip
    if deadline.budget is not None and deadline.budget - (time.monotonic() - deadline.start) < STATS_MIN_SECONDS:
        harness.log("time budget spent: kept fractions not measured")
        return 0 if check["check_ok"] else 1
    with sa.collect_stats(model) as stats, torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2, do_sample=False,
                       cache_implementation="static", pad_token_id=0)  # fmt: skip
    record.update(
        kept_v_fraction=stats.kept_v_fraction(), kept_v_fraction_pruned_layers=stats.kept_v_fraction(False),
        kept_element_fraction=stats.kept_fraction(), kept_element_fraction_pruned_layers=stats.kept_fraction(False),
    )  # fmt: skip
    writer.records[-1] = harness.make_record("e2e", env, rates, **record)
    writer.flush()
    pruned = record["kept_v_fraction_pruned_layers"]
    harness.log(f"  kept_v_fraction={record['kept_v_fraction']} (pruned layers {pruned})")
    return 0 if check["check_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
