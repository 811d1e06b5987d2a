"""Tuning settings of every kernel, in one place.

Environment variables (all optional, read once at import):

- ``SPARSE_ATTENTION_DECODE_MAX_Q`` (default 4): calls with at most this many query rows use the split-K decode
  kernel; longer ones use the tiled prefill kernel.
- ``SPARSE_ATTENTION_AUTOTUNE`` (default 1 on a GPU): 0 pins every kernel to its first config (useful to cut
  compile time). Under ``TRITON_INTERPRET=1`` there is always exactly one config, because the interpreter
  cannot run a multi-config autotune.
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
