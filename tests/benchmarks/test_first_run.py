"""benchmarks/first_run.sh on a CPU: its smoke mode end to end (the Triton interpreter, tiny shapes), its time guard,
and its list of GPU tests (every id exists and is GPU-marked, every shipped prefill tile config is covered), so the
script cannot rot between GPU runs. Nothing here measures a GPU."""

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))  # the benchmark scripts import each other as top-level modules

import harness  # noqa: E402

from sparse_attention.kernels import config  # noqa: E402

SCRIPT = BENCH_DIR / "first_run.sh"
TEST_LIST = BENCH_DIR / "first_run_tests.txt"
# What the script leaves under $OUT: a remote GPU run returns at most eight files.
FILES = {"env.txt", "log.txt", "junit.xml", "results_decode.json", "results_prefill.json", "results_e2e.json",
         "plots.png", "summary.md"}  # fmt: skip
REMOTE_FILE_LIMIT = 8
REMOTE_COMMAND_SECONDS = 480  # the one remote GPU command the script is sized for
GPU_SKIP_REASON = "needs a CUDA device"  # tests/conftest.py's skip of GPU-marked tests without CUDA


def _listed_ids() -> list[str]:
    lines = (line.strip() for line in TEST_LIST.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _run(out: Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "FIRST_RUN_SMOKE": "1", "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("first_run")
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return out


def test_smoke_run_writes_the_files_a_remote_run_returns(smoke):
    assert {p.name for p in smoke.iterdir()} == FILES and len(FILES) <= REMOTE_FILE_LIMIT
    log = (smoke / "log.txt").read_text()
    for stage in ("tests", "decode", "prefill", "flex", "e2e", "plot"):
        assert f"=== {stage}: rc=0" in log, stage
    assert "all stages passed" in log and "skipped," not in log
    env = dict(line.split(": ", 1) for line in (smoke / "env.txt").read_text().splitlines() if ": " in line)
    for key in ("device", "torch", "triton", "transformers", "commit", "package", "cpu_count"):
        assert env.get(key), key
    assert "env SPARSE_ATTENTION_AUTOTUNE=0" in (smoke / "env.txt").read_text()
    assert (smoke / "plots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_records_are_valid_and_complete(smoke):
    decode = harness.load_records(smoke / "results_decode.json")
    prefill = harness.load_records(smoke / "results_prefill.json")
    (e2e,) = harness.load_records(smoke / "results_e2e.json")
    assert [r["variant"] for r in decode] == ["dense", "f_v=0.3"]
    assert abs(decode[1]["kept_v_fraction"] - 0.3) < 0.05 and decode[0]["kept_v_fraction"] == 1.0
    # Dense mode, then the kept-0.1 thresholds in every main-loop variant, through the kernels (the interpreter).
    assert [r["variant"] for r in prefill] == ["dense", "pipelined", "skip_dot", "skip_load"]
    assert all(r["backend"] == "triton" and r["block_config"] == list(config.PREFILL_INTERPRET_CONFIG) for r in prefill)
    assert len({r["kept_element_fraction"] for r in prefill[1:]}) == 1 and prefill[1]["kept_element_fraction"] < 0.3
    assert all(0.0 <= r["skipped_tile_fraction"] <= 1.0 for r in prefill)
    for r in decode + prefill:
        assert r["check_ok"] is True and r["ms"] > 0, r["variant"]
        assert r["sdpa_flash_ms"] > 0 and "sdpa_cudnn_ms" in r and "sdpa_efficient_ms" in r
        assert r["speedup_vs_sdpa"] == pytest.approx(r["sdpa_ms"] / r["ms"])
    # FlexAttention ran last, on one shape in smoke mode (the first decode shape): its records only.
    assert all(r["flex_ms"] > 0 and r["speedup_vs_flex"] == pytest.approx(r["flex_ms"] / r["ms"]) for r in decode)
    assert all(r["flex_ms"] is None for r in prefill)
    assert e2e["kind"] == "e2e" and e2e["check_ok"] is True and e2e["ms"] > 0 and e2e["sdpa_ms"] > 0
    assert e2e["tokens_per_s"] == pytest.approx(1e3 / e2e["ms"]) and 0.0 < e2e["kept_v_fraction"] <= 1.0
    rows = (smoke / "summary.md").read_text().splitlines()
    assert len(rows) == 2 + len(decode) + len(prefill) + 1


def test_listed_tests_exist_and_are_gpu_marked(smoke):
    """The smoke run executed the listed ids; on a CPU each one is reported skipped by tests/conftest.py's rule for
    GPU-marked tests. An id that does not exist fails the run; one without the mark would run or skip otherwise."""
    listed = _listed_ids()
    assert len(listed) == len(set(listed)) and 25 <= len(listed) <= 40
    suite = ET.parse(smoke / "junit.xml").getroot().find("testsuite")
    reported = {}
    for case in suite.iter("testcase"):
        node = case.get("classname").replace(".", "/") + ".py::" + case.get("name")
        skipped = case.find("skipped")
        reported[node] = None if skipped is None else skipped.get("message")
    assert {node: reported.get(node, "not run") for node in listed} == dict.fromkeys(listed, GPU_SKIP_REASON)


def test_every_shipped_prefill_config_is_listed():
    listed = set(_listed_ids())
    for block in config.PREFILL_CONFIGS:
        node = "tests/kernels/test_prefill.py::test_gpu_every_shipped_config[bf16-128-M{}-N{}-W{}-S{}]".format(*block)
        assert node in listed, f"{block} has no compiled-kernel test in {TEST_LIST.name}"
    files = {node.split("::")[0] for node in listed}
    assert files == {"tests/kernels/test_prefill.py", "tests/kernels/test_decode.py",
                     "tests/kernels/test_regularizer.py", "tests/hf/test_no_host_sync.py"}  # fmt: skip


def test_stage_limits_fit_one_remote_command():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    text = SCRIPT.read_text()
    budget = int(re.search(r'BUDGET="\$\{FIRST_RUN_BUDGET:-(\d+)\}"', text).group(1))
    assert budget <= REMOTE_COMMAND_SECONDS - 25  # room for the shell, the file listing and the transfer of $OUT


def test_time_guard_skips_stages_when_the_budget_is_spent(tmp_path):
    # A budget that covers set-up alone: every later stage is skipped, and the run still ends cleanly with its log.
    proc = _run(tmp_path, FIRST_RUN_BUDGET="20")
    assert proc.returncode == 0, proc.stdout[-3000:]
    log = (tmp_path / "log.txt").read_text()
    for stage in ("tests", "decode", "prefill", "flex", "e2e", "plot"):
        assert f"=== {stage}: skipped" in log, stage
    assert {p.name for p in tmp_path.iterdir()} == {"env.txt", "log.txt"}
