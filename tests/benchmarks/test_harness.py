"""The benchmark harness on a CPU: record format, results files, command lines, plotting, and the benchmark scripts
end to end in their ``--smoke`` mode (tiny shapes, reference backend, CPU timer). Nothing here measures a GPU."""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))  # the benchmark scripts import each other as top-level modules

import bench_decode  # noqa: E402
import bench_prefill  # noqa: E402
import bench_regularizer  # noqa: E402
import harness  # noqa: E402
import plot_results  # noqa: E402

SHAPE = {"B": 1, "Hq": 4, "Hkv": 2, "Lq": 1, "Lk": 256, "D": 64}


def _record(kind="decode", **overrides):
    fields = dict(
        dtype="bf16", shape=dict(SHAPE), variant="f_v=0.3", ms=0.5, sdpa_ms=0.75, sdpa_cudnn_ms=0.8, flex_ms=None,
        floor_ms=0.25, speedup_vs_sdpa=1.5, skipped_tile_fraction=None, dense_mode=False, gbps=2000.0, peak_mem_mb=1.0,
    )  # fmt: skip
    fields[harness.KEPT_KEY[kind]] = 0.3
    fields.update(overrides)
    env = {"device": "test", "torch": "0", "triton": "0", "commit": "abc", "command": "python x.py"}
    return harness.make_record(kind, env, {"copy_gbps": 3000.0, "matmul_tflops": 800.0}, **fields)


def test_environment_and_rates_without_cuda():
    env = harness.environment()
    for key in ("device", "torch", "triton", "commit", "command", "source_hash"):
        assert isinstance(env[key], str) and env[key]
    if not torch.cuda.is_available():
        assert harness.machine_rates() == {"copy_gbps": None, "matmul_tflops": None}


def test_every_required_key_is_checked():
    record = _record()
    assert harness.record_problems(record) == []
    for key in harness.REQUIRED_KEYS:
        broken = {k: v for k, v in record.items() if k != key}
        assert any(repr(key) in p for p in harness.record_problems(broken)), key
    for kind, kept_key in harness.KEPT_KEY.items():
        broken = {k: v for k, v in _record(kind).items() if k != kept_key}
        assert any(kept_key in p for p in harness.record_problems(broken))


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(kind="other"), "kind"),
        (dict(ms=-1.0), "positive"),
        (dict(ms="fast"), "ms"),
        (dict(gbps=float("nan")), "gbps"),
        (dict(dense_mode=1), "dense_mode"),
        (dict(shape={"B": 1}), "shape"),
        (dict(commit=None), "commit"),
        (dict(variant=3), "variant"),
        (dict(sdpa_cudnn_ms="0.1"), "sdpa_cudnn_ms"),
        (dict(extra=object()), "JSON"),
    ],
)
def test_bad_records_are_rejected(overrides, fragment):
    record = {**_record(), **overrides}
    problems = harness.record_problems(record)
    assert any(fragment in p for p in problems), problems
    with pytest.raises(ValueError, match="invalid benchmark record"):
        harness.validate_record(record)


def test_check_result_fails_on_nan_and_large_errors():
    ref = torch.ones(64)
    assert harness.check_result(ref + 1e-3, ref, torch.bfloat16)["check_ok"] is True
    bad = harness.check_result(ref * 1.5, ref, torch.bfloat16)
    assert bad["check_ok"] is False and bad["check_rel_err"] == pytest.approx(0.5)
    nan = harness.check_result(torch.full((64,), float("nan")), ref, torch.bfloat16)
    assert nan == {"check_rel_err": None, "check_ok": False}


def test_writer_keeps_a_valid_file_after_every_record(tmp_path):
    path = tmp_path / "sub" / "results.json"
    writer = harness.ResultWriter(path)
    writer.add(_record())
    assert harness.load_records(path) == [_record()]
    writer.add(_record("prefill", skipped_tile_fraction=0.5, gbps=None))
    assert [r["kind"] for r in harness.load_records(path)] == ["decode", "prefill"]
    with pytest.raises(ValueError):
        writer.add({"kind": "decode"})
    assert len(harness.load_records(path)) == 2
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_load_records_rejects_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="list"):
        harness.load_records(path)
    path.write_text(json.dumps([{"kind": "decode"}]))
    with pytest.raises(ValueError, match="record 0"):
        harness.load_records(path)


