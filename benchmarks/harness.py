"""Shared benchmark harness: timing, baselines, machine floors, correctness checks and the results format.

Every benchmark (``bench_prefill.py``, ``bench_decode.py``, ``bench_regularizer.py``, ``test_benchmarks.py``) goes
through this module, so that all numbers of one run are taken the same way:

- **Timing** (:func:`time_ms`): ``triton.testing.do_bench`` with ``return_mode="median"`` (it flushes the L2 cache
  before every repeat), after a warm-up call that keeps compilation and autotuning out of the numbers. The timed unit
  runs the function once on each of several copies of the inputs (:func:`rotation_count`), so that even without the
  flush no input sits in the cache. Forward calls are captured in a CUDA graph and the graph is replayed, because a
  decode step takes microseconds and Python launch overhead would otherwise be timed instead of the kernels; the
  same is done for every baseline. Where capture fails the call is timed eagerly and the record says so.
- **Baselines**: PyTorch SDPA per backend (flash, efficient, cuDNN, math where it fits in memory) through
  ``torch.nn.attention.sdpa_kernel``, and compiled FlexAttention with a causal block mask.
- **Floors** (DESIGN.md "Performance yardsticks"): the device-to-device copy bandwidth (bytes read plus bytes
  written) and the bf16 matrix-product rate, measured once per process (:func:`machine_rates`).
- **Records** (:data:`REQUIRED_KEYS`, :func:`make_record`, :func:`validate_record`, :class:`ResultWriter`): a JSON
  list of flat dicts (``kind`` "prefill", "decode", "regularizer" or "e2e"), rewritten after every record so that a
  run cut short keeps what it measured.

On a machine without CUDA the module imports and its record, CLI and CPU-timer parts work (the ``--smoke`` mode
of the benchmarks and the CPU tests use them); nothing is ever measured there for the results files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
COMMIT_ENV = "SPARSE_ATTENTION_COMMIT"
UNKNOWN = "unknown"
KINDS = ("prefill", "decode", "regularizer", "e2e")
MIB = 1 << 20

# Every record has these keys (a value may be None where it does not apply, e.g. gbps for compute-bound prefill).
REQUIRED_KEYS = (
    "kind",
    "device",
    "torch",
    "triton",
    "commit",
    "command",
    "dtype",
    "shape",
    "ms",
    "variant",
    "sdpa_ms",
    "sdpa_cudnn_ms",
    "flex_ms",
    "floor_ms",
    "speedup_vs_sdpa",
    "skipped_tile_fraction",
    "dense_mode",
    "gbps",
    "peak_mem_mb",
)
# Besides REQUIRED_KEYS, each kind reports its kept fraction under this key (e2e: the decode steps' kept V rows).
KEPT_KEY = {
    "prefill": "kept_element_fraction",
    "decode": "kept_v_fraction",
    "regularizer": "kept_element_fraction",
    "e2e": "kept_v_fraction",
}
_NUMBER_KEYS = (
    "ms",
    "sdpa_ms",
    "sdpa_cudnn_ms",
    "flex_ms",
    "floor_ms",
    "speedup_vs_sdpa",
    "skipped_tile_fraction",
    "gbps",
    "peak_mem_mb",
)
_STRING_KEYS = ("device", "torch", "triton", "commit", "command", "dtype", "variant")
SHAPE_KEYS = ("B", "Hq", "Hkv", "Lq", "Lk", "D")

# Timing defaults (milliseconds of do_bench warm-up and repeats), full run and --quick.
WARMUP_MS = 25
REP_MS = 200
QUICK_REP_MS = 60
# Rotate among input copies until they total this many times the L2 size, with at most MAX_ROTATION copies and
# no more than ROTATION_MEMORY_SHARE of the free device memory.
ROTATION_L2_MULTIPLE = 4
MAX_ROTATION = 8
ROTATION_MEMORY_SHARE = 0.25
DEFAULT_L2_BYTES = 50 * MIB
# A materialising baseline (SDPA math, the reference regularizer) runs only when its estimated footprint is below
# this share of the free device memory.
MATERIALIZE_MEMORY_SHARE = 0.5
# Machine-rate probes: a 1 GiB copy, an 8192³ bf16 matrix product.
COPY_PROBE_BYTES = 1 << 30
MATMUL_PROBE_N = 8192
# CPU timer (smoke runs only): repeats per measurement.
CPU_TIMER_REPEATS = 3

# Relative error ‖out − ref‖ / ‖ref‖ allowed against the float32 reference. Thresholding adds to rounding: a score
# within rounding of θ may be kept by one side and dropped by the other, moving that element's p·v.
REL_TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4}
# Fraction of kept/dropped decisions allowed to differ from the reference (scores within rounding of θ).
KEPT_MISMATCH_TOL = 1e-3

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def log(*parts) -> None:
    """Print to stderr immediately (the GPU log interleaves several processes)."""
    print(*parts, file=sys.stderr, flush=True)


# ---- environment ----------------------------------------------------------------------------------------------------
def git_commit() -> str:
    """The commit measured (``sparse_attention.recipes.report.git_commit``: ``$SPARSE_ATTENTION_COMMIT`` when set, as on
    a GPU machine that receives the working tree without ``.git``)."""
    from sparse_attention.recipes.report import git_commit as commit

    return commit(REPO_ROOT)


def source_hash() -> str:
    """SHA-256 (first 16 hex digits) of the package and kernel sources: identifies the code measured even where
    the commit is unknown."""
    digest = hashlib.sha256()
    for folder in ("kernels", "sparse_attention"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            digest.update(path.relative_to(REPO_ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return UNKNOWN


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    """Device and software versions common to every record of this process."""
    cuda = torch.cuda.is_available()
    env = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "transformers": _package_version("transformers"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "source_hash": source_hash(),
        "command": shlex.join(["python", *sys.argv]),
    }
    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["sm_count"] = props.multi_processor_count
        env["l2_mb"] = round(getattr(props, "L2_cache_size", 0) / MIB, 1)
        env["gpu_mem_gb"] = round(props.total_memory / 2**30, 1)
    return env


def environment_text() -> str:
    """The software and device description a GPU run writes to ``env.txt`` (one ``key: value`` per line): the
    record environment, where the package was imported from, device properties, package versions and the settings
    read from the environment. Raises ``ImportError`` when ``sparse_attention.kernels`` does not import."""
    import sparse_attention.kernels as kernels  # fails when the package is not installed: env.txt's caller checks

    lines = [f"{key}: {value}" for key, value in environment().items()]
    lines.append(f"package: {Path(kernels.__file__).parent.parent}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        lines.append(f"capability: {props.major}.{props.minor}")
        lines.append(f"cudnn: {torch.backends.cudnn.version()}")
    for name in ("numpy", "pytest", "pytest-xdist", "pytest-timeout", "matplotlib"):
        lines.append(f"{name}: {_package_version(name)}")
    lines.append(f"cpu_count: {os.cpu_count()}")
    lines.append(f"platform: {platform.platform()}")
    for key in sorted(os.environ):
        if key.startswith(("SPARSE_ATTENTION_", "TRITON_", "FIRST_RUN_")) or key == "CUDA_VISIBLE_DEVICES":
            lines.append(f"env {key}={os.environ[key]}")
    return "\n".join(lines) + "\n"


_RATES: dict | None = None


def _copy_gbps() -> float:
    from triton.testing import do_bench

    src = torch.empty(COPY_PROBE_BYTES // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    return 2 * COPY_PROBE_BYTES / (ms * 1e-3) / 1e9  # bytes read plus bytes written


def _matmul_tflops() -> float:
    from triton.testing import do_bench

    n = MATMUL_PROBE_N
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: a @ b, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


def machine_rates() -> dict:
    """Measured once per process: ``copy_gbps`` (device-to-device copy, bytes read plus written, GB/s) and
    ``matmul_tflops`` (8192³ bf16 product). ``None`` values without CUDA."""
    global _RATES
    if _RATES is not None:
        return _RATES
    if not torch.cuda.is_available():
        _RATES = {"copy_gbps": None, "matmul_tflops": None}
        return _RATES
    _RATES = {"copy_gbps": _copy_gbps(), "matmul_tflops": _matmul_tflops()}
    torch.cuda.empty_cache()
    log(f"machine: copy {_RATES['copy_gbps']:.0f} GB/s (read+write), bf16 matmul {_RATES['matmul_tflops']:.0f} TFLOP/s")
    return _RATES


# ---- records --------------------------------------------------------------------------------------------------------
def make_record(kind: str, env: dict, rates: dict, **fields) -> dict:
    """A results record: the environment, the machine rates and ``fields``, validated."""
    record = {"kind": kind, **env, **rates, **fields}
    validate_record(record)
    return record


def record_problems(record) -> list[str]:
    """Everything wrong with one record (empty when it is valid)."""
    if not isinstance(record, dict):
        return [f"a record must be a dict, got {type(record).__name__}"]
    problems = [f"missing key {key!r}" for key in REQUIRED_KEYS if key not in record]
    kind = record.get("kind")
    if kind not in KINDS:
        problems.append(f"kind must be one of {KINDS}, got {kind!r}")
    elif KEPT_KEY[kind] not in record:
        problems.append(f"missing key {KEPT_KEY[kind]!r} for kind {kind!r}")
    for key in _NUMBER_KEYS + ("kept_element_fraction", "kept_v_fraction"):
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)):
            problems.append(f"{key} must be a number or None, got {value!r}")
    for key in _STRING_KEYS:
        if key in record and not isinstance(record[key], str):
            problems.append(f"{key} must be a string, got {record[key]!r}")
    if "dense_mode" in record and not isinstance(record["dense_mode"], bool):
        problems.append(f"dense_mode must be a bool, got {record['dense_mode']!r}")
    shape = record.get("shape")
    if "shape" in record:
        if not isinstance(shape, dict) or any(k not in shape for k in SHAPE_KEYS):
            problems.append(f"shape must be a dict with keys {SHAPE_KEYS}, got {shape!r}")
    ms = record.get("ms")
    if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms <= 0:
        problems.append(f"ms must be positive, got {ms}")
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as exc:
        problems.append(f"not JSON-serialisable: {exc}")
    return problems


def validate_record(record) -> None:
    """Raise ``ValueError`` listing every problem of ``record``."""
    problems = record_problems(record)
    if problems:
        raise ValueError("invalid benchmark record: " + "; ".join(problems))


def load_records(path) -> list[dict]:
    """Read and validate a results file (a JSON list of records)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: a results file holds a JSON list of records")
    for i, record in enumerate(data):
        problems = record_problems(record)
        if problems:
            raise ValueError(f"{path}: record {i}: " + "; ".join(problems))
    return data


