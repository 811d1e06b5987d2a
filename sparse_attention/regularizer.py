"""The attention-condensation regularizer: push each attention row's softmax mass onto its top k keys.

For a row i with more than ``k`` visible keys and softmax P over them, the top-k mass is ``m_i = Σ_{j in top-k} P_ij``.
The loss is the mean over those rows of ``-log m_i`` (``kind="logmass"``, the default; score gradient ``P - P̂`` with
``P̂`` the top-k restriction of P renormalised) or of ``1 - m_i`` (``kind="mass"``; score gradient
``P (m_i - 1[j in top-k])``). This is the project's formulation (DESIGN.md) of "Attention Condensation via Sparsity
Induced Regularized Training" (arXiv 2503.01564), whose body is withdrawn.

Ties at the k-th largest score: the tied keys share the slots left by the keys above it equally (weight
``(k - #above) / #tied`` each), so ``m_i`` is exactly the top-k mass and the gradient is the average over every way of
breaking the tie. Both backends follow this rule.

Two backends: the reference here (plain PyTorch autograd, float32 inside, float64 for float64 inputs; it materialises
the ``[B, Hq, Lq, Lk]`` scores, fine for short rows) and the fused Triton kernels of
``sparse_attention.kernels.regularizer`` (never write the score matrix; CUDA, or CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .reference import grouped_scores, kth_largest_visible, visible_keys
from .validation import BACKENDS, AttentionCall, check_choice, check_int, prepare_call

KINDS = ("logmass", "mass")

_warned_fallback = False


@dataclass
class RegularizerTerms:
    """Unnormalised regularizer sums of one call, so that several calls (layers) can share one mean.

    Attributes:
        loss_sum: scalar, the per-row losses summed over the regularized rows; differentiable.
        mass_sum: scalar, their top-k masses summed (no gradient).
        rows: scalar float, the number of regularized rows (rows with more than k visible keys; no gradient).
    """

    loss_sum: torch.Tensor
    mass_sum: torch.Tensor
    rows: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        """Mean loss over the regularized rows; 0 (with zero gradient) when there are none."""
        return self.loss_sum / self.rows.clamp_min(1.0)


def _prepare(query, key, k, scale, causal, q_offset, attn_mask, kind, backend) -> AttentionCall:
    check_int("k", k)
    check_choice("kind", kind, KINDS)
    check_choice("backend", backend, BACKENDS)
    # The attention checks need a value tensor; the key stands in for it, so only query/key/mask errors can arise.
    return prepare_call(query, key, key, None, scale=scale, causal=causal, q_offset=q_offset, attn_mask=attn_mask)


def topk_weights(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k membership weights ``[..., N]``: 1 above the k-th largest visible score, 0 below it and where not
    visible, and ``(k - #above) / #tied`` for the keys equal to it. Rows with at most k visible keys get their
    visible keys (weight 1)."""
    s = scores.masked_fill(~visible, float("-inf"))
    thresh = kth_largest_visible(scores, visible, k)[..., None]
    above = s > thresh
    tied = (s == thresh) & visible
    n_above = above.sum(-1, keepdim=True)
    share = (k - n_above).to(scores.dtype) / tied.sum(-1, keepdim=True).clamp_min(1).to(scores.dtype)
    weight = above.to(scores.dtype) + tied.to(scores.dtype) * share
    short = visible.sum(-1, keepdim=True) <= k
    return torch.where(short, visible.to(scores.dtype), weight)


def reference_terms(call: AttentionCall, k: int, kind: str) -> RegularizerTerms:
    """The regularizer of a prepared call in plain PyTorch (see the module docstring)."""
    q, key = call.query, call.key
    b, hq, lq, _ = q.shape
    lk = key.shape[2]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = grouped_scores(q, key, call.scale, dtype)  # [B, Hq, Lq, Lk]
    vis = visible_keys(b, hq, 0, lq, lk, call.causal, call.q_offset, call.attn_mask, q.device)
    regularized = vis.sum(-1) > k  # [B, Hq, Lq]
    with torch.no_grad():
        log_weight = topk_weights(s, vis, k).log()
    # Rows that are not regularized see every key, so that their (discarded) log-sum-exps and gradients stay finite.
    s = s.masked_fill(~(vis | ~regularized[..., None]), float("-inf"))
    log_weight = log_weight.masked_fill(~regularized[..., None], 0.0)
    log_mass = torch.logsumexp(s + log_weight, -1) - torch.logsumexp(s, -1)
    per_row = -log_mass if kind == "logmass" else 1.0 - torch.exp(log_mass)
    zero = torch.zeros((), dtype=dtype, device=q.device)
    return RegularizerTerms(
        loss_sum=torch.where(regularized, per_row, zero).sum(),
        mass_sum=torch.where(regularized, torch.exp(log_mass.detach()), zero).sum(),
        rows=regularized.sum().to(dtype),
    )


