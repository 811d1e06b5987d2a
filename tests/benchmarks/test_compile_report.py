"""The offline compile report (benchmarks/compile_report.py): its IR readers on short captured snippets, its case
table against the current launchers, and the CI check that compiles the kernels for sm_90a with the installed Triton
and no GPU.

The CI check (``-m compile`` selects it; it runs in the default suite) compiles ``--subset ci`` (D=128, sm_90a, per
tile shape of the shipped prefill config list the config with the most pipeline stages and the one with the fewest
warps): prefill dense bf16 and sparse fp16 on the default ``pipelined`` variant, the ``skip_dot`` and ``skip_load``
variants bf16, decode sparse and post bf16 (split, score pass, combine) and the regularizer's three kernels bf16 at
their default settings. Every one must compile with zero spill bytes and fit the H100/H200 shared memory of a block.
What each kernel's header promises about its main loops is checked where it is promised (:data:`LOOP_PROMISES`): the
pipelined prefill loads K and V by async copies and runs Q·Kᵀ and P·V on wgmma; the skip variants load K
asynchronously and run both products on wgmma (their V load is not promised to be asynchronous: ``skip_load`` reads V
inside the live-tile branch, ``skip_dot``'s register prefetch becomes an async copy with Triton 3.6 but not 3.9); the
decode split kernel copies K and V asynchronously and runs both products on the tensor cores (mma.sync, a 16-row
program is too narrow for wgmma); the regularizer loads its tiles asynchronously and runs its products on wgmma.
Nothing here runs on a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import compile_report as cr  # noqa: E402

# ---- IR readers on captured snippets ---------------------------------------------------------------------------------
# The prefill main loop as Triton 3.6.0 prints it for sm_90a (trimmed): K by cp.async into a 3-buffer ring and a wgmma
# Q·Kᵀ; V by tt.load inside the `if tl.max(keep) > 0` branch, staged through a local_alloc for a synchronous P·V wgmma.
TTGIR_SYNC_V = """\
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 64, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 128, 16]}>
module attributes {"ttg.num-warps" = 8 : i32, ttg.target = "cuda:90"} {
  tt.func public @k(%Q: !tt.ptr<bf16> {tt.divisibility = 16 : i32} loc("Q"(#loc)), %n: i32 loc("n"(#loc))) {
    %q = tt.load %qp : tensor<128x128x!tt.ptr<bf16>, #blocked> loc(#loc2)
    %q_1 = ttg.local_alloc %q : (tensor<128x128xbf16, #blocked>) -> !ttg.memdesc<128x128xbf16, #shared, #smem>
    %kt = ttg.local_alloc : () -> !ttg.memdesc<3x128x64xbf16, #shared1, #smem, mutable> loc(#loc3)
    %kt_0 = ttg.memdesc_index %kt[%c0_i32] : !ttg.memdesc<3x128x64xbf16> -> !ttg.memdesc<128x64xbf16>
    %kt_2 = ttg.async_copy_global_to_local %kp, %kt_0 mask %m : tensor<128x64x!tt.ptr<bf16>> -> <128x64xbf16>
    %r:3 = scf.for %i = %c0_i32 to %n step %c64_i32 iter_args(%acc = %cst, %slot = %c0_i32, %tok = %kt_2) -> (tensor<128x128xf32, #mma1>, i32, !ttg.async.token)  : i32 {
      %kt_3 = ttg.async_wait %tok {num = 1 : i32} loc(#loc3)
      %kt_4 = ttg.memdesc_index %kt[%slot] : !ttg.memdesc<3x128x64xbf16> -> !ttg.memdesc<128x64xbf16> loc(#loc3)
      %s = ttng.warp_group_dot %q_1, %kt_4, %cst_0 {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<128x128xbf16, #shared, #smem> * !ttg.memdesc<128x64xbf16, #shared1, #smem, mutable> -> tensor<128x64xf32, #mma>
      %s_5:3 = ttng.warp_group_dot_wait %s, %q_1, %kt_4 {pendings = 0 : i32} : tensor<128x64xf32, #mma>
      %p = math.exp2 %s_5#0 : tensor<128x64xf32, #mma> loc(callsite(#loc4 at #loc5))
      %kt_6 = ttg.memdesc_index %kt[%slot] : !ttg.memdesc<3x128x64xbf16> -> !ttg.memdesc<128x64xbf16>
      %kt_7 = ttg.async_copy_global_to_local %kp, %kt_6 mask %m : tensor<128x64x!tt.ptr<bf16>> -> <128x64xbf16>
      %8 = "tt.reduce"(%p) <{axis = 1 : i32}> ({
      ^bb0(%a: f32 loc(unknown), %b: f32 loc(unknown)):
        %v = arith.maxnumf %a, %b : f32
        tt.reduce.return %v : f32
      }) : (tensor<128x64xf32, #mma>) -> tensor<128xf32> loc(#loc6)
      %9 = scf.if %c -> (tensor<128x128xf32, #mma1>) {
        %v = tt.load %vp : tensor<64x128x!tt.ptr<bf16>, #blocked> loc(#loc7)
        %v_8 = ttg.local_alloc %v : (tensor<64x128xbf16, #blocked>) -> !ttg.memdesc<64x128xbf16, #shared, #smem>
        %a_9 = arith.truncf %p : tensor<128x64xf32, #mma> to tensor<128x64xbf16, #mma>
        %a_10 = ttg.convert_layout %a_9 : tensor<128x64xbf16, #mma> -> tensor<128x64xbf16, #ttg.dot_op<{opIdx = 0}>>
        ttng.fence_async_shared {bCluster = false} loc(#loc8)
        %o = ttng.warp_group_dot %a_10, %v_8, %acc {inputPrecision = 0 : i32} : tensor<128x64xbf16> * !ttg.memdesc<64x128xbf16, #shared, #smem> -> tensor<128x128xf32, #mma1>
        scf.yield %o : tensor<128x128xf32, #mma1> loc(#loc9)
      } else {
        scf.yield %acc : tensor<128x128xf32, #mma1> loc(#loc10)
      } loc(#loc11)
      scf.yield %9, %slot, %kt_7 : tensor<128x128xf32, #mma1>, i32, !ttg.async.token loc(#loc12)
    } loc(#loc13)
    tt.return loc(#loc)
  } loc(#loc)
} loc(#loc)
"""  # noqa: E501

# What the kernel helpers are asked for: V through its own cp.async ring as well (derived from the snippet above).
TTGIR_ASYNC_V = (
    TTGIR_SYNC_V.replace(
        "    %r:3 = scf.for",
        "    %vb = ttg.local_alloc : () -> !ttg.memdesc<2x64x128xbf16, #shared, #smem, mutable>\n    %r:3 = scf.for",
    )
    .replace(
        "%v = tt.load %vp : tensor<64x128x!tt.ptr<bf16>, #blocked> loc(#loc7)",
        "%vw = ttg.memdesc_index %vb[%slot] : !ttg.memdesc<2x64x128xbf16> -> !ttg.memdesc<64x128xbf16>\n"
        "        %vc = ttg.async_copy_global_to_local %vp, %vw : tensor<64x128x!tt.ptr<bf16>> -> <64x128xbf16>",
    )
    .replace(
        "%v_8 = ttg.local_alloc %v : (tensor<64x128xbf16, #blocked>) -> !ttg.memdesc<64x128xbf16, #shared, #smem>",
        "%v_8 = ttg.memdesc_index %vb[%slot] : !ttg.memdesc<2x64x128xbf16> -> !ttg.memdesc<64x128xbf16>",
    )
)

# Triton 3.9.0 for sm_80 (trimmed): mma.sync products fed by ttg.local_load (with a token operand), V synchronous.
TTGIR_SM80 = """\
#mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [2, 2], instrShape = [16, 8]}>
module attributes {ttg.target = "cuda:80"} {
  tt.func public @k(%n: i32) {
    %q = tt.load %qp : tensor<64x64x!tt.ptr<f16>, #blocked>
    %q_0 = ttg.local_alloc %q : (tensor<64x64xf16, #blocked>) -> !ttg.memdesc<64x64xf16, #shared, #smem>
    %kt = ttg.local_alloc : () -> !ttg.memdesc<2x64x64xf16, #shared1, #smem, mutable>
    %r = scf.for %i = %c0 to %n step %c64 iter_args(%acc = %cst) -> (tensor<64x64xf32, #mma>)  : i32 {
      %kt_1 = ttg.memdesc_index %kt[%i] : !ttg.memdesc<2x64x64xf16> -> !ttg.memdesc<64x64xf16>
      %kt_2 = ttg.async_copy_global_to_local %kp, %kt_1 mask %m {contiguity = 8 : i32} : tensor<64x64x!tt.ptr<f16>>
      %q_3 = ttg.local_load %q_0 : !ttg.memdesc<64x64xf16, #shared, #smem> -> tensor<64x64xf16, #ttg.dot_op<{opIdx = 0}>>
      %kt_4 = ttg.local_load %kt_1 token %kt_2 : !ttg.memdesc<64x64xf16> -> tensor<64x64xf16, #ttg.dot_op<{opIdx = 1}>>
      %s = tt.dot %q_3, %kt_4, %cst, inputPrecision = tf32 : tensor<64x64xf16> * tensor<64x64xf16> -> tensor<64x64xf32, #mma>
      %p = arith.truncf %s : tensor<64x64xf32, #mma> to tensor<64x64xf16, #mma>
      %p_5 = ttg.local_alloc %p : (tensor<64x64xf16, #mma>) -> !ttg.memdesc<64x64xf16, #shared, #smem>
      %p_6 = ttg.local_load %p_5 : !ttg.memdesc<64x64xf16, #shared, #smem> -> tensor<64x64xf16, #ttg.dot_op<{opIdx = 0}>>
      %v = tt.load %vp, %vm, %cst_2 : tensor<64x64x!tt.ptr<f16>, #blocked>
      %v_7 = ttg.local_alloc %v : (tensor<64x64xf16, #blocked>) -> !ttg.memdesc<64x64xf16, #shared, #smem>
      %v_8 = ttg.local_load %v_7 : !ttg.memdesc<64x64xf16, #shared, #smem> -> tensor<64x64xf16, #ttg.dot_op<{opIdx = 1}>>
      %o = tt.dot %p_6, %v_8, %acc, inputPrecision = tf32 : tensor<64x64xf16> * tensor<64x64xf16> -> tensor<64x64xf32, #mma>
      scf.yield %o : tensor<64x64xf32, #mma>
    }
    tt.return
  }
}
"""  # noqa: E501

# Triton 3.6.0 PTX of the loop above (trimmed): LLVM's loop comments delimit it, the latch blocks before the header.
PTX = """\
.visible .entry k(
)
{
	bra.uni 	$L__BB0_2;
$L__BB0_4:                              //   in Loop: Header=BB0_2 Depth=1
	add.s32 	%r1, %r1, 1;
	@%p1 bra 	$L__BB0_2;
	bra.uni 	$L__BB0_6;
$L__BB0_2:                              // %__nv_exp2f.exit441
                                        // =>This Inner Loop Header: Depth=1
	cp.async.wait_group 	1;
	bar.sync 	0;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r2}, %rd1, %rd2, p, 1, 1, 0, 1;
	cp.async.cg.shared.global [ %r3 + 0 ], [ %rd3 + 0 ], 0x10, %r4;
	@%p2 bra 	$L__BB0_4;
// %bb.3:                               //   in Loop: Header=BB0_2 Depth=1
	@%p3 ld.global.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd4 + 0 ];
	bar.sync 	0;
	fence.proxy.async.shared::cta;
	bar.sync 	0;
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r9}, %rd5, %rd6, p, 1, 1, 0, 1;
	bra.uni 	$L__BB0_4;
$L__BB0_6:                              // %._crit_edge
	bar.sync 	0;
	ret;
}
"""

PTXAS_LOGS = (
    # Triton 3.6.0 (ptxas of CUDA 12.8) and 3.9.0 (which uses ptxas-blackwell for sm_90a too)
    "ptxas info    : Compiling entry function 'k' for 'sm_90a'\nptxas info    : Function properties for k\n"
    "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
    "ptxas info    : Used 196 registers, used 1 barriers\n",
    "ptxas-blackwell info    : Function properties for k\n"
    "    16 bytes stack frame, 1000 bytes spill stores, 932 bytes spill loads\n"
    "ptxas-blackwell info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size\n",
)


def test_ttgir_prefill_loop_with_synchronous_v():
    facts = cr.analyse_ttgir(TTGIR_SYNC_V)
    (loop,) = facts["loops"]
    assert [p["role"] for p in loop["products"]] == ["score", "second"]
    assert facts["k_async"] is True and facts["k_load"] == "cp.async" and facts["k_buffers"] == 3
    assert facts["v_async"] is False and facts["v_load"] == "tt.load" and facts["v_buffers"] == 1
    assert facts["qk_mma"] == facts["pv_mma"] == "wgmma"
    assert facts["qk_wgmma"] is True and facts["pv_wgmma"] is True
    assert facts["qk_wgmma_async"] is True and facts["pv_wgmma_async"] is False
    assert facts["async_copies_in_loop"] == [1] and facts["sync_loads_in_loop"] == [1]
    assert loop["barriers"] == 1 and loop["async_waits"] == 1


def test_ttgir_prefill_loop_with_asynchronous_v():
    facts = cr.analyse_ttgir(TTGIR_ASYNC_V)
    assert facts["k_async"] is True and facts["v_async"] is True
    assert facts["v_load"] == "cp.async" and facts["v_buffers"] == 2
    assert facts["async_copies_in_loop"] == [2] and facts["sync_loads_in_loop"] == [0]


def test_ttgir_names_reused_in_sibling_regions_resolve_locally():
    # "%v" is a reduce-region value and, in the sibling scf.if region, the V load: each use finds its own.
    ir = cr.TTGIR(TTGIR_SYNC_V)
    alloc = next(op for op in ir.ops if op.name == "ttg.local_alloc" and "64x128" in op.text)
    kind, op, _ = ir.defs[alloc.operands[0]]
    assert kind == "result" and op.name == "tt.load"


def test_ttgir_sm80_mma_sync():
    facts = cr.analyse_ttgir(TTGIR_SM80)
    assert facts["qk_mma"] == facts["pv_mma"] == "mma_v2"
    assert facts["qk_wgmma"] is False and facts["pv_wgmma"] is False
    assert facts["k_async"] is True and facts["k_buffers"] == 2
    assert facts["v_async"] is False  # the computed P operand is no load; V is a tt.load


def test_ttgir_operand_filled_by_another_loop():
    # A producer loop fills a buffer ring that the consumer loop's product reads: still an asynchronous K load.
    text = """\
module {
  tt.func @k(%n: i32) {
    %kb = ttg.local_alloc : () -> !ttg.memdesc<2x128x64xbf16, #shared, #smem, mutable>
    scf.for %j = %c0 to %n step %c1  : i32 {
      %w = ttg.memdesc_index %kb[%j] : !ttg.memdesc<2x128x64xbf16> -> !ttg.memdesc<128x64xbf16>
      %t = ttng.async_tma_copy_global_to_local %desc[%j, %c0] %w, %bar, %true : !tt.tensordesc -> !ttg.memdesc
    }
    scf.for %i = %c0 to %n step %c1  : i32 {
      %r = ttg.memdesc_index %kb[%i] : !ttg.memdesc<2x128x64xbf16> -> !ttg.memdesc<128x64xbf16>
      %s = ttng.warp_group_dot %q, %r, %cst {isAsync = true} : !ttg.memdesc * !ttg.memdesc -> tensor<128x64xf32>
    }
    tt.return
  }
}
"""
    facts = cr.analyse_ttgir(text)
    assert facts["k_async"] is True and facts["k_load"] == "tma" and facts["k_buffers"] == 2


def test_ttgir_without_products_has_no_loop_facts():
    facts = cr.analyse_ttgir("module {\n  tt.func @k() {\n    tt.return\n  }\n}\n")
    assert facts["loops"] == [] and facts["k_async"] is None and facts["qk_wgmma"] is None


def test_ptx_loops_from_llvm_loop_comments():
    facts = cr.analyse_ptx(PTX)
    (loop,) = facts["ptx_loops"]
    assert loop["header"] == "BB0_2" and loop["wgmma"] == 2 and loop["cp_async"] == 1 and loop["ld_global"] == 1
    assert facts["barriers_per_loop"] == [3]  # the bar.sync after the loop does not count
    assert loop["fence_async"] == 1


@pytest.mark.parametrize("log", PTXAS_LOGS)
def test_ptxas_log(log):
    facts = cr.parse_ptxas_log(log)
    if "blackwell" in log:
        assert (facts["regs"], facts["spill_stores"], facts["spill_loads"], facts["stack_bytes"]) == (
            255,
            1000,
            932,
            16,
        )
    else:
        assert (facts["regs"], facts["spill_stores"], facts["spill_loads"], facts["stack_bytes"]) == (196, 0, 0, 0)


def test_per_tile_configs_keeps_most_stages_and_fewest_warps():
    import triton

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in ((128, 64, 8, 3), (128, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 1))]  # fmt: skip
    picked = [(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in cr.per_tile_configs(configs)]
    assert picked == [(128, 8, 3), (128, 4, 2), (64, 4, 2)]


def test_launcher_keywords_follow_the_signature():
    def launcher(q, *, sm_scale, causal, softcap=None):
        pass

    values = {"scale|sm_scale": 0.5, "causal": True, "sinks": 1, "attn_mask": None}
    kwargs = cr._kwargs(launcher, values, optional=("sinks",))
    assert kwargs == {"sm_scale": 0.5, "causal": True}
    assert cr._kwargs(launcher, {"vmc": True}) == {"vmc": True}  # a missing required keyword fails at the call
    assert cr._has_params(launcher, ("softcap",)) and not cr._has_params(launcher, ("sinks",))


# ---- the CI check: compile the prefill kernel for sm_90a -------------------------------------------------------
def _ptxas_missing() -> str | None:
    try:
        cr.ptxas_info(90)
    except Exception as exc:  # noqa: BLE001 - any failure to find it means the wheel has none usable
        return f"Triton's wheel has no usable ptxas for sm_90a ({exc})"
    return None


def _fresh_env() -> dict:
    # A fresh process: this one may run the kernels under TRITON_INTERPRET=1 (tests/conftest.py), which replaces
    # @triton.jit functions by interpreted ones at import.
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def ci_report(tmp_path_factory):
    reason = _ptxas_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("compile") / "compile_ci.json"
    command = [sys.executable, str(BENCH_DIR / "compile_report.py"), "--subset", "ci", "--jobs", "2", "--out", str(out)]
    done = subprocess.run(command, env=_fresh_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"compile report failed:\n{done.stderr[-4000:]}"
    records = json.loads(out.read_text())
    assert records, "the compile report wrote no records"
    return records


def test_case_table_calls_the_current_launchers():
    # Every case of the committed report's subset calls its launcher without an error (a renamed or new required
    # keyword would be one), and together they launch every kernel the report names: nothing compiled, seconds.
    command = [sys.executable, str(BENCH_DIR / "compile_report.py"), "--subset", "report", "--dry-run"]
    done = subprocess.run(command, env=_fresh_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"a launcher call failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    pairs = {tuple(line.split(" ", 2)[:2]) for line in done.stdout.splitlines() if line.strip()}
    launched = {kernel for kernel, _ in pairs}
    assert launched == set(cr.KERNEL_NAMES.values()), f"kernels launched: {sorted(launched)}"
    modes = {(c.family, c.mode) for c in cr.CASES}
    family = {"prefill": "prefill", "decode_split": "decode", "regularizer_fwd": "regularizer"}
    assert {(family[k], m) for k, m in pairs if k in family} == modes, "a case launched no main kernel"


def _label(r) -> str:
    c = r["config"] or {}
    return (f"{r['kernel']} {r['mode']} {r['dtype']} D={r['head_dim']} ({c.get('BLOCK_M')}, {c.get('BLOCK_N')}, "
            f"{c.get('num_warps')}, {c.get('num_stages')}) {r['target']}")  # fmt: skip


def _failures(records, problem) -> list[str]:
    return [f"{_label(r)}: {p}" for r in records if (p := problem(r))]


def _check(records, problem):
    bad = _failures(records, problem)
    assert not bad, f"{len(bad)} of {len(records)} specialisations:\n" + "\n".join(bad)


TENSOR_CORES = ("wgmma", "mma_v2")
# What the kernel headers promise about the main loops, per (kernel, mode) of the CI subset (mode None: every mode):
# record field -> the values allowed. A (kernel, mode) of the subset without an entry here fails the coverage test.
_PIPELINED = {"k_async": (True,), "v_async": (True,), "qk_wgmma": (True,), "pv_wgmma": (True,)}
_SKIP = {"k_async": (True,), "qk_wgmma": (True,), "pv_wgmma": (True,)}
LOOP_PROMISES = {
    ("prefill", "dense"): _PIPELINED,
    ("prefill", "sparse"): _PIPELINED,
    ("prefill", "skip_dot"): _SKIP,
    ("prefill", "skip_load"): _SKIP,
    ("decode_split", None): {"k_async": (True,), "v_async": (True,), "qk_mma": TENSOR_CORES, "pv_mma": TENSOR_CORES},
    ("decode_score_pass", None): {"k_async": (True,), "qk_mma": TENSOR_CORES, "pv_mma": (None,)},
    ("decode_combine", None): {"qk_mma": (None,)},  # a merge of partials: no product
    ("regularizer_fwd", None): {"k_async": (True,), "qk_wgmma": (True,), "pv_mma": (None,)},
    ("regularizer_dq", None): _PIPELINED,
    ("regularizer_dk", None): _PIPELINED,
}


def _promises(r) -> dict | None:
    return LOOP_PROMISES.get((r["kernel"], r["mode"]), LOOP_PROMISES.get((r["kernel"], None)))


@pytest.mark.compile
def test_ci_subset_covers_every_shipped_tile_shape(ci_report):
    from sparse_attention.kernels import config

    shapes = {(bm, bn) for bm, bn, _, _ in config.PREFILL_CONFIGS}
    for mode, dtype in (("dense", "bf16"), ("sparse", "fp16"), ("skip_dot", "bf16"), ("skip_load", "bf16")):
        prefill = [r for r in ci_report if r["kernel"] == "prefill" and r["mode"] == mode and r["dtype"] == dtype]
        got = {(r["config"]["BLOCK_M"], r["config"]["BLOCK_N"]) for r in prefill if r.get("config")}
        assert got == shapes, f"{mode} {dtype}: compiled tile shapes {sorted(got)}, shipped {sorted(shapes)}"
    assert {r["target"] for r in ci_report} == {"sm_90a"} and {r["head_dim"] for r in ci_report} == {128}
    kernels = {r["kernel"] for r in ci_report}
    assert kernels == set(cr.KERNEL_NAMES.values()) - {"decode_mask"}, f"kernels compiled: {sorted(kernels)}"
    _check(ci_report, lambda r: _promises(r) is None and "no entry in LOOP_PROMISES")


@pytest.mark.compile
def test_ci_subset_compiles(ci_report):
    _check(ci_report, lambda r: r.get("error"))


@pytest.mark.compile
def test_ci_subset_does_not_spill(ci_report):
    _check(ci_report, lambda r: "error" not in r and r["spill_bytes"] != 0
           and f"{r['spill_bytes']} spill bytes ({r['regs']} registers)")  # fmt: skip


@pytest.mark.compile
def test_ci_subset_fits_shared_memory(ci_report):
    _check(ci_report, lambda r: "error" not in r and not r["shared_bytes"] <= cr.SHARED_LIMIT[90]
           and f"{r['shared_bytes']} bytes of shared memory > {cr.SHARED_LIMIT[90]}")  # fmt: skip


@pytest.mark.compile
def test_ci_subset_keeps_the_main_loop_promises(ci_report):
    words = {"k_async": "K (score operand) by async copies", "v_async": "V (second operand) by async copies",
             "qk_wgmma": "Q·Kᵀ on wgmma", "pv_wgmma": "P·V on wgmma", "qk_mma": "score product on",
             "pv_mma": "second product on"}  # fmt: skip
    details = {"k_async": "k_load", "v_async": "v_load", "qk_wgmma": "qk_mma", "pv_wgmma": "pv_mma"}

    def problem(r):
        if "error" in r or _promises(r) is None:
            return None
        bad = []
        for name, allowed in _promises(r).items():
            if r[name] not in allowed:
                seen = r.get(details.get(name, name)) or "nothing found"
                bad.append(f"{words[name]} {allowed}: got {r[name]} ({seen})")
        return "; ".join(bad)

    _check(ci_report, problem)
