#!/usr/bin/env bash
# The first GPU run: compiled-kernel correctness and the headline timings in one remote command of at most 8 minutes.
#
#   SPARSE_ATTENTION_COMMIT=$(git rev-parse HEAD) bash benchmarks/first_run.sh     # GPU machine: writes to $OUT
#   FIRST_RUN_SMOKE=1 OUT=/tmp/first_run bash benchmarks/first_run.sh              # CPU check of the script itself
#
# Stages, in order. Each runs under `timeout -s INT` (Python flushes what it has; KILL GRACE seconds later) with the
# smaller of its own limit and what the overall budget has left (FIRST_RUN_BUDGET, default 450 s, minus the plot's
# reserve); a stage left with less than MIN_STAGE seconds is skipped. Every record is written the moment it is
# measured, and the benchmarks start no new shape when their budget is near, so a stage cut short keeps its results.
#   setup   ~45 s  editable install (pip limited to 30 s; else the package through links on PYTHONPATH); env.txt
#                  (versions, device, clocks); not a timed stage: what it takes comes out of the budget
#   tests   200 s  the GPU tests of benchmarks/first_run_tests.txt, SPARSE_ATTENTION_AUTOTUNE=0, pytest-xdist
#                  (FIRST_RUN_WORKERS, default 8), a per-test timeout, junit.xml (what passed, even when cut short)
#   decode   75 s  bf16 D=128 Hq=32 Hkv=8, (B, Lk) = (16, 32k), (1, 32k), (1, 128k), (16, 8k); dense and f_v = 0.3
#   prefill  95 s  causal bf16 D=128 Hq=32 Hkv=8 at 16k, 4k, 32k: dense, and kept 0.1 in each main-loop variant
#   flex     45 s  compiled FlexAttention on the shapes above, in that order (30-60 s of compile per shape: one or two)
#   e2e      60 s  HF generate tokens/s, random-weight Llama-shaped model, 32k prompt, top_theta against sdpa
#   plot     20 s  plots.png and summary.md (its time is reserved from the start)
# Worst case: the budget, 450 s (each stage's limit already leaves its kill grace inside it), under the remote
# command's 480 s. Typical: about 6 minutes. All timings use SPARSE_ATTENTION_AUTOTUNE=0 (the first config the fit
# rule allows; autotuning six configs per specialisation does not fit the call) and SDPA's flash, cuDNN and efficient
# backends.
#
# Files under $OUT (default out/first_run): env.txt log.txt junit.xml results_decode.json results_prefill.json
# results_e2e.json plots.png summary.md: eight, as many as the remote run returns. Exit 0 when every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
OUT_DIR="${OUT:-$REPO/out/first_run}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/log.txt"
: >"$LOG"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
SMOKE="${FIRST_RUN_SMOKE:-0}"
BUDGET="${FIRST_RUN_BUDGET:-450}"
WORKERS="${FIRST_RUN_WORKERS:-8}"
TEST_TIMEOUT="${FIRST_RUN_TEST_TIMEOUT:-150}"
GRACE=10
MIN_STAGE=15
PLOT_RESERVE=20
# Seconds before its limit at which a benchmark stops starting new shapes: about one shape's worth.
MARGIN_DECODE=15
MARGIN_PREFILL=25
MARGIN_FLEX=40
export SPARSE_ATTENTION_AUTOTUNE=0
START=$SECONDS

if [ "$SMOKE" = 1 ]; then
    # The CPU check: the Triton interpreter, tiny shapes, no CUDA even where there is one.
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    DECODE_ARGS=(--smoke --backend reference --pairs 1x128 --targets 0.3)
    PREFILL_ARGS=(--smoke --shapes fp32:32:2:1:64 --targets 0.1)
    FLEX_ARGS=(--smoke --max-shapes 1)
    E2E_ARGS=(--smoke)
