"""The per-call path (HF forward → ops → launcher) never reads the device (issue 11), so that an HF decode step can be
captured in a CUDA graph.

On CPU a device read cannot be seen as a stall, so the test watches for the operations that would be one on a GPU:
``aten._local_scalar_dense`` (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``), data-dependent shapes
(``nonzero``, ``masked_select``, ``unique``) and ``aten.equal``. It runs the Triton backend with the kernel launches
themselves stubbed out (the interpreter, which copies tensors to NumPy, is not the hot path on a GPU), so what is
checked is exactly the Python and PyTorch code around the kernels: mask adaptation, settings, the contract, the
launchers. A GPU-marked test then captures a real decode step in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from sa_testing import tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

import sparse_attention as sa
from sparse_attention.hf import backend
from sparse_attention.kernels import config
from sparse_attention.ops.contract import KeyPadding

aten = torch.ops.aten
SYNC_OPS = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten.equal,
    aten.is_nonzero,
    aten._unique2,
    aten.unique_consecutive,
    aten.unique_dim,
}


class NoSync(TorchDispatchMode):
    """Fail on any operation that reads device data on the host."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNC_OPS:
            raise AssertionError(f"host synchronisation on the per-call path: {func}")
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _guarded(fn, guard: NoSync):
    def wrapper(*args, **kwargs):
        with guard:
            return fn(*args, **kwargs)

    return wrapper


@pytest.fixture
def stubbed_kernels(monkeypatch):
    """Kernel launches do nothing (outputs keep their allocation); everything around them runs."""
    if not config.INTERPRET:
        pytest.skip("the stub replaces the interpreter's launches (a GPU runs the CUDA-graph test instead)")
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)


def _configured_llama():
    model = tiny_llama(layers=3, heads=4, kv_heads=2, hidden=64)
    ids = torch.randint(1, 97, (2, 24))
    th = sa.calibrate(model, [ids], k=4, dense_layers=(0,), progress=False)
    sa.configure(model, th, sdc="threshold", vmc=True, backend="triton")
    return model


def test_sync_guard_catches_a_sync():
    guard = NoSync()
    with pytest.raises(AssertionError, match="host synchronisation"):
        with guard:
            bool(torch.ones(3).sum() > 0)


def _prefill_and_decode(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    step = torch.randint(1, 97, (ids.shape[0], 1))
    longer = torch.cat([mask, torch.ones(ids.shape[0], 1, dtype=mask.dtype)], 1)
    model(input_ids=step, attention_mask=longer, past_key_values=out.past_key_values, use_cache=True)
    # a static cache: the decode mask comes as a general [B, 1, 1, Lk] mask with a device-side offset
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                   cache_implementation="static", pad_token_id=0)  # fmt: skip


def test_prefill_and_decode_steps_never_read_the_device(stubbed_kernels, monkeypatch):
    model = _configured_llama()
    ids = torch.randint(1, 97, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: causal + key padding
    with torch.no_grad():
        # Warm-up: the first call parses config.top_theta and moves each layer's tables to the device, once.
        _prefill_and_decode(model, ids, mask)
    guard = NoSync()
    from transformers import AttentionInterface

    monkeypatch.setitem(
        AttentionInterface._global_mapping, "top_theta", _guarded(backend.top_theta_attention_forward, guard)
    )
    monkeypatch.setattr(KeyPadding, "from_mask", classmethod(_guarded(KeyPadding.from_mask.__func__, guard)))
    with torch.no_grad():
        _prefill_and_decode(model, ids, mask)
    assert guard.calls > 0


@pytest.mark.gpu
def test_a_decode_step_with_a_static_cache_is_captured_in_a_cuda_graph():
    from transformers import StaticCache

    torch.manual_seed(0)
    model = tiny_llama(layers=3, heads=4, kv_heads=2, hidden=64).cuda().half()
    ids = torch.randint(1, 97, (2, 40), device="cuda")
    th = sa.calibrate(model, [ids], k=4, dense_layers=(0,), progress=False)
    sa.configure(model, th, sdc="threshold", backend="triton")
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        first = model(
            input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(40, device="cuda")
        )
        token = first.logits[:, -1:].argmax(-1)
        position = torch.tensor([40], device="cuda")
        static_token, static_position = token.clone(), position.clone()

        def step():
            return model(input_ids=static_token, past_key_values=cache, cache_position=static_position, use_cache=True)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compile and autotune outside the capture
                expected = step().logits.clone()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step().logits
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected, atol=2e-3, rtol=0)