def test_commit_from_environment_or_unknown(monkeypatch, tmp_path):
    monkeypatch.setenv(harness.COMMIT_ENV, "deadbeef")
    assert harness.git_commit() == "deadbeef"
    monkeypatch.delenv(harness.COMMIT_ENV)
    monkeypatch.setattr(harness, "REPO_ROOT", tmp_path)  # a copy of the tree without .git
    assert harness.git_commit() == harness.UNKNOWN


def test_source_hash_is_stable():
    first = harness.source_hash()
    assert first == harness.source_hash() and len(first) == 16
    int(first, 16)


def test_command_lines():
    args = bench_decode.parse_args(["--quick", "--lengths", "8192,32768", "--targets", "0.1,0.3", "--no-flex"])
    assert args.quick and args.lengths == (8192, 32768) and args.targets == (0.1, 0.3) and args.no_flex
    assert harness.rep_ms(args) == harness.QUICK_REP_MS
    assert harness.rep_ms(bench_decode.parse_args([])) == harness.REP_MS
    args = bench_prefill.parse_args(["--quick", "--structure", "window=128,noise_std=0.5", "--time-budget", "90"])
    assert args.structure == {"window": 128, "noise_std": 0.5} and args.time_budget == 90.0
    args = bench_regularizer.parse_args(["--k", "32", "--lengths", "1024", "--out", "x.json"])
    assert args.k == 32 and args.lengths == (1024,) and args.out == "x.json" and not args.quick
    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--source", "nowhere"])
    with pytest.raises(SystemExit):
        bench_prefill.parse_args(["--structure", "window"])


def test_first_run_command_lines():
    args = bench_decode.parse_args(["--pairs", "16x32768,1x8192", "--no-calibrated", "--sdpa-backends", "flash,cudnn"])
    assert args.pairs == ((16, 32768), (1, 8192)) and args.no_calibrated and args.sdpa_backends == ("flash", "cudnn")
    args = bench_prefill.parse_args(["--shapes", "bf16:128:32:8:16384,fp16:64:16:16:4096", "--variants", "skip_dot"])
    assert args.shapes == (("bf16", 128, 32, 8, 16384), ("fp16", 64, 16, 16, 4096)) and args.variants == ("skip_dot",)
    assert bench_prefill.parse_args([]).variants == ("pipelined", "skip_dot", "skip_load")
    for argv in (["--pairs", "16:32768"], ["--sdpa-backends", "fast"]):
        with pytest.raises(SystemExit):
            bench_decode.parse_args(argv)
    for argv in (["--shapes", "bf16:128:32:8"], ["--shapes", "bf8:128:32:8:64"], ["--variants", "pipelined,fast"]):
        with pytest.raises(SystemExit):
            bench_prefill.parse_args(argv)


def test_record_helpers():
    assert harness.sdpa_fields({"flash": 1.0}) == {"sdpa_flash_ms": 1.0, "sdpa_efficient_ms": None,
                                                   "sdpa_cudnn_ms": None, "sdpa_math_ms": None}  # fmt: skip
    assert harness.number(torch.tensor(3, dtype=torch.int32)) == 3.0 and harness.number(None) is None
    assert harness.number(float("nan")) is None