def _fused_terms(call: AttentionCall, k: int, kind: str) -> RegularizerTerms:
    from .kernels.regularizer import TopkRegularizerFunction

    loss_sum, mass_sum, rows = TopkRegularizerFunction.apply(
        call.query, call.key, call.attn_mask, k, call.scale, call.causal, call.q_offset, kind
    )
    return RegularizerTerms(loss_sum=loss_sum, mass_sum=mass_sum, rows=rows)


def _use_fused(call: AttentionCall, k: int, backend: str) -> bool:
    global _warned_fallback
    if backend == "reference":
        return False
    from .kernels.regularizer import unsupported_reason

    reason = unsupported_reason(call.query, k)
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run this regularizer call: {reason}")
        return True
    if call.query.device.type != "cuda":
        return False
    if reason is not None and not _warned_fallback:
        warnings.warn(f"topk_regularizer falls back to the reference path: {reason}", stacklevel=4)
        _warned_fallback = True
    return reason is None


def regularizer_terms(
    query: torch.Tensor,
    key: torch.Tensor,
    k: int,
    *,
    scale: float | None = None,
    causal: bool = True,
    q_offset: int | None = None,
    attn_mask: torch.Tensor | None = None,
    kind: str = "logmass",
    backend: str = "auto",
) -> RegularizerTerms:
    """Like :func:`topk_regularizer`, but returns the sums and the row count (:class:`RegularizerTerms`), so that
    the terms of several calls can be combined into one mean over all their rows."""
    call = _prepare(query, key, k, scale, causal, q_offset, attn_mask, kind, backend)
    if _use_fused(call, k, backend):
        return _fused_terms(call, k, kind)
    return reference_terms(call, k, kind)


def topk_regularizer(
    query: torch.Tensor,
    key: torch.Tensor,
    k: int,
    *,
    scale: float | None = None,
    causal: bool = True,
    q_offset: int | None = None,
    attn_mask: torch.Tensor | None = None,
    kind: str = "logmass",
    backend: str = "auto",
) -> torch.Tensor:
    """Attention-condensation loss: how much softmax mass each attention row puts outside its top k keys.

    Args:
        query: ``[B, Hq, Lq, D]``.
        key: ``[B, Hkv, Lk, D]`` with ``Hq`` a multiple of ``Hkv`` (query head h reads kv head ``h // (Hq/Hkv)``).
        k: top-k size, an int >= 1. Rows with at most k visible keys are not regularized.
        scale: score scale, default ``D ** -0.5``.
        causal: row i sees key j only when ``j <= q_offset + i`` (default True).
        q_offset: position of query row 0 among the keys, default ``Lk - Lq`` (bottom-right alignment).
        attn_mask: boolean mask, True = attend, broadcastable to ``[B, Hq, Lq, Lk]``; combined with ``causal``.
        kind: ``"logmass"`` (default): mean of ``-log m_i``; ``"mass"``: mean of ``1 - m_i``, with ``m_i`` the
            softmax mass of the row's k largest visible scores (ties share the remaining top-k slots equally).
        backend: ``"auto"`` (default: the fused Triton kernels for CUDA tensors, the reference otherwise; with k
            above ``kernels.config.REGULARIZER_MAX_K`` = 128 it warns once and uses the reference),
            ``"reference"`` or ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Returns:
        A scalar tensor, float32 (float64 for float64 inputs): the mean over every row with more than k visible keys,
        across batch and heads. Differentiable with respect to query and key. 0, with zero gradients, when no row has
        more than k visible keys.

    Raises:
        TypeError / ValueError naming the argument: a non-tensor or non-floating input, mismatched dtypes or devices,
        wrong ranks, heads that do not group, mismatched batch or head dim, a mask that is not boolean or does not
        broadcast, ``k < 1`` or not an int, an unknown ``kind`` or ``backend``, a non-finite ``scale``; and
        ``ValueError`` when ``backend="triton"`` cannot run the call (CPU tensors without the interpreter, float64,
        head dim above 256, k above 128).
    """
    return regularizer_terms(
        query, key, k, scale=scale, causal=causal, q_offset=q_offset, attn_mask=attn_mask, kind=kind, backend=backend
    ).loss
