#!/usr/bin/env bash
# The one command a GPU session runs, from the repository root:
#
#   SPARSE_ATTENTION_COMMIT=<git rev-parse HEAD of the tree sent> bash benchmarks/run_gpu.sh
#
# Stages, in order (each bounded by `timeout`, so one that hangs or overruns cannot take the others with it):
#   gpu-tests    pytest -m gpu tests/            (the CUDA-marked tests)
#   suite        pytest tests/ -m "not gpu"      (the rest of the suite, bounded)
#   bench-tests  pytest benchmarks/ --benchmark-only   (harness as pytest-benchmark: correctness + O(L) memory)
#   decode, prefill, regularizer                 (benchmarks/bench_*.py, --quick unless QUICK= is set)
#   plot                                         (benchmarks/plot_results.py: plots.png + summary.md)
# Name stages as arguments to run only those (`bash benchmarks/run_gpu.sh decode plot`); `tests` means the three test
# stages and `bench` the three benchmark stages. The default quick sizes finish in about 9 minutes on an H100, inside
# the device tool's 10-minute command limit; the full sizes (QUICK=) need one command per benchmark stage.
#
# Writes under $OUT (the device tool's folder; benchmarks/results when unset) six files, within the tool's eight:
#   results_decode.json results_prefill.json results_regularizer.json plots.png summary.md log.txt
# Exit status: 0 when every stage that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(tests bench plot)
EXPANDED=()
for s in "${STAGES[@]}"; do
    case "$s" in
    tests) EXPANDED+=(gpu-tests suite bench-tests) ;;
    bench) EXPANDED+=(decode prefill regularizer) ;;
    gpu-tests | suite | bench-tests | decode | prefill | regularizer | plot) EXPANDED+=("$s") ;;
    *)
        echo "unknown stage $s (gpu-tests suite bench-tests decode prefill regularizer plot tests bench)" >&2
        exit 2
        ;;
    esac
done

OUT_DIR="${OUT:-$REPO/benchmarks/results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/log.txt"
: >"$LOG"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
QUICK="${QUICK---quick}"
# Seconds per stage (override any with the environment). Together with set-up they stay under 600 s.
LIMIT_GPU_TESTS="${LIMIT_GPU_TESTS:-90}"
LIMIT_SUITE="${LIMIT_SUITE:-50}"
LIMIT_BENCH_TESTS="${LIMIT_BENCH_TESTS:-45}"
LIMIT_DECODE="${LIMIT_DECODE:-110}"
LIMIT_PREFILL="${LIMIT_PREFILL:-150}"
LIMIT_REGULARIZER="${LIMIT_REGULARIZER:-55}"
LIMIT_PLOT="${LIMIT_PLOT:-20}"
# A benchmark starts no new shape after its limit minus this margin, so it ends on its own and writes its records.
BENCH_MARGIN=30

say() { echo "$@" | tee -a "$LOG"; }

# Make `import sparse_attention.kernels` work: kernels/ ships as that subpackage only when the project is installed.
setup() {
    if (cd /tmp && "$PY" -c "import sparse_attention.kernels" 2>/dev/null); then
        say "sparse_attention already importable"
        return
    fi
    if "$PY" -m pip install --no-deps --no-build-isolation -q -e . >>"$LOG" 2>&1 &&
        (cd /tmp && "$PY" -c "import sparse_attention.kernels" 2>/dev/null); then
        say "installed the working tree in editable mode"
        return
    fi
    # No install possible: a folder of links laid out as the installed package, first on PYTHONPATH.
    local shim
    shim="$(mktemp -d)/site"
    mkdir -p "$shim/sparse_attention"
    ln -s "$REPO"/sparse_attention/* "$shim/sparse_attention/"
    ln -s "$REPO/kernels" "$shim/sparse_attention/kernels"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    say "pip install failed; using the package through links in $shim"
}

FAILED=()
run_stage() {
    local name="$1" limit="$2"
    shift 2
    say "=== $name: start $(date +%T), limit ${limit}s: $*"
    local start=$SECONDS
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "=== $name: rc=$rc after $((SECONDS - start))s$([ "$rc" = 124 ] && echo ' (time limit)')"
    [ "$rc" = 0 ] || FAILED+=("$name(rc=$rc)")
}

# pytest runs with PYTHONSAFEPATH=1: `python -m pytest` would otherwise put the repository root first on sys.path,
# where sparse_attention/ is the source folder without its kernels subpackage.
pytest_stage() {
    local name="$1" limit="$2"
    shift 2
    run_stage "$name" "$limit" env PYTHONSAFEPATH=1 "$PY" -m pytest -p no:cacheprovider -q -rfE "$@"
}

bench_stage() {
    local name="$1" limit="$2"
    # shellcheck disable=SC2086 # QUICK is a flag or empty
    run_stage "$name" "$limit" "$PY" "benchmarks/bench_$name.py" $QUICK --out "$OUT_DIR/results_$name.json" \
        --time-budget $((limit - BENCH_MARGIN))
}

say "run_gpu.sh $(date -Is) stages: ${EXPANDED[*]} quick='${QUICK}' out=$OUT_DIR"
say "commit: ${SPARSE_ATTENTION_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (set SPARSE_ATTENTION_COMMIT)")}"
nvidia-smi -L 2>&1 | tee -a "$LOG"
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton',
triton.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"
setup

for stage in "${EXPANDED[@]}"; do
    case "$stage" in
    gpu-tests) pytest_stage gpu-tests "$LIMIT_GPU_TESTS" -m gpu tests/ ;;
    suite) pytest_stage suite "$LIMIT_SUITE" -m "not gpu" tests/ ;;
    bench-tests) pytest_stage bench-tests "$LIMIT_BENCH_TESTS" benchmarks/ --benchmark-only ;;
    decode) bench_stage decode "$LIMIT_DECODE" ;;
    prefill) bench_stage prefill "$LIMIT_PREFILL" ;;
    regularizer) bench_stage regularizer "$LIMIT_REGULARIZER" ;;
    plot)
        run_stage plot "$LIMIT_PLOT" "$PY" benchmarks/plot_results.py "$OUT_DIR" --out "$OUT_DIR/plots.png" \
            --summary "$OUT_DIR/summary.md"
        ;;
    esac
done

if [ ${#FAILED[@]} -gt 0 ]; then
    say "FAILED stages: ${FAILED[*]}"
    exit 1
fi
say "all stages passed"
