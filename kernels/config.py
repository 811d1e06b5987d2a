"""Tuning settings of every kernel, in one place.

Environment variables (all optional, read once at import):

- ``SPARSE_ATTENTION_DECODE_MAX_Q`` (default 4): calls with at most this many query rows use the split-K decode
  kernel; longer ones use the tiled prefill kernel.
- ``SPARSE_ATTENTION_AUTOTUNE`` (default 1 on a GPU): 0 pins every kernel to its first config (useful to cut
  compile time); for prefill, the first config that fits the call (head dims, dtype, device shared memory). Under
  ``TRITON_INTERPRET=1`` there is always exactly one config, because the interpreter cannot run a multi-config
  autotune.
- ``SPARSE_ATTENTION_REGULARIZER_BLOCK_M`` / ``SPARSE_ATTENTION_REGULARIZER_BLOCK_N`` (default 64, or 16 under
  ``TRITON_INTERPRET=1``): the tile shape of the fused condensation regularizer (powers of two >= 16; BLOCK_N is
  raised to the next power of two of k).
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
# the budget lets it run (64 and 128; (64, 32, 8, 2) also 256). (128, 128, 8, 3), the Hopper choice of Triton's
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
# The single prefill config under TRITON_INTERPRET=1: small tiles keep several tiles per row in small tests.
PREFILL_INTERPRET_CONFIG = (32, 16, 4, 1)
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

# Condensation regularizer (kernels/regularizer.py). One tile shape serves its forward and both backward kernels and is
# never autotuned: the backward recomputes each score and compares it bit for bit with the forward's top-k threshold.
# The running top-k buffer is [BLOCK_M, BLOCK_N] registers, hence the bound on k.
REGULARIZER_MAX_K = 128
REGULARIZER_BLOCK_M = _env_int("SPARSE_ATTENTION_REGULARIZER_BLOCK_M", 16 if INTERPRET else 64)
REGULARIZER_BLOCK_N = _env_int("SPARSE_ATTENTION_REGULARIZER_BLOCK_N", 16 if INTERPRET else 64)

# Decode (kernels/decode.py): split-K flash-decoding.
# (num_warps, num_stages) of the decode split kernels; the first is used when autotuning is off.
DECODE_WARPS_STAGES = ((4, 2), (4, 3), (8, 2), (2, 2))
# Bytes of one K (or V) tile: BLOCK_N = DECODE_TILE_BYTES / (head dim · element size), clamped to 16..128 keys.
DECODE_TILE_BYTES = 16384
# Split count: aim for this many programs per SM (several, because a tile's V load waits on its own scores), but give
# no split fewer keys than the minimum. Not yet tuned on a GPU.
DECODE_PROGRAMS_PER_SM = 4
DECODE_MIN_KEYS_PER_SPLIT = 256
DECODE_MAX_SPLITS = 64
# Most packed query rows (query heads of a kv group x query rows) per program; wider groups run in row blocks.
DECODE_MAX_BLOCK_M = 64
# Splits the combine kernel merges per step, and keys per step of the scans over whole rows (mask counts, kept-V-row
# flags).
DECODE_COMBINE_BLOCK_S = 16
DECODE_SCAN_BLOCK_K = 1024
