"""Tuning settings of every kernel, in one place.

Environment variables (all optional, read once at import):

- ``SPARSE_ATTENTION_DECODE_MAX_Q`` (default 4): calls with at most this many query rows use the split-K decode
  kernel; longer ones use the tiled prefill kernel.
- ``SPARSE_ATTENTION_AUTOTUNE`` (default 1 on a GPU): 0 pins every kernel to its first config (useful to cut
  compile time); for prefill, the first config that fits the call (head dims, dtype, device shared memory). Under
  ``TRITON_INTERPRET=1`` there is always exactly one config, because the interpreter cannot run a multi-config
  autotune.
- ``SPARSE_ATTENTION_REGULARIZER_BLOCK_M`` / ``SPARSE_ATTENTION_REGULARIZER_BLOCK_N`` (default 128 / 64, or 16 / 16
  under ``TRITON_INTERPRET=1``): the tile shape of the fused condensation regularizer (powers of two >= 16; BLOCK_N is
  raised to the next power of two of k, and BLOCK_M lowered to keep the tile within ``REGULARIZER_MAX_TILE``).
- ``SPARSE_ATTENTION_PREFILL_VARIANT`` (default ``pipelined``): the prefill main-loop strategy of sparse mode,
  ``pipelined`` (V by async copies, P·V in every tile with pruned scores zeroed), ``skip_dot`` (P·V skipped where a
  tile keeps nothing) or ``skip_load`` (a dead tile's V is never read); see ``kernels/prefill.py``.
- ``SPARSE_ATTENTION_DECODE_WARPS`` / ``SPARSE_ATTENTION_DECODE_STAGES`` (default 4 / 4): num_warps and num_stages of
  the decode split and score-pass kernels (never autotuned).
"""

from __future__ import annotations

import os


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DECODE_MAX_Q = _env_int("SPARSE_ATTENTION_DECODE_MAX_Q", 4)
AUTOTUNE = _env_int("SPARSE_ATTENTION_AUTOTUNE", 1) == 1 and not INTERPRET

# Head dims the kernels handle; other dims up to the maximum are padded to the next power of two.
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256

# ---- Prefill (kernels/prefill.py) ----------------------------------------------------------------------------------
# Tile configs (BLOCK_M, BLOCK_N, num_warps, num_stages), autotuned per (Lq, Lk) power-of-two bucket, head dims,
# causal, mask kind, placement and variant. Only configs that kernels.prefill.config_fits allows run, with autotuning
# on and off alike (SPARSE_ATTENTION_AUTOTUNE=0 runs the first allowed one): the device's shared memory, the register
# budget below, and for float32 the PREFILL_FP32_* limits. Chosen by the compile report (sm_90a, Triton 3.6.0): for
# float16 and bfloat16 every config here compiles without spilling, with K and V by async copies and both products on
# wgmma, in each mode the report covers (dense, sparse, post, vmc, stats, key mask, softcap, sinks) at the head dims
# the budget lets it run (64 and 128; (64, 32, 8, 2) also 256), except (128, 64, 8, 3) with a general per-row mask,
# which PREFILL_FULL_MASK_EXCLUDED keeps out. (128, 128, 8, 3), the Hopper choice of Triton's
# fused-attention tutorial, spills at D=128 (28 bytes dense, 68 sparse) and is not shipped; (64, 64, 4, 3) spills at
# D=128 in six of ten modes.
PREFILL_CONFIGS = (
    (128, 64, 8, 3),
    (128, 64, 8, 2),
    (128, 32, 8, 3),
    (64, 32, 4, 2),
    (64, 32, 4, 3),
    (64, 32, 8, 2),
)
# Configs left out for a general per-row boolean mask (MASK_FULL): the [BLOCK_M, BLOCK_N] mask tile of every stage
# adds registers, and (128, 64, 8, 3) spills 48 bytes at D=128 in 16-bit (compile report, sm_90a, Triton 3.6.0).
PREFILL_FULL_MASK_EXCLUDED = ((128, 64, 8, 3),)
# The single prefill config under TRITON_INTERPRET=1: small tiles keep several tiles per row in small tests.
PREFILL_INTERPRET_CONFIG = (32, 16, 4, 1)
# Sparse mode's main loop (kernels/prefill.py VARIANTS). "pipelined" by the cost model of the prefill header: at the
# dead-tile fractions measured on structured inputs (< 15 % of 128 x 64 tiles) skipping P·V costs the pipeline more
# than it saves. A GPU run times all three.
PREFILL_VARIANT = os.environ.get("SPARSE_ATTENTION_PREFILL_VARIANT", "pipelined")
# Register budget: float32 accumulator and score values per thread, BLOCK_M * (HEAD_DIM_V + BLOCK_N) / (32 * num_warps)
# with the padded value head dim. 96 admits (128, 64, 8, x) up to D=128 and only (64, 32, 8, 2) at D=256, where the
# others spill (compile report).
PREFILL_MAX_ACC_PER_THREAD = 96
# float32 inputs (tf32x3 dots: three tf32 products, their split operands staged in shared memory and registers) run
# only these configs, and only up to this padded head dim: at D=128 they spill about 0.3 KB (D=64: none), every
# other config spills more or does not fit 227 KiB of shared memory, and at D=256 every config spills 3 KB or more,
# so unsupported_reason sends such calls to the reference.
PREFILL_FP32_CONFIGS = ((64, 32, 4, 2), (64, 32, 4, 3))
PREFILL_FP32_MAX_HEAD_DIM = 128

