"""Offline compile report: every shipped kernel specialisation compiled for sm_90a and sm_80 without a GPU.

What it does. For each entry of :data:`CASES` (a kernel family, a mode, and how to call its launcher) and each dtype
and head dim of the chosen subset, the real launcher (``top_theta_prefill``, ``top_theta_decode``,
``regularizer_forward`` / ``regularizer_backward``) is called on CPU tensors inside :func:`capturing`. Nothing runs:
Triton's own launch path binds the arguments and computes the exact specialisation a GPU launch of that call would get
(16-byte aligned pointers, integers divisible by 16, integers equal to 1 made constants, the constexprs, the
``num_warps`` / ``num_stages`` of every prefill autotuning config the launcher's pruning keeps, and for decode, which
is never autotuned, each ``kernels.config.DECODE_WARPS_STAGES`` setting), and a hook takes it instead of compiling.
Each captured specialisation is then compiled with ``triton.compile`` for each target, with the installed Triton and
the ``ptxas`` bundled in its wheel, and its TTGIR, PTX and ``ptxas -v`` log are read for the facts below.
Configs that do not fit are compiled too (and say so): the report shows what every config costs.

Run (from the repository root; no GPU and no CUDA driver needed)::

    python benchmarks/compile_report.py --subset report --jobs 2 --out benchmarks/results/compile_sm90a.json \\
        [--target sm90a|sm80|all] [--subset ci|report|full] [--kernel prefill decode regularizer ...] \\
        [--dtype bf16 ...] [--head-dim 128 ...] [--mode dense ...] [--jobs N] [--resume [FILE ...]] [--dry-run]
    python benchmarks/compile_report.py --summary benchmarks/results/compile_sm90a_before.json   # a markdown table

``--kernel`` takes families (``prefill``, ``decode``, ``regularizer``) or kernel names (``decode_split``, ...).
``--subset ci`` is what ``tests/benchmarks/test_compile_report.py`` checks (sm_90a, D=128; see :data:`SUBSETS`):
prefill dense bf16, sparse fp16 and the skip_dot / skip_load variants bf16, per tile shape (BLOCK_M, BLOCK_N) the
config with the most stages and the one with the fewest warps; decode sparse and post bf16 and the regularizer
(causal, k=64) bf16 at their default settings. ``--subset report`` is what ``benchmarks/results/compile_sm90a.json``
holds: sm_90a, every case and config, bf16/fp16 at D 64/128/256, float32 for prefill dense and sparse at D=128.
``--subset full`` (default) is every case, bf16/fp16/fp32, D 64/128/256, every config, both targets (but float32 at
D=256 for sm_90a only, unless ``--dtype`` or ``--head-dim`` names it).
The script sets ``SPARSE_ATTENTION_AUTOTUNE=1`` (every shipped config), clears ``TRITON_INTERPRET`` and the tuning
overrides of ``kernels/config.py`` (:data:`OVERRIDES`) before it imports the kernels, which it loads from this
checkout's ``kernels/`` (see :func:`load_kernels`), and compiles into a fresh Triton cache directory so that
``compile_s`` is a real compile time.

Output: a JSON list of flat records (the results-file convention of ``harness.py``), one per line, rewritten after
every record.
Fields of a record:

- ``kernel``: ``prefill`` (``_top_theta_prefill_kernel``), ``decode_split``, ``decode_score_pass`` (the "post"
  log-sum-exp and the cap count passes), ``decode_combine``, ``decode_mask`` (the general-mask scan),
  ``regularizer_fwd``, ``regularizer_dq``, ``regularizer_dk``. ``mode``: the :data:`CASES` entry. Prefill: ``dense``
  (``theta=None``, its own compile-time path), ``sparse`` (the default ``pipelined`` variant), ``skip_dot`` and
  ``skip_load`` (the other variants), ``post``, ``sdc_scaled``, ``vmc``, ``stats``, ``key_padding``, ``mask`` (a
  general per-row mask), ``mask_shared`` (one mask row for every query), ``cap``, ``softcap_sinks``; every sparse mode
  but the two skip ones runs ``pipelined``. Decode: ``dense``, ``sparse``, ``post``, ``cap``, ``vmc``, ``stats``,
  ``key_padding``, ``mask``, ``softcap_sinks``, ``lq4`` (4 query rows, key padding and a cap). Regularizer:
  ``causal``, ``masked`` (a general mask), ``key_padding``, ``softcap_sinks`` at k=64 (128 x 64 tiles), and
  ``causal_k128`` / ``masked_k128`` (64 x 128 tiles). ``dtype`` (``bf16``/``fp16``/``fp32``), ``head_dim`` (the
  call's D), ``shape`` (the call's sizes), ``constexprs`` (every constexpr the kernel got, by name).
- ``config``: ``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages`` as the kernel got them (None where the kernel
  has no such constexpr). ``target``: ``sm_90a`` or ``sm_80``.
- ``regs``, ``spill_bytes`` (spill stores + spill loads, bytes, from ``ptxas -v``), ``spill_stores``,
  ``spill_loads``, ``stack_bytes``; ``shared_bytes`` (the dynamic shared memory Triton allocates),
  ``shared_limit`` (opt-in maximum per block: 232448 on H100/H200, 166912 on A100), ``fits_shared``;
  ``est_programs_per_sm`` (resident programs per SM from registers, shared memory and warps: arithmetic, not a
  measurement); ``compile_s`` (this specialisation, this target, wall clock on this machine).
- The main loops. An *attention loop* is an innermost ``scf.for`` of the TTGIR that contains a product (``tt.dot``,
  ``ttng.warp_group_dot``, ...). In it, a *score product* is one whose result feeds the A operand of another product
  (Q·Kᵀ), or the only product of the loop; the others are *second products* (P·V; for the regularizer's backward
  dS·K and dSᵀ·Q). ``k_*`` describe the operands of the score products that are loaded inside the loop (K; Q in
  ``regularizer_dk``), ``v_*`` those of the second products (V; K or Q in the regularizer's backward):

  - ``k_async`` / ``v_async``: every such load reaches shared memory by an asynchronous copy (``cp.async``, or TMA),
    none by a synchronous load. ``k_load`` / ``v_load``: the kinds seen, joined by ``+`` (``cp.async``, ``tma``, or
    the synchronous load op, ``tt.load`` / ``tt.descriptor_load``). ``k_buffers`` / ``v_buffers``: shared-memory
    buffers of that operand (the pipeline depth; 1 = not multi-buffered). A load counts as the loop's when it is in
    the loop or, failing that, in another loop (a producer loop filling the buffers); loads outside every loop (Q)
    are not counted. Warp-specialised partitions (``ttg.warp_specialize``) are not followed.
  - ``qk_mma`` / ``pv_mma``: the product's instruction family (``wgmma``, ``mma_v2`` = mma.sync, ``fma``).
    ``qk_wgmma`` / ``pv_wgmma``: all of them are wgmma (None on sm_80, which has none); ``qk_wgmma_async`` /
    ``pv_wgmma_async``: issued asynchronously (``isAsync``).
  - None where a kernel has no such product or operand (e.g. ``v_*`` of ``decode_score_pass`` and
    ``regularizer_fwd``).
  - ``barriers_per_loop``: CTA barriers (``bar.sync``/``barrier.sync``/``bar.arrive``) in the PTX of each innermost
    loop that contains matrix instructions (every innermost loop in a kernel without any), in PTX order; these
    include the barriers Triton inserts while lowering, which the TTGIR does not show. ``async_copies_in_loop`` /
    ``sync_loads_in_loop``: per attention loop, TTGIR async copy ops (one per tile) and ``tt.load`` ops. ``loops``:
    the per-loop details behind all of these (``ptx_loops``: the PTX counts).
- ``triton``, ``ptxas_version``, ``commit``, ``command``, ``source_hash``; ``error`` (and no facts) when the launcher
  call or the compile failed: a failure is a record, never a crash.

Triton internals touched (verified on Triton 3.6.0 and 3.9.0, see :func:`capturing` and :func:`_compile_one`):
``triton.runtime.driver.driver`` (``set_active`` and its ``_active`` slot), ``triton.knobs.runtime.jit_cache_hook``
(and the keyword arguments ``JITFunction._call_hook`` passes it), ``triton.runtime.autotuner.Autotuner.run`` /
``prune_configs``, ``triton.knobs.nvidia.dump_ptxas_log``, ``triton.backends.nvidia.compiler.get_ptxas``, and the
textual TTGIR/PTX formats parsed by :func:`analyse_ttgir` and :func:`analyse_ptx`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import io
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
KERNELS_PACKAGE = "sparse_attention.kernels"

TARGETS = {"sm90a": 90, "sm80": 80}  # command-line name -> CUDA capability
TARGET_NAMES = {90: "sm_90a", 80: "sm_80"}
# Opt-in shared memory per block (bytes): H100/H200 227 KiB, A100 163 KiB.
SHARED_LIMIT = {90: 232448, 80: 166912}
# Per SM: shared memory (bytes, including the 1 KiB the driver reserves per block), registers, resident warps, blocks.
SM_RESOURCES = {90: (233472, 65536, 64, 32), 80: (167936, 65536, 64, 32)}
DTYPE_NAMES = ("bf16", "fp16", "fp32")
FAMILIES = ("prefill", "decode", "regularizer")
# Report name of each @triton.jit kernel; others are named "<module>_<function>" (see _kernel_name).
KERNEL_NAMES = {
    "_top_theta_prefill_kernel": "prefill",
    "_decode_split_kernel": "decode_split",
    "_decode_score_pass_kernel": "decode_score_pass",
    "_decode_combine_kernel": "decode_combine",
    "_decode_mask_kernel": "decode_mask",
    "_regularizer_fwd_kernel": "regularizer_fwd",
    "_regularizer_bwd_dq_kernel": "regularizer_dq",
    "_regularizer_bwd_dk_kernel": "regularizer_dk",
}
# Environment overrides of kernels/config.py that the report clears before it imports the kernels.
OVERRIDES = ("SPARSE_ATTENTION_PREFILL_VARIANT", "SPARSE_ATTENTION_DECODE_WARPS", "SPARSE_ATTENTION_DECODE_STAGES",
             "SPARSE_ATTENTION_REGULARIZER_BLOCK_M", "SPARSE_ATTENTION_REGULARIZER_BLOCK_N")  # fmt: skip
# Module-level functions of the kernel package that refuse CPU tensors outside the interpreter; replaced by
# "no objection" while capturing (kernels/common.py unsupported_device, also imported by regularizer.py).
DEVICE_CHECKS = ("unsupported_device",)


# ==== the launcher table ============================================================================================
# Everything that knows the launchers' signatures is in this section. A case calls one launcher the way the package
# does (keyword-only, normalised arguments: kernels/prefill.py top_theta_prefill, kernels/decode.py top_theta_decode,
# kernels/regularizer.py regularizer_forward / regularizer_backward); every kernel that call would launch is captured.
# Keyword values are passed through _kwargs: a key "a|b" goes to whichever of the names the launcher has (the first if
# it has both), and optional keys (those listed as such and those whose value is None) are dropped when the launcher
# has no such parameter, so an added keyword with a default needs no change here. A new required keyword shows up as
# an error record naming it.

PREFILL_SHAPE = {"B": 1, "Hq": 8, "Hkv": 2, "Lq": 1024, "Lk": 1024}
# Decode: Llama-style GQA (4 query heads per kv head), one query row, the split count an H100 would pick for this
# length (the launcher sizes it from the compiled kernel's occupancy, which needs a GPU; 1 split would specialise as
# a constant). "lq4" is the speculative-decoding shape: 4 query rows per head, 16 packed rows per kv group.
DECODE_SHAPE = {"B": 1, "Hq": 32, "Hkv": 8, "Lq": 1, "Lk": 4096, "splits": 16}
# Regularizer: k picks the tile (kernels/regularizer.py tiles): k <= 64 runs 128 x 64 score tiles, 64 < k <= 128
# runs 64 x 128 ones; k = 64 and k = 128 are the two tiers.
REGULARIZER_SHAPE = {"B": 1, "Hq": 8, "Hkv": 2, "Lq": 1024, "Lk": 1024, "k": 64}
THETA_POINTS = 64  # columns of the threshold table


@dataclass(frozen=True)
class Case:
    family: str  # "prefill" | "decode" | "regularizer"
    mode: str
    # launch(kernels_module, torch_dtype, head_dim, configs) -> None: calls the launcher(s); ``configs`` is the
    # subset's config policy for the case ("all" or "per_tile", see Subset), which the decode cases apply themselves.
    launch: Callable
    requires: tuple[str, ...] = ()  # launcher parameters this mode needs; skipped while the launcher lacks them
    shape: dict = field(default_factory=dict)


def _kwargs(fn: Callable, values: dict, optional: Iterable[str] = ()) -> dict:
    """``values`` renamed to ``fn``'s parameters (see the section comment); a key whose value is None is optional."""
    params = inspect.signature(fn).parameters
    optional = set(optional)
    out = {}
    for key, value in values.items():
        names = key.split("|")
        name = next((n for n in names if n in params), None)
        if name is None:
            if key in optional or value is None:
                continue
            name = names[0]  # let the call fail and name the missing parameter
        out[name] = value
    return out