def test_flex_shapes_alternate_between_files_in_measured_order():
    import bench_flex

    def rec(kind, lk, variant):
        shape = {"B": 1, "Hq": 4, "Hkv": 2, "Lq": 1 if kind == "decode" else lk, "Lk": lk, "D": 64}
        return _record(kind, shape=shape, variant=variant, **({"causal": True} if kind == "prefill" else {}))

    decode = [rec("decode", 256, "dense"), rec("decode", 256, "f_v=0.3"), rec("decode", 128, "dense")]
    prefill = [rec("prefill", 64, "dense"), rec("prefill", 64, "pipelined")]
    order = bench_flex.ordered_shapes([decode, prefill])
    assert [(i, key[0], key[6]) for i, key in order] == [(0, "decode", 256), (1, "prefill", 64), (0, "decode", 128)]
    assert order[0][1][-1] is False and order[1][1][-1] is True  # decode is not causal, prefill is


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal to measure without CUDA")
def test_benchmarks_refuse_to_measure_without_cuda():
    with pytest.raises(SystemExit, match="no CUDA"):
        harness.device_for(bench_decode.parse_args([]))
    assert harness.device_for(bench_decode.parse_args(["--smoke"])) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU timer")
def test_cpu_timing_helpers():
    ms, method = harness.time_ms([lambda: torch.ones(8).sum()] * 2)
    assert ms >= 0 and method == "cpu_timer"
    assert harness.rotation_count(1 << 10) == 1 and harness.rotation_count(1 << 40) == 1
    assert harness.ratio(2.0, 1.0) == 2.0 and harness.ratio(None, 1.0) is None and harness.ratio(1.0, 0.0) is None
    assert harness.json_number(float("inf")) is None
    sets = harness.input_copies((torch.ones(2),), 3)
    assert len(sets) == 3 and all(torch.equal(s[0], sets[0][0]) for s in sets)
    assert sets[1][0].data_ptr() != sets[0][0].data_ptr()


def test_rotation_count_arithmetic(monkeypatch):
    monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(harness, "l2_bytes", lambda: 50 * harness.MIB)
    monkeypatch.setattr(harness, "free_bytes", lambda: 1 << 36)
    assert harness.rotation_count(40 * harness.MIB) == 5  # 4 x 50 MiB of L2 in 40 MiB sets
    assert harness.rotation_count(harness.MIB) == harness.MAX_ROTATION
    assert harness.rotation_count(1 << 30) == 1
    monkeypatch.setattr(harness, "free_bytes", lambda: 40 * harness.MIB)
    assert harness.rotation_count(10 * harness.MIB) == 1  # a quarter of the free memory holds one copy


def test_plot_and_summary_from_records(tmp_path):
    pytest.importorskip("matplotlib")
    decode = harness.ResultWriter(tmp_path / "results_decode.json")
    for f_v, dense in ((0.1, False), (0.3, False), (1.0, True)):
        decode.add(_record(kept_v_fraction=f_v, dense_mode=dense, bandwidth_fraction=0.7))
    prefill = harness.ResultWriter(tmp_path / "results_prefill.json")
    for length in (4096, 8192):
        shape = {"B": 1, "Hq": 32, "Hkv": 8, "Lq": length, "Lk": length, "D": 128}
        for dense in (False, True):
            prefill.add(_record("prefill", shape=shape, dense_mode=dense, skipped_tile_fraction=0.2, gbps=None,
                                source="synthetic", variant="dense" if dense else "sparse"))  # fmt: skip
    reg = harness.ResultWriter(tmp_path / "results_regularizer.json")
    for length in (1024, 2048):
        shape = {"B": 1, "Hq": 16, "Hkv": 16, "Lq": length, "Lk": length, "D": 64, "k": 64}
        extra = dict(ref_peak_mem_mb=100.0, sdpa_backend="flash", sdpa_peak_mem_mb={"flash": 2.0}, top_k=64)
        ref_ms = None if length > 1024 else 3.0
        reg.add(_record("regularizer", shape=shape, kept_element_fraction=None, ref_ms=ref_ms, **extra))
    (tmp_path / "notes.json").write_text("{}")  # not a results file: skipped with a warning
    assert plot_results.main([str(tmp_path)]) == 0
    png = tmp_path / "plots.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert len(table) == 2 + 3 + 4 + 2 and table[0].startswith("| kind")
    assert plot_results.main([str(tmp_path / "missing")]) == 1