# Condensation regularizer (kernels/regularizer.py). One tile shape and one number of warps serve its forward and both
# backward kernels and are never autotuned: the backward recomputes each score and compares it bit for bit with the
# forward's top-k threshold, and the score tile's layout (hence its rounding) follows from shape and warps.
# The running top-k buffer is [BLOCK_M, BLOCK_N] registers, hence the bound on k.
REGULARIZER_MAX_K = 128
REGULARIZER_BLOCK_M = _env_int("SPARSE_ATTENTION_REGULARIZER_BLOCK_M", 16 if INTERPRET else 128)
REGULARIZER_BLOCK_N = _env_int("SPARSE_ATTENTION_REGULARIZER_BLOCK_N", 16 if INTERPRET else 64)
# Most scores in one [BLOCK_M, BLOCK_N] tile: BLOCK_M shrinks when k widens BLOCK_N (to 64 rows at k > 64 on sm_90,
# where 128 x 128 spills in dK). Float32 products run in full precision on the FMA units ("ieee"), whose operands
# live in registers, so float32 tiles are half as large (a quarter at head dim 256) and get 16 warps; larger ones
# spill kilobytes per thread on sm_90 (ptxas of CUDA 12.8, the GPU image's Triton 3.6).
REGULARIZER_MAX_TILE = 128 * 64
REGULARIZER_FP32_MAX_TILE = 64 * 64  # at head dims up to 128; halved per doubling above
# Pipeline depth of the K (forward, dQ) and Q (dK) tile loads; not yet timed on a GPU.
REGULARIZER_NUM_STAGES = 2


def regularizer_num_warps(block_m: int, block_n: int, fp32: bool) -> int:
    """Warps of the three regularizer kernels for a ``[block_m, block_n]`` score tile (16-bit inputs: 4 warps spill at
    64 x 64; float32: see ``REGULARIZER_FP32_MAX_TILE``)."""
    if fp32:
        return 16 if block_m * block_n >= 32 * 64 else 8
    return 8 if block_m * block_n >= 64 * 64 else 4


# Decode (kernels/decode.py): split-K flash-decoding. Read at call time, so tests may patch them.
# (num_warps, num_stages) of the decode kernels. Never autotuned: the split count is computed from the compiled kernel's
# registers and shared memory, and an autotuner's benchmarking could not run inside a CUDA-graph capture.
# SPARSE_ATTENTION_DECODE_WARPS / SPARSE_ATTENTION_DECODE_STAGES override them.
DECODE_NUM_WARPS = _env_int("SPARSE_ATTENTION_DECODE_WARPS", 4)
DECODE_NUM_STAGES = _env_int("SPARSE_ATTENTION_DECODE_STAGES", 4)
# The (num_warps, num_stages) settings the GPU tests and the compile report sweep; the first is the default above.
DECODE_WARPS_STAGES = ((4, 4), (4, 3), (4, 2), (8, 4))
# Bytes of one K tile: BLOCK_N = DECODE_TILE_BYTES / (head dim · element size), clamped to 16..128 keys. With 4 warps
# and 4 stages (the K and V loads of the next two tiles in flight while a tile computes), 32 bf16 keys of head dim
# 128 compile to 118 registers and 53 KiB of shared memory on sm_90a (triton 3.6): 4 programs per SM. 64-key tiles
# at 3 stages: 145 registers, 70 KiB, 3 per SM.
DECODE_TILE_BYTES = 8192
# Split count (decode.choose_num_splits, a wave model): at most this many splits, a split's fixed cost (query load,
# pipeline fill, partial stores) in tiles, and the relative cost margin within which fewer splits win. Predictions,
# not yet measured on a GPU.
DECODE_MAX_SPLITS = 64
DECODE_SPLIT_OVERHEAD_TILES = 2
DECODE_SPLIT_TOLERANCE = 0.02
# Resident programs per SM assumed under TRITON_INTERPRET=1 (there is no compiled kernel to ask), times one "SM".
DECODE_INTERPRET_SLOTS = 8
# Most resident CTAs per SM by compute capability (CUDA programming guide); other devices get the default.
DECODE_MAX_CTAS_PER_SM = {(7, 5): 16, (8, 0): 32, (8, 6): 16, (8, 7): 16, (8, 9): 24, (9, 0): 32}
DECODE_MAX_CTAS_PER_SM_DEFAULT = 16
# Most packed query rows (query heads of a kv group x query rows) per program; wider groups run in row blocks.
DECODE_MAX_BLOCK_M = 64
# Splits per step of the merges inside the split kernels ("post", cap). The combine kernel reads as many splits per
# step as fit DECODE_COMBINE_TILE partial-output elements (16 float32 registers per thread at DECODE_COMBINE_WARPS):
# fewer steps, fewer dependent memory round trips.
DECODE_MERGE_BLOCK_S = 16
DECODE_COMBINE_TILE = 2048
DECODE_COMBINE_WARPS = 4
# Keys per step of the scans over whole rows (general-mask counts, kept-V-row flags).
DECODE_SCAN_BLOCK_K = 1024
