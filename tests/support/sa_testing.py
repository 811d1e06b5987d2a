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


def _visible(causal, q_offset, mask, b, h, i, lk) -> list[int]:
    return [j for j in range(lk) if (not causal or j <= q_offset + i) and (mask is None or bool(mask[b, h, i, j]))]


def _capped(score: float, softcap) -> float:
    return score if not softcap else softcap * math.tanh(score / softcap)


def oracle_top_theta(
    q,
    k,
    v,
    theta=None,
    *,
    k_dense=0,
    scale=None,
    softcap=None,
    causal=True,
    q_offset=None,
    attn_mask=None,
    sinks=None,
    placement="pre",
    sdc="exact",
    sdc_table=None,
    sdc_scale=1.0,
    cap=None,
    vmc=False,
):
    """Top-θ attention in float64, one row at a time, written from DESIGN.md ("The semantics").

    Returns ``(out64 [B, Hq, Lq, Dv], kept, visible, kept_v_rows)`` on CPU; ``kept_v_rows`` is ``[B, Hkv]`` counting
    keys kept by any head and any row of the group. A row that reads a NaN (its query, a visible key, a kept value
    row, or with ``vmc`` any visible value row) is NaN in every output column and has ``kept = -1``.
    Placement "post" keeps key j iff ``log p_j > log θ`` (exact arithmetic: θ <= 0 keeps every visible key).
    """
    q64, k64, v64 = (t.detach().double().cpu() for t in (q, k, v))
    b_, hq, lq, d = q64.shape
    hkv, lk, dv = k64.shape[1], k64.shape[2], v64.shape[3]
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    q_offset = lk - lq if q_offset is None else q_offset
    mask = None if attn_mask is None else attn_mask.cpu().expand(b_, hq, lq, lk)
    th_table = None if theta is None else _table(theta, hq)
    c_table = None if sdc_table is None else _table(sdc_table, hq)
    sink = None if sinks is None else torch.as_tensor(sinks).detach().to("cpu", torch.float64).expand(hq)
    out = torch.zeros(b_, hq, lq, dv, dtype=torch.float64)
    kept = torch.zeros(b_, hq, lq, dtype=torch.int64)
    visible = torch.zeros(b_, hq, lq, dtype=torch.int64)
    kept_v = torch.zeros(b_, hkv, lk, dtype=torch.bool)
    for b in range(b_):
        for h in range(hq):
            g = h // group
            raw = scale * (k64[b, g] @ q64[b, h].T).T  # [Lq, Lk]
            for i in range(lq):
                vis = _visible(causal, q_offset, mask, b, h, i, lk)
                n = len(vis)
                visible[b, h, i] = n
                if n == 0:
                    continue
                s = {j: _capped(float(raw[i, j]), softcap) for j in vis}
                nan_sink = sink is not None and math.isnan(float(sink[h]))
                if any(math.isnan(x) for x in s.values()) or bool(torch.isnan(q64[b, h, i]).any()) or nan_sink:
                    out[b, h, i] = float("nan")
                    kept[b, h, i] = -1
                    continue
                s_sink = None if sink is None else float(sink[h])
                m = max(max(s.values()), s_sink if s_sink is not None else float("-inf"))
                e = {j: math.exp(s[j] - m) for j in vis}
                e_sink = 0.0 if s_sink is None else math.exp(s_sink - m)
                d_all = sum(e.values()) + e_sink
                pruned = th_table is not None and n > k_dense
                th = float(th_table[h, min(n, th_table.shape[1]) - 1]) if pruned else None
                if not pruned:
                    keep = vis
                elif placement == "pre":
                    keep = [j for j in vis if s[j] > th]
                elif th <= 0:
                    keep = vis
                else:
                    log_d = math.log(d_all)
                    keep = [j for j in vis if s[j] - m - log_d > math.log(th)]
                if pruned and cap:
                    keep = keep[-cap:]
                d_kept = sum(e[j] for j in keep) + e_sink
                if not pruned or placement == "post":
                    denom = d_all
                else:
                    dropped = n - len(keep)
                    if sdc == "exact":
                        miss = d_all - d_kept
                    elif sdc == "none":
                        miss = 0.0
                    elif sdc == "threshold":
                        miss = dropped * math.exp(th - m) if dropped else 0.0
                    else:
                        miss = float(c_table[h, min(n, c_table.shape[1]) - 1])
                    # sdc_scale = 0 is no compensation, also against an infinite term (0 · ∞ = 0)
                    denom = d_kept + sdc_scale * miss if miss and sdc_scale else d_kept
                kept[b, h, i] = len(keep)
                mass = 0.0
                if denom > 0 and not math.isinf(denom):
                    for j in keep:
                        out[b, h, i] += e[j] / denom * v64[b, g, j]
                    mass = (sum(e[j] for j in keep) + e_sink) / denom
                for j in keep:
                    kept_v[b, g, j] = True
                if vmc:
                    out[b, h, i] += (1.0 - mass) * v64[b, g, vis].mean(0)
                if torch.isnan(out[b, h, i]).any():
                    out[b, h, i] = float("nan")
                    kept[b, h, i] = -1
    return out, kept, visible, kept_v.sum(-1)