else
    DECODE_ARGS=(--quick --pairs 16x32768,1x32768,1x131072,16x8192 --targets 0.3)
    PREFILL_ARGS=(--quick --shapes bf16:128:32:8:16384,bf16:128:32:8:4096,bf16:128:32:8:32768 --targets 0.1)
    FLEX_ARGS=()
    E2E_ARGS=()
fi

say() { echo "$@" | tee -a "$LOG"; }
left() { echo $((BUDGET - (SECONDS - START))); }
# The --time-budget of a benchmark: its stage limit less MARGIN, at least 1 s (the first shape always starts).
bench_budget() { local b=$((STAGE_LIMIT - $1)); echo $((b > 1 ? b : 1)); }

FAILED=()
SKIPPED=()
# run_stage NAME COMMAND...: runs COMMAND under STAGE_LIMIT (set by stage_limit); DESC, when set, is logged instead
# of the command line.
run_stage() {
    local name="$1"
    shift
    local rc start=$SECONDS
    say "=== $name: start +$((SECONDS - START))s, limit ${STAGE_LIMIT}s: ${DESC:-$*}"
    DESC=
    timeout -s INT -k "$GRACE" "$STAGE_LIMIT" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    say "=== $name: rc=$rc after $((SECONDS - start))s$([ "$rc" = 124 ] && echo ' (time limit)')"
    [ "$rc" = 0 ] || FAILED+=("$name(rc=$rc)")
}

# stage_limit NAME MAX: sets STAGE_LIMIT to what NAME may use, or returns 1 (stage skipped) when too little is left.
stage_limit() {
    local name="$1" max="$2" avail
    avail=$(($(left) - PLOT_RESERVE - GRACE))
    STAGE_LIMIT=$((max < avail ? max : avail))
    if [ "$STAGE_LIMIT" -lt "$MIN_STAGE" ]; then
        say "=== $name: skipped, ${avail}s left of the ${BUDGET}s budget"
        SKIPPED+=("$name")
        return 1
    fi
}

# env.txt: versions, device, settings (harness.environment_text, which imports sparse_attention.kernels: its exit
# status says whether the package is importable) and the GPU's clocks.
write_env() {
    local rc
    {
        echo "first_run.sh $(date -Is) smoke=$SMOKE budget=${BUDGET}s workers=$WORKERS"
        PYTHONSAFEPATH=1 timeout -k 5 60 "$PY" benchmarks/harness.py env 2>&1
        rc=$?
        echo "--- GPU before the run"
        gpu_state
    } >"$OUT_DIR/env.txt"
    return $rc
}

