"""Test helpers shared by the test files: an independent float64 oracle and the tolerance rule.

The oracle is written from DESIGN.md directly, row by row in float64; it deliberately shares no code with
``sparse_attention.reference`` so that the two can check each other. Small shapes only (it loops over rows).

Tolerance rule (DEVELOPERS.md): a backend's error against the float64 oracle may be at most twice the error that
PyTorch's own dense SDPA makes in the same precision against float64 on the same inputs, plus a floor of a few
units in the last place of that dtype (so that an exactly-representable case does not demand zero error).
Kernels must therefore compute float32 dot products in full float32 ("ieee"), not tf32.
"""

from __future__ import annotations

import math

import torch


def _table(table, hq: int) -> torch.Tensor:
    t = torch.as_tensor(table, dtype=torch.float32).double().cpu()
    if t.dim() == 0:
        t = t.reshape(1, 1)
    elif t.dim() == 1:
        t = t[:, None]
    return t.expand(hq, t.shape[1])


def oracle_top_theta(
    q,
    k,
    v,
    theta=None,
    *,
    k_dense=0,
    scale=None,
    causal=True,
    q_offset=None,
    attn_mask=None,
    placement="pre",
    sdc="exact",
    sdc_table=None,
    vmc=False,
):
    """Top-θ attention in float64, one row at a time. Returns ``(out64, kept, visible, kept_v_rows)`` on CPU;
    ``kept_v_rows`` is ``[B, Hkv]`` counting keys kept by any head and any row of the group."""
    q64, k64, v64 = (t.detach().double().cpu() for t in (q, k, v))
    b_, hq, lq, d = q64.shape
    hkv, lk = k64.shape[1], k64.shape[2]
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    q_offset = lk - lq if q_offset is None else q_offset
    mask = None if attn_mask is None else attn_mask.cpu().expand(b_, hq, lq, lk)
    th_table = None if theta is None else _table(theta, hq)
    c_table = None if sdc_table is None else _table(sdc_table, hq)
    out = torch.zeros(b_, hq, lq, d, dtype=torch.float64)
    kept = torch.zeros(b_, hq, lq, dtype=torch.int64)
    visible = torch.zeros(b_, hq, lq, dtype=torch.int64)
    kept_v = torch.zeros(b_, hkv, lk, dtype=torch.bool)
    for b in range(b_):
        for h in range(hq):
            g = h // group
            scores = scale * (k64[b, g] @ q64[b, h].T).T  # [Lq, Lk]
            for i in range(lq):
                vis = [
                    j
                    for j in range(lk)
                    if (not causal or j <= q_offset + i) and (mask is None or bool(mask[b, h, i, j]))
                ]
                n = len(vis)
                visible[b, h, i] = n
                if n == 0:
                    continue
                s = scores[i]
                m = max(float(s[j]) for j in vis)
                e = {j: math.exp(float(s[j]) - m) for j in vis}
                d_all = sum(e.values())
                pruned = th_table is not None and n > k_dense
                if pruned:
                    th = float(th_table[h, min(n, th_table.shape[1]) - 1])
                    if placement == "pre":
                        keep = [j for j in vis if float(s[j]) > th]
                    else:
                        keep = [j for j in vis if e[j] / d_all > th]
                else:
                    keep = vis
                d_kept = sum(e[j] for j in keep)
                if not pruned or placement == "post" or sdc == "exact":
                    denom = d_all
                elif sdc == "none":
                    denom = d_kept
                elif sdc == "threshold":
                    dropped = n - len(keep)
                    denom = d_kept + (dropped * math.exp(th - m) if dropped else 0.0)
                else:
                    denom = d_kept + float(c_table[h, min(n, c_table.shape[1]) - 1])
                kept[b, h, i] = len(keep)
                if denom == 0.0:
                    mass = 0.0
                else:
                    for j in keep:
                        out[b, h, i] += e[j] / denom * v64[b, g, j]
                        kept_v[b, g, j] = True
                    mass = sum(e[j] for j in keep) / denom
                if vmc:
                    out[b, h, i] += (1.0 - mass) * v64[b, g, vis].mean(0)
    return out, kept, visible, kept_v.sum(-1)