def oracle_regularizer(q, k, topk, *, scale=None, softcap=None, causal=True, q_offset=None, mask=None, sinks=None,
                       kind="logmass"):  # fmt: skip
    """The condensation regularizer in float64, row by row (DESIGN.md, "The condensation regularizer").

    Returns ``(loss, dq, dk, mean top-k mass, dsinks)``: the mean over rows with more than ``topk`` visible keys,
    ties at the k-th score sharing the leftover top-k slots equally. With ``sinks`` the sink joins every softmax and
    counts as kept (``m_i = (Σ_top-k e_j + e_sink) / D_all``); ``dsinks`` is ``[Hq]`` (``None`` without sinks).
    Scores are soft-capped first when ``softcap`` is given, and the gradients go through the cap.
    """
    q64, k64 = q.detach().double().cpu(), k.detach().double().cpu()
    b_, hq, lq, d = q64.shape
    hkv, lk = k64.shape[1], k64.shape[2]
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    q_offset = lk - lq if q_offset is None else q_offset
    mask = None if mask is None else mask.cpu().expand(b_, hq, lq, lk)
    sink = None if sinks is None else torch.as_tensor(sinks).detach().to("cpu", torch.float64).expand(hq)
    grad_s = torch.zeros(b_, hq, lq, lk, dtype=torch.float64)
    grad_sink = torch.zeros(hq, dtype=torch.float64)
    losses, masses = [], []
    for b in range(b_):
        for h in range(hq):
            for i in range(lq):
                vis = _visible(causal, q_offset, mask, b, h, i, lk)
                if len(vis) <= topk:
                    continue
                raw = torch.stack([scale * torch.dot(q64[b, h, i], k64[b, h // group, j]) for j in vis])
                s = raw if not softcap else softcap * torch.tanh(raw / softcap)
                s_sink = None if sink is None else sink[h]
                top = s.max() if s_sink is None else torch.maximum(s.max(), s_sink)
                e = torch.exp(s - top)
                e_sink = 0.0 if s_sink is None else float(torch.exp(s_sink - top))
                d_all = float(e.sum()) + e_sink
                p = e / d_all
                p_sink = e_sink / d_all
                t = sorted(s.tolist(), reverse=True)[topk - 1]
                above, tied = s > t, s == t
                w = above.double() + tied.double() * (topk - int(above.sum())) / int(tied.sum())
                m = float((w * p).sum()) + p_sink
                masses.append(m)
                if kind == "logmass":
                    losses.append(-math.log(m))
                    g = p - w * p / m
                    g_sink = p_sink - p_sink / m
                else:
                    losses.append(1.0 - m)
                    g = p * (m - w)
                    g_sink = p_sink * (m - 1.0)
                if softcap:
                    g = g * (1.0 - (s / softcap) ** 2)
                grad_s[b, h, i, vis] = g
                grad_sink[h] += g_sink
    rows = max(1, len(losses))
    grad_s /= rows
    grad_sink /= rows
    k_rep = k64.repeat_interleave(group, 1)
    dq = scale * grad_s @ k_rep
    dk = (scale * grad_s.transpose(-1, -2) @ q64).reshape(b_, hkv, group, lk, d).sum(2)
    mass = sum(masses) / len(masses) if masses else float("nan")
    return sum(losses) / rows, dq, dk, mass, (None if sink is None else grad_sink)


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


def make_qkv(b, hq, hkv, lq, lk, d, dtype=torch.float32, device="cpu", *, dv=None, spread=1.0, seed=0):
    """Random q/k/v with score spread controlled by ``spread`` (larger = peakier attention); ``dv`` is the value
    head dim (default ``d``)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen) * spread
    k = torch.randn(b, hkv, lk, d, generator=gen)
    v = torch.randn(b, hkv, lk, d if dv is None else dv, generator=gen)
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