# Make `import sparse_attention.kernels` work: kernels/ ships as that subpackage only when the project is installed.
setup() {
    if write_env; then
        say "sparse_attention already importable"
    elif timeout -k 5 30 "$PY" -m pip install --no-deps --no-build-isolation -q -e . >>"$LOG" 2>&1 && write_env; then
        say "installed the working tree in editable mode"
    else
        # No install possible: a folder of links laid out as the installed package, first on PYTHONPATH.
        local shim
        shim="$(mktemp -d)/site"
        mkdir -p "$shim/sparse_attention"
        ln -s "$REPO"/sparse_attention/* "$shim/sparse_attention/"
        ln -s "$REPO/kernels" "$shim/sparse_attention/kernels"
        export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
        write_env || say "the package does not import even through links: see env.txt"
        say "pip install failed; using the package through links in $shim"
    fi
    grep -E "^(device|torch|triton|transformers|commit|cuda|cudnn|capability|sm_count|package):" "$OUT_DIR/env.txt" |
        tee -a "$LOG"
}

gpu_state() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,pstate,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.draw,power.limit,temperature.gpu,memory.used,memory.total --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
}

say "first_run.sh $(date -Is) out=$OUT_DIR smoke=$SMOKE budget=${BUDGET}s"
say "commit: ${SPARSE_ATTENTION_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (set SPARSE_ATTENTION_COMMIT)")}"
setup
say "=== setup: done after $((SECONDS - START))s"

# ---- tests ------------------------------------------------------------------------------------------------------
mapfile -t TESTS < <(sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' benchmarks/first_run_tests.txt | grep -v -e '^#' -e '^$')
PYTEST_OPTS=(-p no:cacheprovider -v -rfE --tb=short --durations=12 --junitxml="$OUT_DIR/junit.xml")
if [ "$SMOKE" != 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
    PYTEST_OPTS+=(-n "$WORKERS")
else
    say "tests run in one process (smoke mode, or pytest-xdist is missing)"
fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    PYTEST_OPTS+=(--timeout="$TEST_TIMEOUT")
else
    say "pytest-timeout is missing: no per-test timeout"
fi
# PYTHONSAFEPATH=1: `python -m pytest` would otherwise put the repository root first on sys.path, where
# sparse_attention/ is the source folder without its kernels subpackage.
if stage_limit tests 200; then
    DESC="pytest ${PYTEST_OPTS[*]} <the ${#TESTS[@]} ids of benchmarks/first_run_tests.txt>"
    run_stage tests env PYTHONSAFEPATH=1 "$PY" -m pytest "${PYTEST_OPTS[@]}" "${TESTS[@]}"
fi

# ---- timings, in priority order ---------------------------------------------------------------------------------
BENCH_COMMON=(--source synthetic --no-flex --sdpa-backends flash,cudnn,efficient)
if stage_limit decode 75; then
    run_stage decode "$PY" benchmarks/bench_decode.py "${DECODE_ARGS[@]}" "${BENCH_COMMON[@]}" --no-calibrated \
        --out "$OUT_DIR/results_decode.json" --time-budget "$(bench_budget "$MARGIN_DECODE")"
fi
if stage_limit prefill 95; then
    run_stage prefill "$PY" benchmarks/bench_prefill.py "${PREFILL_ARGS[@]}" "${BENCH_COMMON[@]}" \
        --variants pipelined,skip_dot,skip_load --out "$OUT_DIR/results_prefill.json" \
        --time-budget "$(bench_budget "$MARGIN_PREFILL")"
fi
if stage_limit flex 45; then
    run_stage flex "$PY" benchmarks/bench_flex.py "${FLEX_ARGS[@]}" "$OUT_DIR/results_decode.json" \
        "$OUT_DIR/results_prefill.json" --time-budget "$(bench_budget "$MARGIN_FLEX")"
fi
if stage_limit e2e 60; then
    run_stage e2e "$PY" benchmarks/bench_e2e.py "${E2E_ARGS[@]}" --out "$OUT_DIR/results_e2e.json" \
        --time-budget "$(bench_budget 5)"
fi

# ---- plot (its time was reserved) -------------------------------------------------------------------------------
STAGE_LIMIT=$((PLOT_RESERVE - GRACE))
if compgen -G "$OUT_DIR/results_*.json" >/dev/null; then
    run_stage plot "$PY" benchmarks/plot_results.py "$OUT_DIR" --out "$OUT_DIR/plots.png" \
        --summary "$OUT_DIR/summary.md"
else
    say "=== plot: skipped, no results files"
    SKIPPED+=(plot)
fi

{
    echo "--- GPU after the run (+$((SECONDS - START))s)"
    gpu_state
} >>"$OUT_DIR/env.txt"
FILES=$(find "$OUT_DIR" -type f | wc -l)
say "files in $OUT_DIR: $FILES$([ "$FILES" -gt 8 ] && echo ' (more than the 8 a remote run returns)')"
[ ${#SKIPPED[@]} -eq 0 ] || say "SKIPPED stages (budget): ${SKIPPED[*]}"
if [ ${#FAILED[@]} -gt 0 ]; then
    say "FAILED stages: ${FAILED[*]} (total $((SECONDS - START))s)"
    exit 1
fi
say "all stages passed (total $((SECONDS - START))s)"
