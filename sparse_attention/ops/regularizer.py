"""The attention-condensation regularizer: push each attention row's softmax mass onto its top k keys.

For a row i with more than ``k`` visible keys and softmax P over them, the top-k mass is ``m_i = Σ_{j in top-k} P_ij``.
The loss is the mean over those rows of ``-log m_i`` (``kind="logmass"``, the default; score gradient ``P - P̂`` with
``P̂`` the top-k restriction of P renormalised) or of ``1 - m_i`` (``kind="mass"``; score gradient
``P (m_i - 1[j in top-k])``). This is the project's formulation (DESIGN.md) of "Attention Condensation via Sparsity
Induced Regularized Training" (arXiv 2503.01564), whose body is withdrawn.

Ties at the k-th largest score: the tied keys share the slots left by the keys above it equally (weight
``(k - #above) / #tied`` each), so ``m_i`` is exactly the top-k mass and the gradient is the average over every way of
breaking the tie. Both backends follow this rule.

Scores are soft-capped first when ``softcap`` is given. With ``sinks`` (a per-head virtual key, as in attention) the
sink joins every softmax and counts as kept: ``m_i = (Σ_{j in top-k} e_j + e_sink) / D_all``, since a sink is never
pruned; the sink logits then get a gradient too.

Two backends, picked by the same policy as attention (``sparse_attention.ops.attention.pick_backend``): the reference
here (plain PyTorch autograd, float32 inside, float64 for float64 inputs; it materialises the ``[B, Hq, Lq, Lk]``
scores, fine for short rows) and the fused Triton kernels of ``sparse_attention.kernels.regularizer`` (never write the
score matrix; CUDA, or CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import pick_backend
from .contract import AttentionCall, check_choice, check_int, prepare_call
from .reference import grouped_scores, kth_largest_visible, soft_cap

KINDS = ("logmass", "mass")


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


def prepare(query, key, k, *, scale=None, softcap=None, causal=True, q_offset=None, attn_mask=None, sinks=None,
            kind="logmass") -> AttentionCall:  # fmt: skip
    """Check a regularizer call; the attention contract covers query, key, mask and options (the key stands in for
    the value, which the regularizer does not have)."""
    check_int("k", k)
    check_choice("kind", kind, KINDS)
    return prepare_call(
        query, key, key, None, scale=scale, softcap=softcap, causal=causal, q_offset=q_offset, attn_mask=attn_mask,
        sinks=sinks,
    )  # fmt: skip


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
    s = soft_cap(grouped_scores(q, key, call.scale, dtype), call.softcap)  # [B, Hq, Lq, Lk]
    vis = call.visibility(0, lq).expand(b, hq, lq, lk)
    regularized = vis.sum(-1) > k  # [B, Hq, Lq]
    with torch.no_grad():
        log_weight = topk_weights(s, vis, k).log()
    # Rows that are not regularized see every key, so that their (discarded) log-sum-exps and gradients stay finite.
    s = s.masked_fill(~(vis | ~regularized[..., None]), float("-inf"))
    log_weight = log_weight.masked_fill(~regularized[..., None], 0.0)
    lse_all = torch.logsumexp(s, -1)
    lse_top = torch.logsumexp(s + log_weight, -1)
    if call.sinks is not None:
        sink = call.sinks.to(dtype)[None, :, None].expand_as(lse_all)
        lse_all = torch.logaddexp(lse_all, sink)
        lse_top = torch.logaddexp(lse_top, sink)
    log_mass = lse_top - lse_all
    per_row = -log_mass if kind == "logmass" else 1.0 - torch.exp(log_mass)
    zero = torch.zeros((), dtype=dtype, device=q.device)
    return RegularizerTerms(
        loss_sum=torch.where(regularized, per_row, zero).sum(),
        mass_sum=torch.where(regularized, torch.exp(log_mass.detach()), zero).sum(),
        rows=regularized.sum().to(dtype),
    )


def fused_terms(call: AttentionCall, k: int, kind: str) -> RegularizerTerms:
    """The regularizer of a prepared call on the fused Triton kernels."""
    from ..kernels.regularizer import TopkRegularizerFunction

    padding = None if call.key_padding is None else call.key_padding.as_tuple()
    loss_sum, mass_sum, rows = TopkRegularizerFunction.apply(
        call.query, call.key, call.sinks, call.attn_mask, padding, k, call.scale, call.softcap, call.causal,
        call.q_offset, kind,
    )  # fmt: skip
    return RegularizerTerms(loss_sum=loss_sum, mass_sum=mass_sum, rows=rows)


def terms(call: AttentionCall, k: int, kind: str, backend: str = "auto") -> RegularizerTerms:
    """The regularizer terms of a prepared call on the backend the policy picks."""
    if pick_backend(backend, "regularizer", call.query, call.key, k=k) == "triton":
        return fused_terms(call, k, kind)
    return reference_terms(call, k, kind)


def regularizer_terms(
    query: torch.Tensor,
    key: torch.Tensor,
    k: int,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    causal: bool = True,
    q_offset: int | None = None,
    attn_mask: torch.Tensor | None = None,
    sinks=None,
    kind: str = "logmass",
    backend: str = "auto",
) -> RegularizerTerms:
    """Like :func:`topk_regularizer`, but returns the sums and the row count (:class:`RegularizerTerms`), so that
    the terms of several calls can be combined into one mean over all their rows."""
    call = prepare(
        query, key, k, scale=scale, softcap=softcap, causal=causal, q_offset=q_offset, attn_mask=attn_mask,
        sinks=sinks, kind=kind,
    )  # fmt: skip
    return terms(call, k, kind, backend)


def topk_regularizer(
    query: torch.Tensor,
    key: torch.Tensor,
    k: int,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    causal: bool = True,
    q_offset: int | None = None,
    attn_mask: torch.Tensor | None = None,
    sinks=None,
    kind: str = "logmass",
    backend: str = "auto",
) -> torch.Tensor:
    """Attention-condensation loss: how much softmax mass each attention row puts outside its top k keys.

    Args:
        query: ``[B, Hq, Lq, D]``.
        key: ``[B, Hkv, Lk, D]`` with ``Hq`` a multiple of ``Hkv`` (query head h reads kv head ``h // (Hq/Hkv)``).
        k: top-k size, an int >= 1. Rows with at most k visible keys are not regularized.
        scale: score scale, a positive float, default ``D ** -0.5``.
        softcap: with ``c > 0`` the scores are ``c · tanh(s / c)`` (as the model's attention computes them).
        causal: row i sees key j only when ``j <= q_offset + i`` (default True).
        q_offset: position of query row 0 among the keys, default ``Lk - Lq`` (bottom-right alignment).
        attn_mask: boolean mask, True = attend, broadcastable to ``[B, Hq, Lq, Lk]``; combined with ``causal``.
        sinks: float ``[Hq]`` sink logits (they join every softmax and count as kept; differentiable).
        kind: ``"logmass"`` (default): mean of ``-log m_i``; ``"mass"``: mean of ``1 - m_i``, with ``m_i`` the
            softmax mass of the row's k largest visible scores (ties share the remaining top-k slots equally).
        backend: ``"auto"`` (the policy of ``sparse_attention.top_theta_attention``: the fused kernels for CUDA
            tensors they support, the reference otherwise, with a warning on CUDA), ``"reference"`` or ``"triton"``.

    Returns:
        A scalar tensor, float32 (float64 for float64 inputs): the mean over every row with more than k visible keys,
        across batch and heads. Differentiable with respect to query, key (and sinks). 0, with zero gradients, when no
        row has more than k visible keys.

    Raises:
        TypeError / ValueError naming the argument (as ``sparse_attention.top_theta_attention``), for ``k`` and
        ``kind``; and ``ValueError`` when ``backend="triton"`` cannot run the call.
    """
    return regularizer_terms(
        query,
        key,
        k,
        scale=scale,
        softcap=softcap,
        causal=causal,
        q_offset=q_offset,
        attn_mask=attn_mask,
        sinks=sinks,
        kind=kind,
        backend=backend,
    ).loss