class ResultWriter:
    """Collects records and rewrites the results file after each one (atomically), so a run cut short by a time
    limit still leaves valid JSON with everything measured so far."""

    def __init__(self, path):
        self.path = Path(path)
        self.records: list[dict] = []
        self.failures: list[str] = []

    def add(self, record: dict) -> None:
        validate_record(record)
        self.records.append(record)
        self.flush()

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.records, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, self.path)


def json_number(value):
    """``value`` as a plain float for JSON, ``None`` for None, NaN or infinity."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def number(value):
    """A statistic (a Python number or a 0-d device tensor, e.g. a kernel's tile count) as a float for a record;
    ``None`` stays ``None``. Synchronises: use outside timed regions only."""
    if value is None:
        return None
    return json_number(value.item() if isinstance(value, torch.Tensor) else value)


def ratio(numerator, denominator):
    """``numerator / denominator``, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


# ---- command line ---------------------------------------------------------------------------------------------------
def parse_structure(text: str | None) -> dict:
    """``"key=value,key=value"`` overrides of :class:`synthetic.StructureConfig` (numbers)."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--structure takes key=value pairs, got {item!r}")
        number = float(value)
        out[name.strip()] = int(number) if number.is_integer() and "." not in value else number
    return out


def parse_backends(text: str) -> tuple[str, ...]:
    """``"flash,cudnn"`` as a tuple of SDPA backend names, each one of :data:`SDPA_BACKEND_NAMES`."""
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in SDPA_BACKEND_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"SDPA backends must be among {SDPA_BACKEND_NAMES}, got {text!r}")
    return names


def common_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a reduced shape set and shorter repeats")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on whatever device is there, for checking the script itself; never for results",
    )
    parser.add_argument("--out", default=str(RESULTS_DIR / default_out), help="results JSON path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("triton", "reference"), default="triton", help="our implementation")
    parser.add_argument("--no-flex", action="store_true", help="skip the FlexAttention baseline (saves compiles)")
    parser.add_argument(
        "--sdpa-backends",
        type=parse_backends,
        default=None,
        help=f"SDPA backends to time, comma-separated from {','.join(SDPA_BACKEND_NAMES)} (default: the script's)",
    )
    parser.add_argument("--no-graph", action="store_true", help="time eagerly instead of replaying CUDA graphs")
    parser.add_argument("--warmup-ms", type=float, default=WARMUP_MS)
    parser.add_argument("--rep-ms", type=float, default=None, help=f"do_bench repeat time (default {REP_MS}, quick "
                        f"{QUICK_REP_MS})")  # fmt: skip
    parser.add_argument(
        "--time-budget", type=float, default=None, help="seconds; no new shape starts after this (default: none)"
    )
    parser.add_argument(
        "--structure", type=parse_structure, default={}, help="synthetic generator overrides, e.g. window=128"
    )
    return parser


def rep_ms(args) -> float:
    if args.rep_ms is not None:
        return args.rep_ms
    return QUICK_REP_MS if args.quick else REP_MS


class Deadline:
    """Stops starting new work after ``budget`` seconds (None: never)."""

    def __init__(self, budget: float | None):
        self.start = time.monotonic()
        self.budget = budget

    def expired(self) -> bool:
        return self.budget is not None and time.monotonic() - self.start > self.budget


def device_for(args) -> torch.device:
    """CUDA for measurements; the CPU only for ``--smoke``. Raises ``SystemExit`` without CUDA otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if args.smoke:
        return torch.device("cpu")
    raise SystemExit("no CUDA device: benchmarks measure GPUs only (use --smoke to check the script on CPU)")


# ---- timing ---------------------------------------------------------------------------------------------------------
def l2_bytes() -> int:
    if not torch.cuda.is_available():
        return DEFAULT_L2_BYTES
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def free_bytes() -> int:
    if not torch.cuda.is_available():
        return 1 << 62
    return torch.cuda.mem_get_info()[0]


def rotation_count(set_bytes: int) -> int:
    """Input copies to rotate among so that together they exceed the cache several times over (1 without CUDA:
    smoke runs time nothing worth protecting from a cache)."""
    if set_bytes <= 0 or not torch.cuda.is_available():
        return 1
    wanted = math.ceil(ROTATION_L2_MULTIPLE * l2_bytes() / set_bytes)
    affordable = max(1, int(ROTATION_MEMORY_SHARE * free_bytes() // set_bytes))
    return max(1, min(MAX_ROTATION, wanted, affordable))


def _cpu_time_ms(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(CPU_TIMER_REPEATS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """Capture ``fn`` (already run once, so compiled and autotuned) in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # a warm-up on the capture stream, as torch.cuda.graph's documentation asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_ms(
    fns: Sequence[Callable[[], object]],
    *,
    warmup_ms: float = WARMUP_MS,
    rep_ms: float = REP_MS,
    graph: bool = True,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> tuple[float, str]:
    """Median milliseconds of one call, timing the unit "each of ``fns`` once" (one per rotated input copy).

    Returns ``(ms, method)`` with method ``"cuda_graph"``, ``"eager"`` or ``"cpu_timer"`` (no CUDA: smoke runs).
    """
    fns = list(fns)

    def unit():
        for fn in fns:
            fn()

    if not torch.cuda.is_available():
        unit()
        return _cpu_time_ms(unit) / len(fns), "cpu_timer"
    from triton.testing import do_bench

    unit()  # compiles and autotunes outside the timed region and outside any capture
    torch.cuda.synchronize()
    if graph:
        try:
            g = capture_graph(unit)
            ms = do_bench(g.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
            del g
            return ms / len(fns), "cuda_graph"
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager timing, and is recorded
            torch.cuda.synchronize()
            log(f"  (CUDA graph capture failed, timing eagerly: {type(exc).__name__}: {str(exc)[:200]})")
    ms = do_bench(unit, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")
    return ms / len(fns), "eager"


def peak_memory_mb(fn: Callable[[], object]) -> float | None:
    """Device memory ``fn`` allocates beyond what is already allocated (outputs and workspaces), in MiB, from
    ``torch.cuda.max_memory_allocated``; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak / MIB


def release() -> None:
    """Free cached blocks between shapes, so one shape's leftovers do not shrink the next one's rotation."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- baselines ------------------------------------------------------------------------------------------------------
SDPA_BACKEND_NAMES = ("flash", "efficient", "cudnn", "math")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


def sdpa_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, backend: str) -> Callable:
    """A closure running PyTorch SDPA on one backend. ``causal`` uses SDPA's top-left alignment, which equals ours
    (bottom-right) when ``Lq == Lk``; decode passes ``causal=False`` (its one row sees every key)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    gqa = q.shape[1] != k.shape[1]
    chosen = _sdpa_backend(backend)

    def run():
        with sdpa_kernel([chosen]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return run


def math_fits(b: int, hq: int, lq: int, lk: int, d: int = 0, elt: int = 2) -> bool:
    """Whether SDPA's math backend fits: about four float32 ``[B, Hq, Lq, Lk]`` temporaries, K and V expanded to
    every query head (how it runs grouped-query attention), and all of it twice (a CUDA graph's private pool)."""
    need = 2 * (4 * 4 * b * hq * lq * lk + 2 * b * hq * lk * d * elt)
    return need < MATERIALIZE_MEMORY_SHARE * free_bytes()


_FLEX_COMPILED = None


def _compiled_flex():
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # Every benchmarked shape is a new specialisation; the default limit (8) would fall back to eager flex.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        if torch.cuda.is_available():
            _FLEX_COMPILED = torch.compile(flex_attention)
        else:
            _FLEX_COMPILED = flex_attention  # eager flex on CPU (smoke runs): correct, slow, no compiler needed
    return _FLEX_COMPILED


def flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> Callable:
    """A closure running FlexAttention (compiled on CUDA) with a bottom-right causal block mask (``None`` when not
    causal or when every row sees every key)."""
    from torch.nn.attention.flex_attention import create_block_mask

    lq, lk = q.shape[2], k.shape[2]
    offset = lk - lq
    block_mask = None
    if causal and lq > 1:

        def causal_mask(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        block_mask = create_block_mask(causal_mask, None, None, lq, lk, device=q.device)
    flex = _compiled_flex()
    gqa = q.shape[1] != k.shape[1]
    return lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def try_time(
    name: str, make_fns: Callable[[], Sequence[Callable]], timing: dict, errors: dict, **kwargs
) -> float | None:
    """Time a baseline, recording its method in ``timing`` or why it could not run in ``errors``."""
    try:
        ms, method = time_ms(make_fns(), **kwargs)
    except Exception as exc:  # noqa: BLE001 - a baseline that cannot run this shape is recorded, not fatal
        errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        release()
        return None
    timing[name] = method
    return ms


def guarded(writer: ResultWriter, label: str, fn: Callable, *args, **kwargs) -> None:
    """Run one shape; an exception is logged with its traceback and recorded as a failure instead of ending the run
    (what was measured before it is already in the results file)."""
    import traceback

    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - one failing shape must not lose the rest of the run
        log(traceback.format_exc())
        writer.failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:300]}")
    release()


# ---- correctness ----------------------------------------------------------------------------------------------------
def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (inf when out has NaN or infinity)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        return math.inf
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def check_result(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> dict:
    """Compare an output with its float32 reference: ``{"check_rel_err", "check_ok"}``."""
    err = rel_error(out, ref)
    return {"check_rel_err": json_number(err), "check_ok": bool(err <= REL_TOL[dtype])}


def summary_line(record: dict) -> str:
    """One line per record for the log."""
    shape = record["shape"]
    dims = " ".join(f"{k}={shape[k]}" for k in SHAPE_KEYS if k in shape)
    kept = record.get(KEPT_KEY[record["kind"]])

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    return (
        f"{record['kind']:<11} {record['dtype']:<4} {dims} {record['variant']} "
        f"kept={fmt(kept, '.3f')} ms={fmt(record['ms'], '.4f')} sdpa={fmt(record['sdpa_ms'], '.4f')} "
        f"flex={fmt(record['flex_ms'], '.4f')} floor={fmt(record['floor_ms'], '.4f')} "
        f"x_sdpa={fmt(record['speedup_vs_sdpa'], '.2f')} check={record.get('check_ok')}"
    )


def input_copies(tensors: Sequence[torch.Tensor], count: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` sets of the same inputs in distinct memory (the first set is ``tensors`` itself): identical values,
    so every copy gives the same statistics, while rotating among them defeats the cache."""
    sets = [tuple(tensors)]
    for _ in range(count - 1):
        sets.append(tuple(t.clone() for t in tensors))
    return sets


def _time_sdpa(name: str, sets, causal: bool, timing: dict, errors: dict, opts: dict) -> float | None:
    return try_time(f"sdpa_{name}", lambda: [sdpa_call(*s, causal=causal, backend=name) for s in sets], timing, errors,
                    **opts)  # fmt: skip


def attention_baselines(
    sets: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    causal: bool,
    flex: bool,
    warmup_ms: float,
    rep_ms: float,
    graph: bool,
    backends: Sequence[str] = SDPA_BACKEND_NAMES,
) -> dict:
    """Time SDPA on each of ``backends`` that runs the shape (math only where it fits) and, if ``flex``,
    FlexAttention, on the rotated input ``sets``. A backend that refuses grouped-query attention (``enable_gqa``) is
    timed again on K and V expanded to every query head, what its user would have to do (the bytes it reads grow
    by the group size; listed in ``sdpa_expanded_kv``). Returns ``sdpa_all_ms`` (backend → ms), ``sdpa_errors``,
    ``sdpa_expanded_kv``, ``flex_ms``, ``flex_error``, ``timing`` (name → method) and ``sdpa_peak_mem_mb`` (per
    backend that ran)."""
    q, k, _ = sets[0]
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    timing: dict = {}
    errors: dict = {}
    all_ms: dict = {}
    peaks: dict = {}
    expanded_kv: list = []
    opts = dict(warmup_ms=warmup_ms, rep_ms=rep_ms, graph=graph)
    group = hq // k.shape[1]
    for name in backends:
        if name == "math" and not math_fits(b, hq, lq, lk, d, q.element_size()):
            errors[name] = "skipped: its materialised [B, Hq, Lq, Lk] scores do not fit in memory"
            continue
        ms, used = _time_sdpa(name, sets, causal, timing, errors, opts), sets
        if ms is None and group > 1:
            errors[f"{name} (native GQA)"] = errors.pop(f"sdpa_{name}")
            used = [(sq, sk.repeat_interleave(group, 1), sv.repeat_interleave(group, 1)) for sq, sk, sv in sets]
            ms = _time_sdpa(name, used, causal, timing, errors, opts)
            if ms is not None:
                expanded_kv.append(name)
        if ms is not None:
            all_ms[name] = ms
            peaks[name] = peak_memory_mb(sdpa_call(*used[0], causal=causal, backend=name))
        else:
            errors[name] = errors.pop(f"sdpa_{name}")
        del used
        release()
    flex_ms, flex_error = None, "skipped"
    if flex:
        flex_errors: dict = {}
        flex_ms = try_time("flex", lambda: [flex_call(*s, causal=causal) for s in sets], timing, flex_errors, **opts)
        flex_error = flex_errors.get("flex")
        release()
    return {
        "sdpa_all_ms": all_ms,
        "sdpa_errors": errors,
        "sdpa_expanded_kv": expanded_kv,
        "flex_ms": flex_ms,
        "flex_error": flex_error if flex_ms is None else None,
        "timing": timing,
        "sdpa_peak_mem_mb": peaks,
    }


def sdpa_fields(all_ms: dict) -> dict:
    """``sdpa_<backend>_ms`` for every SDPA backend name (None where it did not run), for the records."""
    return {f"sdpa_{name}_ms": all_ms.get(name) for name in SDPA_BACKEND_NAMES}


def best_sdpa(all_ms: dict, preferred: str | None = None) -> tuple[float | None, str | None]:
    """``(ms, backend)``: the ``preferred`` backend when it ran, else the fastest that ran."""
    if preferred is not None and preferred in all_ms:
        return all_ms[preferred], preferred
    if not all_ms:
        return None, None
    name = min(all_ms, key=all_ms.get)
    return all_ms[name], name


if __name__ == "__main__":
    # `python benchmarks/harness.py env`: the environment description of benchmarks/first_run.sh (env.txt).
    if sys.argv[1:] != ["env"]:
        raise SystemExit("usage: python benchmarks/harness.py env")
    print(environment_text(), end="")