def _has_params(fn: Callable, names: Iterable[str]) -> bool:
    params = inspect.signature(fn).parameters
    return all(any(n in params for n in name.split("|")) for name in names)


def _attention_inputs(torch, dtype, head_dim, shape):
    b, hq, hkv, lq, lk = (shape[k] for k in ("B", "Hq", "Hkv", "Lq", "Lk"))
    q = torch.empty(b, hq, lq, head_dim, dtype=dtype)
    k = torch.empty(b, hkv, lk, head_dim, dtype=dtype)
    v = torch.empty(b, hkv, lk, head_dim, dtype=dtype)
    return q, k, v


def _key_padding(torch, shape):
    """HF-style left padding of the first batch row as the launchers take it (``sparse_attention.ops.contract``
    KeyPadding.as_tuple): ``(mask [B, Lk] bool, prefix [B, Lk + 1] int32, bounds [B, 2] int32)``."""
    b, lk = shape["B"], shape["Lk"]
    mask = torch.ones(b, lk, dtype=torch.bool)
    mask[0, : lk // 8] = False
    prefix = torch.zeros(b, lk + 1, dtype=torch.int32)
    prefix[:, 1:] = torch.cumsum(mask, dim=-1, dtype=torch.int32)
    bounds = torch.tensor([[lk // 8, lk]] + [[0, lk]] * (b - 1), dtype=torch.int32)
    return mask, prefix, bounds


def _general_mask(torch, shape, per_row: bool):
    """A general boolean ``attn_mask``, as the ops layer passes it: a broadcast view of ``[B, Hq, Lq, Lk]``. Per row
    (``[B, 1, Lq, Lk]``, the prefill kernel's MASK_FULL path) or one row for every query (``[B, 1, 1, Lk]``,
    MASK_SHARED)."""
    b, hq, lq, lk = (shape[k] for k in ("B", "Hq", "Lq", "Lk"))
    mask = torch.ones(b, 1, lq if per_row else 1, lk, dtype=torch.bool)
    mask[..., : lk // 8] = False
    return mask.expand(b, hq, lq, lk)


def _fill(torch, shape, value):
    """Placeholder names of the case table replaced by tensors of the call's shape."""
    if value == "theta":
        return torch.zeros(shape["Hq"], THETA_POINTS, dtype=torch.float32)
    if value == "sinks":
        return torch.zeros(shape["Hq"], dtype=torch.float32)
    if value == "key_padding":
        return _key_padding(torch, shape)
    if value in ("mask", "mask_shared"):
        return _general_mask(torch, shape, per_row=value == "mask")
    return value


def _attention_case(family: str, mode: str, overrides: dict, requires=(), optional=(), shape=None) -> Case:
    shape = {**(PREFILL_SHAPE if family == "prefill" else DECODE_SHAPE), **(shape or {})}

    def launch(kern, dtype, head_dim, configs):
        import torch

        q, k, v = _attention_inputs(torch, dtype, head_dim, shape)
        values = {
            "theta": None, "sdc_table": None, "sinks": None, "attn_mask": None, "key_padding": None, "k_dense": 0,
            "sm_scale": head_dim**-0.5, "softcap": 0.0, "causal": True, "q_offset": shape["Lk"] - shape["Lq"],
            "placement": "pre", "sdc": "exact", "sdc_scale": 1.0, "cap": 0, "vmc": False, "return_stats": False,
        }  # fmt: skip
        values.update({key: _fill(torch, shape, value) for key, value in overrides.items()})
        if family == "prefill":
            # The variant is named, not left to SPARSE_ATTENTION_PREFILL_VARIANT: a record's mode says which it is.
            values.setdefault("variant", "pipelined")
            fn = kern.prefill.top_theta_prefill
            fn(q, k, v, **_kwargs(fn, values, optional))
            return
        fn = kern.decode.top_theta_decode
        values["num_splits"] = shape["splits"]
        # Decode is never autotuned: its (num_warps, num_stages) come from kernels/config.py at call time, so the
        # sweep of config.DECODE_WARPS_STAGES (the first is the shipped default) patches them around each call.
        settings = kern.config.DECODE_WARPS_STAGES if configs == "all" else kern.config.DECODE_WARPS_STAGES[:1]
        saved = kern.config.DECODE_NUM_WARPS, kern.config.DECODE_NUM_STAGES
        try:
            for kern.config.DECODE_NUM_WARPS, kern.config.DECODE_NUM_STAGES in settings:
                fn(q, k, v, **_kwargs(fn, values, optional))
        finally:
            kern.config.DECODE_NUM_WARPS, kern.config.DECODE_NUM_STAGES = saved

    return Case(family, mode, launch, tuple(requires), shape)


def _regularizer_case(mode: str, overrides: dict, k: int = REGULARIZER_SHAPE["k"]) -> Case:
    shape = {**REGULARIZER_SHAPE, "k": k}

    def launch(kern, dtype, head_dim, configs):
        import torch

        q, key, _ = _attention_inputs(torch, dtype, head_dim, shape)
        reg = kern.regularizer
        common = {"sinks": None, "attn_mask": None, "key_padding": None, "k": shape["k"], "sm_scale": head_dim**-0.5,
                  "softcap": 0.0, "causal": True, "q_offset": shape["Lk"] - shape["Lq"]}  # fmt: skip
        common.update({name: _fill(torch, shape, value) for name, value in overrides.items()})
        stats = reg.regularizer_forward(q, key, **_kwargs(reg.regularizer_forward, common))
        grad_rows = torch.ones(shape["B"], shape["Hq"], shape["Lq"], dtype=torch.float32)
        backward = reg.regularizer_backward
        backward(q, key, stats, grad_rows, **_kwargs(backward, {**common, "kind": "logmass"}))

    return Case("regularizer", mode, launch, (), shape)


THETA = {"theta": "theta"}
CASES: tuple[Case, ...] = (
    _attention_case("prefill", "dense", {}),
    _attention_case("prefill", "sparse", THETA),
    _attention_case("prefill", "skip_dot", {**THETA, "variant": "skip_dot"}, requires=("variant",)),
    _attention_case("prefill", "skip_load", {**THETA, "variant": "skip_load"}, requires=("variant",)),
    _attention_case("prefill", "post", {**THETA, "placement": "post"}),
    _attention_case("prefill", "sdc_scaled", {**THETA, "sdc": "threshold", "sdc_scale": 0.5}),
    _attention_case("prefill", "vmc", {**THETA, "vmc": True}),
    _attention_case("prefill", "stats", {**THETA, "return_stats": True}),
    _attention_case("prefill", "key_padding", {**THETA, "key_padding": "key_padding"}),
    _attention_case("prefill", "mask", {**THETA, "attn_mask": "mask"}),
    _attention_case("prefill", "mask_shared", {**THETA, "attn_mask": "mask_shared"}),
    _attention_case("prefill", "cap", {**THETA, "cap": 64}),
    _attention_case("prefill", "softcap_sinks", {**THETA, "softcap": 30.0, "sinks": "sinks"}),
    _attention_case("decode", "dense", {}),
    _attention_case("decode", "sparse", THETA),
    _attention_case("decode", "post", {**THETA, "placement": "post"}),
    _attention_case("decode", "cap", {**THETA, "cap": 64}),
    _attention_case("decode", "vmc", {**THETA, "vmc": True}),
    _attention_case("decode", "stats", {**THETA, "return_stats": True}),
    _attention_case("decode", "key_padding", {**THETA, "key_padding": "key_padding"}),
    _attention_case("decode", "mask", {**THETA, "attn_mask": "mask"}),
    _attention_case("decode", "softcap_sinks", {**THETA, "softcap": 30.0, "sinks": "sinks"}),
    _attention_case("decode", "lq4", {**THETA, "key_padding": "key_padding", "cap": 64}, shape={"Lq": 4}),
    _regularizer_case("causal", {}),
    _regularizer_case("masked", {"attn_mask": "mask"}),
    _regularizer_case("key_padding", {"key_padding": "key_padding"}),
    _regularizer_case("softcap_sinks", {"softcap": 30.0, "sinks": "sinks"}),
    _regularizer_case("causal_k128", {}, k=128),
    _regularizer_case("masked_k128", {"attn_mask": "mask"}, k=128),
)


@dataclass(frozen=True)
class Subset:
    """Which cases, dtypes, head dims, targets and configs a run compiles."""

    modes: dict  # family -> modes (None: all of that family's cases)
    dtypes: dict  # family -> dtype names, or (family, mode) -> dtype names (takes precedence)
    head_dims: tuple[int, ...]
    targets: tuple[int, ...]
    # "all" | "per_tile", or a dict of those by family and by (family, mode) (which takes precedence; "all" where
    # neither is listed). "per_tile": for prefill, per (BLOCK_M, BLOCK_N) the most stages and the fewest warps; for
    # decode, which runs one tile shape per call, the default (num_warps, num_stages) only.
    configs: str | dict = "all"
    exclude: tuple = ()  # (dtype, head_dim, capability) left out unless --dtype or --head-dim asks for them

    def config_policy(self, case: Case) -> str:
        if isinstance(self.configs, str):
            return self.configs
        return self.configs.get((case.family, case.mode), self.configs.get(case.family, "all"))


SUBSETS = {
    # What tests/benchmarks/test_compile_report.py checks, a few minutes on two cores: the prefill modes the shipped
    # config list was chosen on (dense bf16, sparse fp16 on the default variant) and the two skip variants (bf16),
    # per tile shape, and the default decode (with the score pass of "post") and regularizer specialisations.
    "ci": Subset(
        modes={
            "prefill": ("dense", "sparse", "skip_dot", "skip_load"),
            "decode": ("sparse", "post"),
            "regularizer": ("causal",),
        },
        dtypes={
            ("prefill", "dense"): ("bf16",),
            ("prefill", "sparse"): ("fp16",),
            "prefill": ("bf16",),
            "decode": ("bf16",),
            "regularizer": ("bf16",),
        },
        head_dims=(128,),
        targets=(90,),
        configs="per_tile",
    ),
    # benchmarks/results/compile_sm90a.json: sm_90a (the GPU machine's H200), every case and every config at each
    # head dim for 16-bit inputs, and float32 for prefill dense and sparse at D=128 (prefill refuses float32 above
    # 128; float32 compiles take the longest).
    "report": Subset(
        modes={"prefill": None, "decode": None, "regularizer": None},
        dtypes={
            "prefill": ("bf16", "fp16"),
            "decode": ("bf16", "fp16"),
            "regularizer": ("bf16", "fp16"),
            ("prefill", "dense"): DTYPE_NAMES,
            ("prefill", "sparse"): DTYPE_NAMES,
        },
        head_dims=(64, 128, 256),
        targets=(90,),
        configs="all",
        exclude=(("fp32", 64, 90), ("fp32", 256, 90)),
    ),
    "full": Subset(
        modes={"prefill": None, "decode": None, "regularizer": None},
        dtypes={"prefill": DTYPE_NAMES, "decode": DTYPE_NAMES, "regularizer": DTYPE_NAMES},
        head_dims=(64, 128, 256),
        targets=(90, 80),
        configs="all",
        # float32 "ieee" products at D=256 take minutes per compile (up to 460 s on the 2-core machine) and spill
        # hundreds of KB on either target: sm_90a only.
        exclude=(("fp32", 256, 80),),
    ),
}


def per_tile_configs(configs: list) -> list:
    """Of autotuning ``configs`` (``triton.Config``), per tile shape (BLOCK_M, BLOCK_N) the one with the most stages
    and the one with the fewest warps (the largest shared memory and the most registers per thread)."""
    groups: dict = {}
    for c in configs:
        groups.setdefault((c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N")), []).append(c)
    keep = []
    for group in groups.values():
        for pick in (max(group, key=lambda c: (c.num_stages, -c.num_warps)),
                     min(group, key=lambda c: (c.num_warps, -c.num_stages))):  # fmt: skip
            if pick not in keep:
                keep.append(pick)
    return keep


# ==== loading the kernels and capturing specialisations =============================================================
def load_kernels():
    """This checkout's ``kernels/`` as ``sparse_attention.kernels`` (how the package ships it), without running
    ``sparse_attention/__init__.py`` (which imports the whole package): the parent is registered as a bare package
    over ``sparse_attention/`` when it is not imported yet. Returns a namespace with ``prefill``, ``decode``,
    ``regularizer``, ``common`` and ``config``."""
    if KERNELS_PACKAGE not in sys.modules:
        if "sparse_attention" not in sys.modules:
            parent = types.ModuleType("sparse_attention")
            parent.__path__ = [str(REPO_ROOT / "sparse_attention")]
            sys.modules["sparse_attention"] = parent
        spec = importlib.util.spec_from_file_location(
            KERNELS_PACKAGE,
            REPO_ROOT / "kernels" / "__init__.py",
            submodule_search_locations=[str(REPO_ROOT / "kernels")],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[KERNELS_PACKAGE] = module
        spec.loader.exec_module(module)
    names = ("prefill", "decode", "regularizer", "common", "config")
    return types.SimpleNamespace(**{n: importlib.import_module(f"{KERNELS_PACKAGE}.{n}") for n in names})


@dataclass
class Spec:
    """One specialisation as Triton would compile it at launch."""

    fn: object  # the JITFunction
    signature: dict
    constants: dict
    attrs: dict
    options: dict  # user-level options (num_warps, num_stages, ...), re-parsed per target by triton.compile
    key: str  # Triton's cache key of the specialisation

    @property
    def name(self) -> str:
        return _kernel_name(self.fn)

    def constexprs(self) -> dict:
        names = list(self.fn.arg_names)
        out = {}
        for path, value in self.constants.items():
            if isinstance(path, tuple) and len(path) == 1 and path[0] < len(names):
                value = getattr(value, "value", value)
                out[names[path[0]]] = value if isinstance(value, (bool, int, float, str, type(None))) else str(value)
        return out


def _kernel_name(fn) -> str:
    name = fn.__name__
    if name in KERNEL_NAMES:
        return KERNEL_NAMES[name]
    return f"{fn.__module__.rsplit('.', 1)[-1]}_{name.strip('_').removesuffix('_kernel')}"


# Options that parse_options derives from the target: dropped so that each target derives its own.
_TARGET_OPTIONS = ("arch", "supported_fp8_dtypes", "deprecated_fp8_dot_operand_dtypes", "max_num_imprecise_acc_default",
                   "extern_libs", "backend_name")  # fmt: skip


class _FakeDriver:
    """Just enough of a Triton GPU driver for ``JITFunction.run`` to bind arguments (3.6.0 and 3.9.0 call
    ``get_current_device``, ``get_current_stream`` and, in ``create_binder``, ``get_current_target``)."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_device_interface(self):
        raise RuntimeError("compile report: no device interface without a GPU")

    def get_benchmarker(self):
        raise RuntimeError("compile report: nothing is benchmarked")


@contextlib.contextmanager
def capturing(kern, config_selector: Callable | None = None):
    """Within the block, kernel launches compile and run nothing; every specialisation they would compile is appended
    to the yielded list as a :class:`Spec`. Restores everything on exit.

    - The active driver is a :class:`_FakeDriver` (sm_90). ``driver.active`` would otherwise build the CUDA driver,
      which needs libcuda; the previous value of ``driver._active`` (None when never built) is put back.
    - ``knobs.runtime.jit_cache_hook``: ``JITFunction._do_compile`` calls it with keyword arguments ``key``, ``repr``,
      ``fn`` (``.jit_function``), ``compile`` (a dict with ``signature``, ``constants``, ``configs`` = ``[attrs]``,
      ``specialization_data`` = JSON holding ``options``), ``is_manual_warmup``, ``already_compiled``; when it
      returns True, ``run`` returns None before compiling or launching (3.6.0 and 3.9.0).
    - ``Autotuner.run`` runs the wrapped function once per config its ``prune_configs`` keeps (the launcher's own
      ``early_config_prune``; nothing is benchmarked), optionally narrowed by ``config_selector(configs)``.
    - The kernel package's CPU-tensor checks (:data:`DEVICE_CHECKS`) report no objection.
    """
    from triton import knobs
    from triton.runtime import autotuner
    from triton.runtime.driver import driver

    captured: list[Spec] = []

    def hook(*, key, fn, compile, **_):
        data = json.loads(compile.get("specialization_data") or "{}")
        options = data.get("options") or {k: compile[k] for k in ("num_warps", "num_stages") if k in compile}
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if k not in _TARGET_OPTIONS}
        attrs = compile["configs"][0] if compile.get("configs") else {}
        captured.append(Spec(fn.jit_function, dict(compile["signature"]), dict(compile["constants"]), attrs, options,
                             str(key)))  # fmt: skip
        return True

    def autotuner_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        try:
            configs = list(self.prune_configs(kwargs))
            if config_selector is not None:
                configs = config_selector(configs)
            for config in configs:
                self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            self.nargs = None

    saved_driver = getattr(driver, "_active", None)
    saved_hook = knobs.runtime.jit_cache_hook
    saved_run = autotuner.Autotuner.run
    originals = {name: getattr(kern.common, name) for name in DEVICE_CHECKS if hasattr(kern.common, name)}
    patched = []
    for module in (kern.prefill, kern.decode, kern.regularizer, kern.common):
        for name, original in originals.items():
            if getattr(module, name, None) is original:
                setattr(module, name, lambda *a, **k: None)
                patched.append((module, name, original))
    driver.set_active(_FakeDriver(90))
    knobs.runtime.jit_cache_hook = hook
    autotuner.Autotuner.run = autotuner_run
    try:
        yield captured
    finally:
        autotuner.Autotuner.run = saved_run
        knobs.runtime.jit_cache_hook = saved_hook
        driver._active = saved_driver  # reset_active() would build the real driver, which needs a GPU
        for module, name, original in patched:
            setattr(module, name, original)


# ==== reading ptxas, TTGIR and PTX ==================================================================================
def parse_ptxas_log(text: str) -> dict:
    """Registers, spills, stack and barriers from ``ptxas -v`` output (the last function reported)."""
    out = {"regs": None, "spill_stores": None, "spill_loads": None, "stack_bytes": None, "ptxas_barriers": None}
    for m in re.finditer(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text):
        out["stack_bytes"], out["spill_stores"], out["spill_loads"] = (int(g) for g in m.groups())
    for m in re.finditer(r"Used (\d+) registers(?:, used (\d+) barriers)?", text):
        out["regs"] = int(m.group(1))
        out["ptxas_barriers"] = int(m.group(2)) if m.group(2) else 0
    return out


_VALUE = r"%[\w.$-]+"
_LOC_TAIL = re.compile(r"\s+loc\((?:[^()\"]|\"[^\"]*\"|\((?:[^()\"]|\"[^\"]*\"|\([^()]*\))*\))*\)\s*$")
_RESULTS = re.compile(rf"^((?:{_VALUE}(?::\d+)?)(?:\s*,\s*{_VALUE}(?::\d+)?)*)\s*=\s*(.*)$")
_OP_NAME = re.compile(r'^"?([A-Za-z_][\w.]*)"?')
_USE = re.compile(rf"{_VALUE}(?:#\d+)?")

DOT_OPS = ("tt.dot", "ttng.warp_group_dot", "ttng.tc_gen5_mma", "tt.dot_scaled", "ttng.tc_gen5_mma_scaled")
LOAD_OPS = ("tt.load", "tt.descriptor_load", "tt.descriptor_gather")
ASYNC_COPY_OPS = {
    "ttg.async_copy_global_to_local": "cp.async",
    "ttng.async_tma_copy_global_to_local": "tma",
    "ttng.async_tma_gather": "tma",
}
STORE_OPS = ("ttg.local_store",)
# Ops whose first operand is the data of their result (views, layout changes, element conversions).
PASS_THROUGH = (
    "ttg.memdesc_index", "ttg.memdesc_subview", "ttg.memdesc_subslice", "ttg.memdesc_trans", "ttg.memdesc_reshape",
    "ttg.memdesc_reinterpret", "ttg.local_load", "ttg.convert_layout", "tt.trans", "tt.reshape", "tt.broadcast",
    "tt.expand_dims", "arith.truncf", "arith.extf", "tt.fp_to_fp", "tt.bitcast", "ttng.tmem_load",
)  # fmt: skip
TTGIR_BARRIERS = ("gpu.barrier", "ttg.barrier", "ttng.fence_async_shared", "ttng.wait_barrier", "ttng.arrive_barrier",
                  "ttng.barrier_expect", "ttng.fence")  # fmt: skip


@dataclass(eq=False)
class Op:
    name: str
    results: list
    operands: list
    text: str
    line: int
    parent: Op | None = None
    regions: list = field(default_factory=list)  # lists of ops
    region_args: list = field(default_factory=list)  # per region, the names it defines

    def walk(self):
        for region in self.regions:
            for op in region:
                yield op
                yield from op.walk()

    def yields(self):
        """Terminators (``scf.yield``) of each region."""
        return [r[-1] for r in self.regions if r and r[-1].name == "scf.yield"]


def _strip_loc(line: str) -> str:
    return _LOC_TAIL.sub("", line.rstrip())


class TTGIR:
    """A line-based reading of textual TTGIR (one op per line, regions opened by a trailing ``{`` and closed by a
    leading ``}``, as MLIR prints them): ops with their results, operands and regions, and the ``#name = ...`` aliases
    of the layout encodings. Printed value names are unique only within a region and the regions it encloses
    (sibling regions reuse names such as ``%v``), so every use is resolved to its definition while parsing, and
    values are identified as ``name@line`` of their definition."""

    def __init__(self, text: str):
        self.aliases: dict[str, str] = {}
        self.root = Op("module", [], [], "", 0, regions=[[]], region_args=[[]])
        self.defs: dict[str, tuple] = {}
        stack = [self.root]
        scopes: list[dict] = [{}]  # printed name -> value id, one per open region
        for number, raw in enumerate(text.splitlines(), 1):
            s = _strip_loc(raw).strip()
            if not s or s.startswith("//"):
                continue
            alias = re.match(r"^(#[\w.$-]+)\s*=\s*(.*)$", s)
            if alias and len(stack) == 1:
                self.aliases[alias.group(1)] = alias.group(2)
                continue
            if s.startswith("}"):
                if len(stack) > 1:
                    stack.pop()
                    scopes.pop()
                    if s.endswith("{"):  # "} else {", "} do {": the same op's next region
                        stack.append(stack[-1].regions[-1][-1])
                        stack[-1].regions.append([])
                        stack[-1].region_args.append([])
                        scopes.append({})
                continue
            if s.startswith("^"):  # block label: ^bb0(%a: f32, %b: f32):
                op = stack[-1]
                for name in re.findall(rf"({_VALUE})\s*:", s):
                    self._define(scopes[-1], name, number, ("arg", op, len(op.regions) - 1, len(op.region_args[-1])))
                    op.region_args[-1].append(name)
                continue
            op = self._parse_op(s, number, stack[-1])
            op.operands = [self._lookup(scopes, v) for v in op.operands]
            for i, name in enumerate(op.results):
                op.results[i] = self._define(scopes[-1], name, number, ("result", op, i))
            stack[-1].regions[-1].append(op)
            if s.endswith("{"):
                if not op.regions:
                    op.regions.append([])
                    op.region_args.append([])
                scope = {}
                for ai, name in enumerate(op.region_args[0]):
                    op.region_args[0][ai] = self._define(scope, name, number, ("arg", op, 0, ai))
                stack.append(op)
                scopes.append(scope)
        self.ops = list(self.root.walk())
        self._writers = None

    def _define(self, scope: dict, name: str, line: int, definition: tuple) -> str:
        uid = f"{name}@{line}"
        scope[name] = uid
        self.defs[uid] = definition
        return uid

    @staticmethod
    def _lookup(scopes: list, name: str) -> str:
        for scope in reversed(scopes):
            if name in scope:
                return scope[name]
        return name  # a use of something never defined (a function argument of a declaration): no definition

    @staticmethod
    def _parse_op(s: str, number: int, parent: Op) -> Op:
        """The op of one line, with its results, operands and (for ``scf.for`` and ``tt.func``) region arguments, all
        as printed names."""
        results: list[str] = []
        body = s
        m = _RESULTS.match(s)
        if m:
            body = m.group(2)
            for item in m.group(1).split(","):
                item = item.strip()
                base, _, count = item.partition(":")
                results.extend([f"{base}#{i}" for i in range(int(count))] if count else [base])
        nm = _OP_NAME.match(body)
        name = nm.group(1) if nm else body.split(" ", 1)[0]
        rest = body[nm.end() :] if nm else body
        op = Op(name, results, [], s, number, parent)
        if name == "scf.for":
            head = re.match(rf"\s*({_VALUE})\s*=\s*(\S+)\s+to\s+(\S+)\s+step\s+(\S+)", rest)
            pairs = re.findall(rf"({_VALUE})\s*=\s*({_VALUE}(?:#\d+)?)", rest.split("iter_args", 1)[1]) if (
                "iter_args" in rest) else []  # fmt: skip
            if head:
                op.operands = [head.group(2), head.group(3), head.group(4)] + [p[1] for p in pairs]
                op.regions.append([])
                op.region_args.append([head.group(1)] + [p[0] for p in pairs])
            return op
        if name == "tt.func":
            op.regions.append([])
            op.region_args.append(re.findall(rf"({_VALUE})\s*:", rest))
            return op
        op.operands = _USE.findall(rest)
        return op

    def alias(self, name: str) -> str:
        return self.aliases.get(name, name)

    # ---- data flow ----
    def resolve_alloc(self, value: str) -> Op | None:
        """The ``ttg.local_alloc`` a shared-memory value is a view of (through views and loop-carried views)."""
        seen, todo = set(), [value]
        while todo:
            v = todo.pop()
            if v in seen:
                continue
            seen.add(v)
            d = self.defs.get(v)
            if d is None:
                continue
            if d[0] == "arg":
                todo.extend(self._carried(d[1], d[3]))
                continue
            op = d[1]
            if op.name == "ttg.local_alloc":
                return op
            if op.name in PASS_THROUGH[:6] and op.operands:
                todo.append(op.operands[0])
            elif op.name in ("scf.for", "scf.if"):
                todo.extend(y.operands[d[2]] for y in op.yields() if d[2] < len(y.operands))
        return None

    def _carried(self, loop: Op, arg_index: int) -> list:
        """Values that flow into region argument ``arg_index`` of an ``scf.for`` (its init and its yield)."""
        if loop.name != "scf.for" or arg_index == 0:
            return []
        i = arg_index - 1
        out = [loop.operands[3 + i]] if 3 + i < len(loop.operands) else []
        out.extend(y.operands[i] for y in loop.yields() if i < len(y.operands))
        return out

    def writers(self, alloc: Op) -> list:
        if self._writers is None:
            self._writers = {}
            for op in self.ops:
                if op.name in ASYNC_COPY_OPS or op.name in STORE_OPS:
                    for operand in op.operands:
                        target = self.resolve_alloc(operand)
                        if target is not None:
                            self._writers.setdefault(id(target), []).append(op)
        return self._writers.get(id(alloc), [])

    def load_sources(self, value: str) -> list:
        """Where the data of ``value`` comes from, as ``(kind, op, buffer)``: ``kind`` "cp.async" / "tma" for an async
        copy into ``buffer`` (its ``ttg.local_alloc``), the op name (``tt.load``, ``tt.descriptor_load``) for a
        synchronous load; values computed by other ops end the search (they are not loads)."""
        out, seen, todo = [], set(), [(value, None)]
        while todo:
            v, buf = todo.pop()
            if v in seen:
                continue
            seen.add(v)
            d = self.defs.get(v)
            if d is None:
                continue
            if d[0] == "arg":
                todo.extend((x, buf) for x in self._carried(d[1], d[3]))
                continue
            op, index = d[1], d[2]
            if op.name in LOAD_OPS:
                out.append((op.name, op, buf))
            elif op.name == "ttg.local_alloc":
                if op.operands:
                    todo.append((op.operands[0], op))
                else:
                    for w in self.writers(op):
                        if w.name in ASYNC_COPY_OPS:
                            out.append((ASYNC_COPY_OPS[w.name], w, op))
                        elif w.operands:
                            todo.append((w.operands[0], op))
            elif op.name in ("scf.for", "scf.if"):
                todo.extend((y.operands[index], buf) for y in op.yields() if index < len(y.operands))
            elif op.name == "ttng.warp_group_dot_wait" and index < len(op.operands):
                todo.append((op.operands[index], buf))
            elif op.name in PASS_THROUGH and op.operands:
                todo.append((op.operands[0], buf))
        return out

    def reaches(self, value: str, target: Op, scope: set) -> bool:
        """Whether ``value`` depends on a result of ``target`` through ops inside ``scope`` (ids of ops), following
        loop-carried values of the loops in it."""
        seen, todo = set(), [value]
        while todo:
            v = todo.pop()
            if v in seen:
                continue
            seen.add(v)
            d = self.defs.get(v)
            if d is None:
                continue
            op = d[1]
            if d[0] == "arg":
                if id(op) in scope or op.name == "scf.for":
                    todo.extend(self._carried(op, d[3]))
                continue
            if op is target:
                return True
            if id(op) not in scope:
                continue
            todo.extend(op.operands)
            if op.name in ("scf.for", "scf.if"):
                todo.extend(y.operands[d[2]] for y in op.yields() if d[2] < len(y.operands))
        return False

    def dot_kind(self, op: Op) -> str:
        if op.name == "ttng.warp_group_dot":
            return "wgmma"
        if op.name.startswith("ttng.tc_gen5_mma"):
            return "tcgen05"
        m = re.search(r"->\s*tensor<[^,>]*,\s*(#[\w.$-]+)", op.text)
        encoding = self.alias(m.group(1)) if m else ""
        mma = re.search(r"nvidia_mma<\{versionMajor = (\d+)", encoding)
        if mma:
            return f"mma_v{mma.group(1)}"
        if "blocked" in encoding:
            return "fma"
        return encoding or op.name


def _dims(type_text: str) -> list[int]:
    m = re.search(r"memdesc<((?:\d+x)+)", type_text)
    return [int(x) for x in m.group(1).rstrip("x").split("x")] if m else []


def _innermost_loop(op: Op) -> Op | None:
    p = op.parent
    while p is not None and p.name != "scf.for":
        p = p.parent
    return p


def analyse_ttgir(text: str) -> dict:
    """Facts of the attention loops of one kernel's TTGIR (see the module docstring): ``loops`` (per innermost loop
    with a product: its products with their roles, instruction families and the loads feeding them, and counts of
    async copies, synchronous loads and barrier-like ops) and the kernel-level ``k_*``, ``v_*``, ``qk_*``, ``pv_*``."""
    ir = TTGIR(text)
    loops: dict[int, dict] = {}
    for op in ir.ops:
        if op.name in DOT_OPS:
            loop = _innermost_loop(op)
            if loop is not None:
                loops.setdefault(id(loop), {"loop": loop, "dots": []})["dots"].append(op)
    summaries = []
    for entry in loops.values():
        loop, dots = entry["loop"], entry["dots"]
        body = list(loop.walk())
        scope = {id(o) for o in body}
        feeds = {id(d) for d in dots if any(e is not d and e.operands and ir.reaches(e.operands[0], d, scope)
                                            for e in dots)}  # fmt: skip
        products = []
        for d in dots:
            role = "score" if (id(d) in feeds or len(dots) == 1) else "second"
            operands = []
            for slot, value in zip("ab", d.operands[:2], strict=False):
                sources = ir.load_sources(value)
                # Loads in this loop; failing those, loads in another loop (a warp-specialised producer partition
                # fills the buffers the consumer's loop reads). Loads outside every loop (Q) are not the loop's.
                inside = [s for s in sources if id(s[1]) in scope] or [
                    s for s in sources if _innermost_loop(s[1]) is not None
                ]
                if not inside:
                    continue
                buffers = [(_dims(s[2].text)[0] if len(_dims(s[2].text)) >= 3 else 1) for s in inside if s[2]]
                operands.append({"operand": slot, "load": sorted({s[0] for s in inside}),
                                 "buffers": min(buffers) if buffers else None})  # fmt: skip
            products.append({"role": role, "mma": ir.dot_kind(d), "async": "isAsync = true" in d.text,
                             "loaded": operands, "line": d.line})  # fmt: skip
        names = [o.name for o in body]
        summaries.append({
            "line": loop.line,
            "products": products,
            "async_copies": sum(n in ASYNC_COPY_OPS for n in names),
            "sync_loads": sum(n in LOAD_OPS for n in names),
            "barriers": sum(n in TTGIR_BARRIERS for n in names),
            "async_waits": sum(n == "ttg.async_wait" for n in names),
        })  # fmt: skip
    summaries.sort(key=lambda s: s["line"])
    out = {"loops": summaries}
    for prefix, opnd, role in (("qk", "k", "score"), ("pv", "v", "second")):
        prods = [p for s in summaries for p in s["products"] if p["role"] == role]
        loaded = [x for p in prods for x in p["loaded"]]
        kinds = sorted({k for x in loaded for k in x["load"]})
        out[f"{opnd}_async"] = all(k in ("cp.async", "tma") for k in kinds) if kinds else None
        out[f"{opnd}_load"] = "+".join(kinds) if kinds else None
        buffers = [x["buffers"] for x in loaded if x["buffers"] is not None]
        out[f"{opnd}_buffers"] = min(buffers) if buffers else (1 if kinds else None)
        mmas = sorted({p["mma"] for p in prods})
        out[f"{prefix}_mma"] = "+".join(mmas) if mmas else None
        out[f"{prefix}_wgmma"] = all(m == "wgmma" for m in mmas) if mmas else None
        out[f"{prefix}_wgmma_async"] = all(p["async"] for p in prods) if mmas and out[f"{prefix}_wgmma"] else None
    out["async_copies_in_loop"] = [s["async_copies"] for s in summaries]
    out["sync_loads_in_loop"] = [s["sync_loads"] for s in summaries]
    return out


_PTX_BLOCK = re.compile(r"^(?:\$L__(BB\d+_\d+):|// %bb\.(\d+):)")
_PTX_COUNTS = {
    "wgmma": re.compile(r"^\s*(?:@!?%p\d+\s+)?wgmma\.mma_async"),
    "mma": re.compile(r"^\s*(?:@!?%p\d+\s+)?mma\.sync"),
    "cp_async": re.compile(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.c[ag]\."),
    "tma": re.compile(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.bulk\.tensor"),
    "ld_global": re.compile(r"^\s*(?:@!?%p\d+\s+)?ld\.global"),
    "bar": re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:bar|barrier)\.(?:sync|arrive|red)\b"),
    "fence_async": re.compile(r"^\s*(?:@!?%p\d+\s+)?fence\.proxy\.async"),
    "mbarrier": re.compile(r"^\s*(?:@!?%p\d+\s+)?mbarrier\."),
}


def analyse_ptx(text: str) -> dict:
    """Per innermost loop of the PTX that holds matrix instructions (``wgmma.mma_async`` or ``mma.sync``; in a kernel
    without any, per innermost loop), counts of instructions (CTA barriers, async copies, global loads, ...). Loops
    come from the loop comments LLVM writes on basic blocks (``=>This Inner Loop Header`` / ``in Loop:
    Header=BB0_2``); without them there are none."""
    blocks: dict[str, dict] = {}
    order: list[str] = []
    current = None
    fn_index = "0"
    for line in text.splitlines():
        m = _PTX_BLOCK.match(line)
        if m:
            if m.group(1):
                current = m.group(1)
                fn_index = current.split("_")[0][2:]
            else:
                current = f"BB{fn_index}_{m.group(2)}"
            blocks[current] = {"loop": None, "header": False, "counts": dict.fromkeys(_PTX_COUNTS, 0)}
            order.append(current)
        if current is None:
            continue
        block = blocks[current]
        if "Loop Header" in line:
            block["header"], block["inner"] = True, "Inner Loop Header" in line
            block["loop"] = current
        lm = re.search(r"in Loop: Header=(BB\d+_\d+)", line)
        if lm:
            block["loop"] = lm.group(1)
        for key, rx in _PTX_COUNTS.items():
            if rx.match(line):
                block["counts"][key] += 1
    loops: dict[str, dict] = {}
    for name in order:
        b = blocks[name]
        if b["loop"] is None:
            continue
        entry = loops.setdefault(b["loop"], dict.fromkeys(_PTX_COUNTS, 0))
        for key, n in b["counts"].items():
            entry[key] += n
    inner = [(h, c) for h, c in loops.items() if blocks.get(h, {}).get("inner", True)]
    if any(c["wgmma"] or c["mma"] for _, c in inner):
        inner = [(h, c) for h, c in inner if c["wgmma"] or c["mma"]]
    return {"ptx_loops": [{"header": h, **c} for h, c in inner], "barriers_per_loop": [c["bar"] for _, c in inner]}


def programs_per_sm(capability: int, regs: int | None, shared: int, num_warps: int) -> int | None:
    """Resident programs per SM from registers (allocated per warp in units of 256), shared memory and warps."""
    if regs is None:
        return None
    smem_sm, regs_sm, warps_sm, blocks_sm = SM_RESOURCES[capability]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = regs_sm // (per_warp * num_warps)
    by_smem = smem_sm // (shared + 1024)
    return min(by_regs, by_smem, warps_sm // num_warps, blocks_sm)


# ==== compiling =====================================================================================================
def ptxas_info(capability: int) -> tuple[str, str]:
    """(path, version) of the ptxas Triton uses for ``capability``; raises when the wheel has none."""
    from triton.backends.nvidia import compiler as nv

    tool = nv.get_ptxas(capability)
    if not tool.path or not os.path.exists(tool.path):
        raise FileNotFoundError(f"no ptxas at {tool.path!r}")
    return tool.path, tool.version


def _compile_one(spec: Spec, capability: int) -> dict:
    """Compile ``spec`` for ``capability`` and read its facts. ``knobs.nvidia.dump_ptxas_log`` makes 3.6.0 and 3.9.0
    print the ``ptxas -v`` log they already run (Triton always passes -v); without it ptxas is run again."""
    import subprocess

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = io.StringIO()
    start = time.perf_counter()
    saved = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(out), _native_stderr() as native:
            try:
                kernel = triton.compile(
                    ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constants, attrs=spec.attrs),
                    target=GPUTarget("cuda", capability, 32),
                    options=dict(spec.options),
                )
            except Exception as exc:
                raise CompileError(exc, native.read()) from exc
    finally:
        knobs.nvidia.dump_ptxas_log = saved
    seconds = time.perf_counter() - start
    asm = kernel.asm
    log = out.getvalue()
    if "spill stores" not in log:
        path, _ = ptxas_info(capability)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "kernel.ptx"
            src.write_text(asm["ptx"])
            command = [path, "-v", f"--gpu-name={TARGET_NAMES[capability]}", str(src), "-o", str(Path(tmp) / "k.cubin")]
            log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    facts = parse_ptxas_log(log)
    shared = int(kernel.metadata.shared)
    facts.update(
        spill_bytes=(facts["spill_stores"] or 0) + (facts["spill_loads"] or 0) if facts["spill_stores"] is not None
        else None,
        shared_bytes=shared,
        shared_limit=SHARED_LIMIT[capability],
        fits_shared=shared <= SHARED_LIMIT[capability],
        est_programs_per_sm=programs_per_sm(capability, facts["regs"], shared, spec.options.get("num_warps", 4)),
        compile_s=round(seconds, 3),
    )  # fmt: skip
    facts.update(analyse_ttgir(asm["ttgir"]))
    facts.update(analyse_ptx(asm["ptx"]))
    if capability < 90:
        facts["qk_wgmma"] = facts["pv_wgmma"] = facts["qk_wgmma_async"] = facts["pv_wgmma_async"] = None
    return facts


class CompileError(Exception):
    """A failed ``triton.compile``, with what the compiler printed to the process's stderr (MLIR diagnostics)."""

    def __init__(self, exc: BaseException, diagnostics: str):
        lines = [ln.strip() for ln in diagnostics.splitlines() if re.search(r"\b(error|note|Assertion)\b", ln)]
        lines.sort(key=lambda ln: "Assertion" not in ln)
        super().__init__(f"{type(exc).__name__}: {exc}" + ("; " + " | ".join(lines[:6]) if lines else ""))


class _Captured:
    def __init__(self, path: str):
        self.path = path

    def read(self) -> str:
        try:
            return Path(self.path).read_text(errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def _native_stderr():
    """File descriptor 2 redirected to a temporary file (the MLIR pass manager writes its diagnostics and crash
    reproducers there, not through ``sys.stderr``); yields an object whose ``read()`` returns what was written."""
    sys.stderr.flush()
    fd, path = tempfile.mkstemp(prefix="compile-report-", suffix=".log")
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        yield _Captured(path)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
        os.unlink(path)


def _error_text(exc: BaseException, limit: int = 2000) -> str:
    text = str(exc) if isinstance(exc, CompileError) else f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]


# Work shared with forked workers (fork start method: specialisations hold JITFunctions, which do not pickle).
_WORK: list = []


def _work_item(index: int) -> tuple[int, dict]:
    spec, capability = _WORK[index]
    try:
        return index, _compile_one(spec, capability)
    except Exception as exc:  # noqa: BLE001 - a failed compile is a record
        return index, {"error": _error_text(exc)}


# ==== the report ====================================================================================================
@dataclass
class Selection:
    subset: Subset
    kernels: tuple[str, ...] | None = None  # families or kernel names
    dtypes: tuple[str, ...] | None = None
    head_dims: tuple[int, ...] | None = None
    modes: tuple[str, ...] | None = None
    targets: tuple[int, ...] | None = None

    def cases(self) -> list[Case]:
        out = []
        for case in CASES:
            if case.family not in self.subset.modes:
                continue
            wanted = self.subset.modes[case.family]
            if wanted is not None and case.mode not in wanted:
                continue
            if self.modes and case.mode not in self.modes:
                continue
            if self.kernels and not any(k == case.family or k.startswith(case.family + "_") for k in self.kernels):
                continue
            out.append(case)
        return out

    def dtype_names(self, case: Case) -> tuple[str, ...]:
        names = self.subset.dtypes.get((case.family, case.mode), self.subset.dtypes.get(case.family, DTYPE_NAMES))
        return tuple(n for n in names if not self.dtypes or n in self.dtypes)

    def dims(self) -> tuple[int, ...]:
        return self.head_dims or self.subset.head_dims

    def capabilities(self, dtype: str | None = None, head_dim: int | None = None) -> tuple[int, ...]:
        """Targets of the run, or of one (dtype, head dim) when given (the subset's exclusions apply unless the
        command line named dtypes or head dims)."""
        caps = self.targets or self.subset.targets
        if dtype is None or self.dtypes or self.head_dims:
            return caps
        return tuple(c for c in caps if (dtype, head_dim, c) not in self.subset.exclude)

    def keep_kernel(self, name: str) -> bool:
        if not self.kernels:
            return True
        return any(k == name or (k in FAMILIES and name.startswith(k)) for k in self.kernels)


def capture_all(kern, selection: Selection, log=print) -> list[tuple[dict, Spec | None]]:
    """Run every selected launcher call under :func:`capturing`: ``(context, spec)`` pairs, ``spec`` None with an
    ``error`` in ``context`` when the call failed."""
    import torch

    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    out = []
    skipped = []
    for case in selection.cases():
        launchers = {"prefill": [kern.prefill.top_theta_prefill], "decode": [kern.decode.top_theta_decode],
                     "regularizer": [kern.regularizer.regularizer_forward]}[case.family]  # fmt: skip
        if case.requires and not all(_has_params(fn, case.requires) for fn in launchers):
            skipped.append(f"{case.family}/{case.mode}")
            continue
        for dtype in selection.dtype_names(case):
            for head_dim in selection.dims():
                if not selection.capabilities(dtype, head_dim):
                    continue  # excluded on every target: not even the launcher call
                context = {"family": case.family, "mode": case.mode, "dtype": dtype, "head_dim": head_dim,
                           "shape": {**case.shape, "D": head_dim}}  # fmt: skip
                policy = selection.subset.config_policy(case)
                with capturing(kern, per_tile_configs if policy == "per_tile" else None) as captured:
                    try:
                        case.launch(kern, torch_dtypes[dtype], head_dim, policy)
                    except Exception as exc:  # noqa: BLE001 - a launcher that refuses the call is a record
                        out.append(({**context, "error": "launcher call failed: " + _error_text(exc)}, None))
                        log(f"  {case.family} {case.mode} {dtype} D={head_dim}: launcher call failed: {exc}")
                        continue
                specs = [s for s in captured if selection.keep_kernel(s.name)]
                if not specs:
                    log(f"  {case.family} {case.mode} {dtype} D={head_dim}: no kernel launched")
                out.extend((context, s) for s in specs)
    if skipped:
        log("cases skipped (launcher lacks their parameters): " + ", ".join(skipped))
    return out


def _config_of(spec: Spec) -> dict:
    cx = spec.constexprs()
    return {"BLOCK_M": cx.get("BLOCK_M"), "BLOCK_N": cx.get("BLOCK_N"),
            "num_warps": spec.options.get("num_warps"), "num_stages": spec.options.get("num_stages")}  # fmt: skip


def dumps(records: list[dict]) -> str:
    """A JSON list with one record per line (compact, and a diff shows which records changed)."""
    return "[\n" + ",\n".join(json.dumps(r, allow_nan=False, separators=(",", ":")) for r in records) + "\n]\n"


def _identity(record: dict) -> str:
    keys = ("kernel", "mode", "dtype", "head_dim", "config", "target", "constexprs", "triton", "source_hash")
    return json.dumps([record.get(k) for k in keys], sort_keys=True)


def build_report(
    selection: Selection, out_path: Path | None, jobs: int = 1, log=print, resume: list[dict] | None = None
) -> list[dict]:
    """Capture, compile and write the report; returns the records. Records of ``resume`` (an earlier report) with the
    same kernel, mode, dtype, head dim, config, target, constexprs, Triton version and source hash, and no error, are
    taken as they are instead of compiling again."""
    import triton

    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    import harness

    kern = load_kernels()
    env = {"triton": triton.__version__, "commit": harness.git_commit(), "source_hash": harness.source_hash(),
           "command": shlex.join(["python", *sys.argv])}  # fmt: skip
    versions = {}
    for cap in selection.capabilities():
        try:
            versions[cap] = ptxas_info(cap)[1]
        except Exception as exc:  # noqa: BLE001
            versions[cap] = f"unavailable ({exc})"
    t0 = time.perf_counter()
    pairs = capture_all(kern, selection, log)
    log(f"captured {sum(s is not None for _, s in pairs)} specialisations in {time.perf_counter() - t0:.1f} s")

    records: list[dict] = []
    work: list = []  # (record index, spec, capability)
    seen: dict = {}
    earlier = {_identity(r): r for r in resume or () if "error" not in r and "same_as" not in r and "regs" in r}
    reused = 0
    for context, spec in pairs:
        base = {"kernel": spec.name if spec else context["family"], "mode": context["mode"], "dtype": context["dtype"],
                "head_dim": context["head_dim"]}  # fmt: skip
        for cap in selection.capabilities(context["dtype"], context["head_dim"]):
            rec = {**base, "config": _config_of(spec) if spec else None, "target": TARGET_NAMES[cap], **env,
                   "ptxas_version": versions[cap], "shape": context["shape"],
                   "constexprs": spec.constexprs() if spec else None}  # fmt: skip
            if spec is None:
                rec["error"] = context["error"]
            else:
                key = (spec.fn.__module__, spec.fn.__name__, spec.key, cap)
                if key in seen:
                    rec["same_as"] = seen[key]
                else:
                    seen[key] = len(records)
                    if _identity(rec) in earlier:
                        rec = dict(earlier[_identity(rec)])
                        reused += 1
                    else:
                        work.append((len(records), spec, cap))
            records.append(rec)
    if resume is not None:
        log(f"reused {reused} records of the earlier report")

    def write():
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_path.with_suffix(out_path.suffix + ".tmp")
            tmp.write_text(dumps(records))
            os.replace(tmp, out_path)

    # Cheap specialisations first (float32 "ieee" products and D=256 take 10-100x longer), so that a run cut short
    # holds the most records; the file keeps the case order.
    work.sort(key=lambda w: (records[w[0]]["dtype"] == "fp32", records[w[0]]["head_dim"] > 128, w[0]))
    _WORK[:] = [(spec, cap) for _, spec, cap in work]
    t1 = time.perf_counter()

    def results():
        if jobs <= 0:  # in this process (a compiler crash ends the report)
            for i in range(len(_WORK)):
                yield _work_item(i)
            return
        # Worker processes, so that a compiler that aborts costs one record, not the report: when a worker dies, the
        # items it left unfinished are retried one at a time, and the one that kills its worker again is an error.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        context = multiprocessing.get_context("fork")
        lost = []
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = {pool.submit(_work_item, i): i for i in range(len(_WORK))}
            for future in as_completed(futures):
                try:
                    yield future.result()
                except BrokenProcessPool:
                    lost.append(futures[future])
        for i in sorted(lost):
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                try:
                    yield pool.submit(_work_item, i).result()
                except BrokenProcessPool:
                    yield i, {"error": "the compiler process died (killed or aborted)"}

    for done, (i, facts) in enumerate(results(), 1):
        index = work[i][0]
        records[index].update(facts)
        r = records[index]
        c = r["config"] or {}
        summary = r.get("error", "").splitlines()[0][:160] if "error" in r else (
            f"regs {r['regs']} spill {r['spill_bytes']} smem {r['shared_bytes']} k_async {r['k_async']} "
            f"v_async {r['v_async']} qk {r['qk_mma']} pv {r['pv_mma']} bars {r['barriers_per_loop']} "
            f"{r['compile_s']:.1f}s")  # fmt: skip
        tile = f"{c['BLOCK_M']}x{c['BLOCK_N']} " if c.get("BLOCK_M") else ""
        log(f"[{done}/{len(work)}] {r['kernel']} {r['mode']} {r['dtype']} D={r['head_dim']} {tile}"
            f"w{c.get('num_warps')} s{c.get('num_stages')} {r['target']}: {summary}")  # fmt: skip
        write()
    _WORK.clear()
    for r in records:  # duplicates of one specialisation share its facts
        if "same_as" in r:
            src = records[r["same_as"]]
            r.update({k: v for k, v in src.items() if k not in r or k in ("error",)})
    write()
    log(f"compiled {len(work)} in {time.perf_counter() - t1:.1f} s; total {time.perf_counter() - t0:.1f} s")
    return records


SUMMARY_COLUMNS = ("kernel", "mode", "dtype", "D", "config", "target", "regs", "spill", "shared", "k_async", "v_async",
                   "qk", "pv", "bars")  # fmt: skip


def summary_rows(records: list[dict]) -> list[tuple]:
    """One row per record (:data:`SUMMARY_COLUMNS`), in the file's order; errors show as ``error``."""
    rows = []
    for r in records:
        c = r.get("config") or {}
        tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N") if c.get(k) is not None)
        config = f"{tile + ' ' if tile else ''}w{c.get('num_warps')}s{c.get('num_stages')}"
        head = (r["kernel"], r["mode"], r["dtype"], r["head_dim"], config, r["target"])
        if "error" in r:
            rows.append(head + ("error",) + ("",) * (len(SUMMARY_COLUMNS) - len(head) - 1))
            continue
        rows.append(head + (r["regs"], r["spill_bytes"], r["shared_bytes"], r["k_async"], r["v_async"], r["qk_mma"],
                            r["pv_mma"], r["barriers_per_loop"]))  # fmt: skip
    return rows


def summary_markdown(records: list[dict]) -> str:
    def cell(value):
        return "-" if value is None else str(value).replace("|", "/")

    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + " --- |" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in summary_rows(records)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "compile_sm90a.json"))
    parser.add_argument("--target", choices=(*TARGETS, "all"), default=None, help="default: the subset's targets")
    parser.add_argument("--subset", choices=tuple(SUBSETS), default="full")
    parser.add_argument("--kernel", nargs="+", default=None, help="families or kernel names")
    parser.add_argument("--dtype", nargs="+", choices=DTYPE_NAMES, default=None)
    parser.add_argument("--head-dim", nargs="+", type=int, default=None)
    parser.add_argument("--mode", nargs="+", default=None)
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many worker processes (0: in this one)")
    parser.add_argument("--cache-dir", default=None, help="Triton cache to use (default: a fresh temporary one)")
    parser.add_argument("--summary", metavar="FILE", default=None, help="print FILE's records as a table and exit")
    parser.add_argument(
        "--resume",
        nargs="*",
        metavar="FILE",
        default=None,
        help="reuse the matching records of these earlier reports (default: --out), compile the rest",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="call the launchers and list the captured specialisations, compile nothing (exit 1 if a call failed)",
    )
    args = parser.parse_args(argv)
    if args.summary:
        print(summary_markdown(json.loads(Path(args.summary).read_text())))
        return 0

    # Before the kernels are imported: compiled code, never the interpreter, and every shipped autotuning config.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["SPARSE_ATTENTION_AUTOTUNE"] = "1"
    # The shipped defaults, not this shell's overrides (kernels/config.py reads them once, at import): the cases name
    # the prefill variant and sweep the decode settings themselves, and the regularizer tile is the shipped one.
    for name in OVERRIDES:
        os.environ.pop(name, None)
    tmp_cache = None
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = args.cache_dir
    else:
        tmp_cache = tempfile.mkdtemp(prefix="compile-report-cache-")
        os.environ["TRITON_CACHE_DIR"] = tmp_cache
    targets = None
    if args.target:
        targets = tuple(TARGETS.values()) if args.target == "all" else (TARGETS[args.target],)
    selection = Selection(SUBSETS[args.subset], tuple(args.kernel) if args.kernel else None,
                          tuple(args.dtype) if args.dtype else None, tuple(args.head_dim) if args.head_dim else None,
                          tuple(args.mode) if args.mode else None, targets)  # fmt: skip

    def log(*parts):
        print(*parts, file=sys.stderr, flush=True)

    if args.dry_run:
        pairs = capture_all(load_kernels(), selection, log)
        for context, spec in pairs:
            config = _config_of(spec) if spec else None
            name = spec.name if spec else context["family"]
            what = context.get("error") or json.dumps(config)
            print(f"{name} {context['mode']} {context['dtype']} D={context['head_dim']}: {what}")
        shutil.rmtree(tmp_cache, ignore_errors=True)
        return 1 if any(spec is None for _, spec in pairs) else 0
    try:
        earlier = None
        if args.resume is not None:
            files = [Path(f) for f in args.resume] or [Path(args.out)]
            earlier = [r for f in files if f.exists() for r in json.loads(f.read_text())]
        records = build_report(selection, Path(args.out), jobs=args.jobs, log=log, resume=earlier)
    finally:
        if tmp_cache:
            shutil.rmtree(tmp_cache, ignore_errors=True)
    errors = sum("error" in r for r in records)
    log(f"{len(records)} records, {errors} errors -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