def _smoke(module, tmp_path, *extra):
    out = tmp_path / f"{module.__name__}.json"
    rc = module.main(["--smoke", "--no-flex", "--backend", "reference", "--out", str(out), *extra])
    records = harness.load_records(out)
    assert rc == 0 and records
    assert all(r["check_ok"] is True and r["backend"] == "reference" for r in records)
    return records


@pytest.mark.skipif(torch.cuda.is_available(), reason="smoke runs are for machines without CUDA")
def test_decode_smoke_run(tmp_path):
    records = _smoke(bench_decode, tmp_path, "--source", "synthetic", "--batches", "1", "--targets", "0.3")
    assert [r["variant"] for r in records] == ["dense", "calibrated k=32", "f_v=0.3"]
    assert all(r["kind"] == "decode" and r["shape"]["Lq"] == 1 for r in records)
    assert records[0]["dense_mode"] and records[0]["kept_v_fraction"] == 1.0
    assert abs(records[2]["kept_v_fraction"] - 0.3) < 0.05
    assert records[0]["sdpa_all_ms"] and records[0]["flex_error"] == "skipped"


@pytest.mark.skipif(torch.cuda.is_available(), reason="smoke runs are for machines without CUDA")
def test_prefill_smoke_run(tmp_path):
    records = _smoke(bench_prefill, tmp_path, "--source", "synthetic")
    assert [r["dense_mode"] for r in records] == [True, False]
    assert 0.03 < records[1]["kept_element_fraction"] < 0.3
    assert records[1]["threshold"]["k"] == round(0.1 * 128 / 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="smoke runs are for machines without CUDA")
def test_regularizer_smoke_run(tmp_path):
    (record,) = _smoke(bench_regularizer, tmp_path)
    assert record["kind"] == "regularizer" and record["shape"]["k"] == 8 and record["ref_ms"] > 0
    assert 0.0 < record["topk_mass"] <= 1.0


def test_a_failing_shape_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    batches = []

    def boom(qkv, *args, **kwargs):
        batches.append(qkv.key.shape[0])
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(bench_decode, "run_shape", boom)
    argv = ["--smoke", "--no-flex", "--source", "synthetic", "--out", str(tmp_path / "d.json")]
    assert bench_decode.main(argv) == 1
    assert batches == [1, 2]  # the second shape ran after the first failed


def test_time_budget_stops_new_shapes(tmp_path):
    out = tmp_path / "p.json"
    assert bench_prefill.main(["--smoke", "--no-flex", "--time-budget", "0", "--out", str(out)]) == 0
    assert not out.exists()


def test_pytest_benchmark_file_is_gpu_marked_and_skips_without_cuda():
    # (`pytest benchmarks/ --benchmark-only` on a CPU machine reports every test skipped.)
    import test_benchmarks

    names = {mark.name for mark in test_benchmarks.pytestmark}
    assert names == {"gpu", "skipif"}
    (skipif,) = [m for m in test_benchmarks.pytestmark if m.name == "skipif"]
    assert skipif.args[0] is (not torch.cuda.is_available())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path of the baselines")
def test_a_backend_without_native_gqa_is_timed_on_expanded_kv(monkeypatch):
    real = harness.sdpa_call

    def picky(q, k, v, *, causal, backend):
        if backend == "efficient" and q.shape[1] != k.shape[1]:
            raise RuntimeError("no GQA here")
        return real(q, k, v, causal=causal, backend="flash")

    monkeypatch.setattr(harness, "sdpa_call", picky)
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    base = harness.attention_baselines([(q, k, v)], causal=True, flex=False, warmup_ms=1, rep_ms=1, graph=False,
                                       backends=("flash", "efficient"))  # fmt: skip
    assert set(base["sdpa_all_ms"]) == {"flash", "efficient"} and base["sdpa_expanded_kv"] == ["efficient"]
    assert base["sdpa_errors"] == {"efficient (native GQA)": "RuntimeError: no GQA here"}