def torch_error(q, k, v, attn_mask=None, *, scale=None, causal=True, q_offset=None) -> float:
    """Max abs error PyTorch's dense SDPA makes in the inputs' dtype and device against float64 on CPU."""
    b_, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    q_offset = lk - lq if q_offset is None else q_offset
    vis = torch.ones(b_, hq, lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        rows = torch.arange(lq, device=q.device)[:, None] + q_offset
        vis = vis & (torch.arange(lk, device=q.device)[None, :] <= rows)
    if attn_mask is not None:
        vis = vis & attn_mask.to(q.device)
    vis = vis | ~vis.any(-1, keepdim=True)  # rows with nothing visible would be NaN in SDPA
    kk = k.repeat_interleave(hq // hkv, 1)
    vv = v.repeat_interleave(hq // hkv, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    low = sdpa(q, kk, vv, attn_mask=vis, scale=scale).double().cpu()
    high = sdpa(q.double().cpu(), kk.double().cpu(), vv.double().cpu(), attn_mask=vis.cpu(), scale=scale)
    return float((low - high).abs().max())


def tolerance(q, k, v, attn_mask=None, *, scale=None, causal=True, q_offset=None, magnitude=1.0) -> float:
    """The allowed max abs error for outputs of this precision: ``2 · torch_error + 4 · eps · magnitude``."""
    eps = torch.finfo(q.dtype).eps
    err = torch_error(q, k, v, attn_mask, scale=scale, causal=causal, q_offset=q_offset)
    return 2.0 * err + 4.0 * eps * max(1.0, magnitude)


def assert_close_to_oracle(out, out64, q, k, v, attn_mask=None, scale=None, *, causal=True, q_offset=None, what=""):
    """Assert ``out`` is NaN-free and within :func:`tolerance` of the float64 oracle ``out64``."""
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    got = out.detach().double().cpu()
    err = float((got - out64).abs().max()) if got.numel() else 0.0
    tol = tolerance(
        q, k, v, attn_mask, scale=scale, causal=causal, q_offset=q_offset, magnitude=float(out64.abs().max())
    )
    assert err <= tol, f"{what}: max abs error {err:.3e} exceeds tolerance {tol:.3e}"


def make_qkv(b, hq, hkv, lq, lk, d, dtype=torch.float32, device="cpu", *, spread=1.0, seed=0):
    """Random q/k/v with score spread controlled by ``spread`` (larger = peakier attention)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen) * spread
    k = torch.randn(b, hkv, lk, d, generator=gen)
    v = torch.randn(b, hkv, lk, d, generator=gen)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def left_padding_mask(lengths, lk, device="cpu") -> torch.Tensor:
    """Boolean ``[B, 1, 1, Lk]`` mask: batch b attends to its last ``lengths[b]`` keys (HF left padding)."""
    pos = torch.arange(lk, device=device)
    lengths = torch.as_tensor(lengths, device=device)
    return (pos[None, :] >= (lk - lengths)[:, None])[:, None, None, :]


def quantile_theta(q, k, keep_fraction: float, scale=None) -> torch.Tensor:
    """Per-head ``[Hq]`` pre-softmax thresholds keeping about ``keep_fraction`` of all scores."""
    hq, hkv = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = scale * q.float() @ k.float().repeat_interleave(hq // hkv, 1).transpose(-1, -2)
    flat = s.transpose(0, 1).reshape(hq, -1)
    return torch.quantile(flat, 1.0 - keep_fraction, dim=1).float()


def tiny_gpt2(n_layer=3, n_head=4, n_embd=64, vocab=97, positions=128, seed=0):
    """A randomly initialised GPT-2 small enough for CPU tests."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=positions,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(layers=3, heads=4, kv_heads=2, hidden=64, vocab=97, seed=0):
    """A randomly initialised GQA Llama small enough for CPU tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=hidden,
        intermediate_size=2 * hidden, vocab_size=vocab, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()
