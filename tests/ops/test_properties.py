"""Property-based tests of the attention contract against the project's float64 oracle (hypothesis, derandomised).

Cases are drawn over shapes (B, GQA head groups, Lq/Lk including Lk = 0, Lq = 1 and odd lengths, D and Dv), float32
and float16, causal and not with any ``q_offset``, masks (none, key padding, general, with fully masked rows),
threshold tables (scalar, per head, per row length, with ±inf entries), ``k_dense``, both placements, every ``sdc``
mode including ``"calibrated"``, ``sdc_scale``, ``cap``, ``vmc``, ``softcap``, sinks, and degenerate rows and inputs
(NaN queries or keys, no keys, rows that see or keep nothing, rows too short to prune, scores offset by 1024). Each
property test runs every scenario of :data:`SCENARIOS` with an equal share of the cases.

:func:`check_case` is the one checker, a plain function: the property tests call it on generated cases, and the
mutation self-check (``test_the_checker_catches_planted_bugs``) plants bugs in the reference and asserts that it
fails for each of them.

What is compared, per case (``sparse_attention.top_theta_attention`` against ``sa_testing.oracle_top_theta``):

- visible counts exactly, kept counts exactly (rows the oracle marks NaN excepted), kept V rows of decode calls
  exactly (cases without NaN);
- NaN in, NaN out: a row is NaN (in every column) exactly where it reads a NaN query or a NaN visible key;
- every other row within the written tolerance rule: at most twice the error PyTorch's own dense SDPA makes on the
  same inputs in the same precision against float64, plus 4 units in the last place (``sa_testing.tolerance``).

Threshold ties: cases with exact scores (integer queries and keys, a power-of-two scale: every score is the same in
float32 and float64) take thresholds from a grid of halves that the scores hit, so ``s > θ`` is tested at the tie.
Other cases (Gaussian data, any scale, softcap; and placement "post", whose probabilities are never exact) are used
only where every visible score (log-probability for "post") is a clear margin away from its row's threshold
(:func:`near_a_tie`): within rounding of θ the float32 backends and the float64 oracle may disagree on the keep
decision, and that is not a bug.

The kernel part (``backend="triton"``: under the interpreter on CPU, on the device with a GPU) draws fewer,
kernel-sized cases (head dims 16 and 32, float32 and float16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from sa_testing import oracle_top_theta, tolerance

import sparse_attention
from sparse_attention.ops import reference

# Cases per run: a few hundred on the reference, a few dozen on the kernels (CI-sized).
REFERENCE_EXAMPLES = 300
KERNEL_EXAMPLES = 30
# Planted bugs are searched for with at most this many cases each.
MUTATION_EXAMPLES = 300
# Away from ties, a score (log-probability for "post") must be this far from its threshold to be compared.
MARGIN = 1e-3

# Threshold grids: halves (hit exactly by integer scores with scales 1, 0.5 and 0.25), probabilities for "post".
PRE_GRID = [-3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
POST_GRID = [-1.0, 0.0, 1e-3, 0.02, 0.05, 0.1, 0.2, 0.35, 0.6, 1.0]
INF = float("inf")


@dataclass
class Case:
    """One attention call: tensors, keyword arguments of ``top_theta_attention`` and how the data was drawn."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict = field(default_factory=dict)
    exact_scores: bool = False  # integer q and k with a power-of-two scale: every score is exact

    def __repr__(self) -> str:
        b, hq, lq, d = self.q.shape
        hkv, lk, dv = self.k.shape[1], self.k.shape[2], self.v.shape[3]
        parts = [f"B{b}-Hq{hq}-Hkv{hkv}-Lq{lq}-Lk{lk}-D{d}-Dv{dv}-{str(self.q.dtype)[6:]}"]
        parts.append("exact" if self.exact_scores else "gaussian")
        for name, value in self.kwargs.items():
            if isinstance(value, torch.Tensor):
                value = f"tensor{list(value.shape)}" if value.numel() > 4 else value.tolist()
            parts.append(f"{name}={value}")
        nan = [name for name, t in (("q", self.q), ("k", self.k)) if bool(torch.isnan(t).any())]
        if nan:
            parts.append(f"NaN in {'+'.join(nan)}")
        return "Case(" + ", ".join(parts) + ")"


# ---- the strategy -------------------------------------------------------------------------------------------------
# Every choice is made from booleans. Hypothesis draws integers (and so sampled_from indices) partly from constants it
# finds in the modules loaded so far, which differ between a full test run and a single file; booleans never come
# from there, so a derandomised run tests the same cases whatever else was imported. Shrinking goes to the first option.


def _pick(draw, options):
    """One of ``options`` (a sequence), from booleans; shrinks towards ``options[0]``."""
    n = len(options)
    bits = max(1, (n - 1).bit_length())
    i = 0
    for _ in range(bits):
        i = 2 * i + int(draw(st.booleans()))
    return options[(i * n) >> bits]


def _int(draw, lo: int, hi: int) -> int:
    return _pick(draw, range(lo, hi + 1))


def _table_values(draw, shape, grid, *, infinite: bool):
    """Values from ``grid`` (or, for ``grid=None``, non-negative masses); with ``infinite``, often some ±inf entries,
    and sometimes all of one sign (every key kept, or none)."""
    n = math.prod(shape)
    if grid is None:
        values = [_pick(draw, [0.0, 0.25, 1.0, 2.5, 6.0]) for _ in range(n)]
        return torch.tensor(values, dtype=torch.float32).reshape(shape)
    values = [_pick(draw, grid) for _ in range(n)]
    kind = _pick(draw, ["finite", "some", "some", "all"]) if infinite else "finite"
    if kind == "all":
        values = [_pick(draw, [INF, -INF])] * n
    elif kind == "some":
        for _ in range(_int(draw, 1, max(1, n // 2))):
            values[_int(draw, 0, n - 1)] = _pick(draw, [INF, -INF])
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def _table(draw, hq: int, lk: int, grid, *, infinite: bool = True, scale: float = 1.0):
    """A per-head, per-row-length table in one of the accepted forms: scalar, [Hq], [1, T] or [Hq, T]."""
    form = _pick(draw, ["scalar", "heads", "row", "full", "full"])
    # Tables as long as the rows are common (every row length has its own entry), shorter ones clamp.
    t_len = _pick(draw, [lk, lk + 1, None])
    t_len = max(1, t_len if t_len is not None else _int(draw, 1, lk + 2))
    shape = {"scalar": (), "heads": (hq,), "row": (1, t_len), "full": (hq, t_len)}[form]
    values = _table_values(draw, shape, grid, infinite=infinite) * scale
    return values.item() if form == "scalar" and draw(st.booleans()) else values


def _mask(draw, gen, b: int, hq: int, lq: int, lk: int, *, rows: bool = False):
    kind = "rows" if rows else _pick(draw, ["none", "none", "padding", "general", "rows"])
    if kind == "none":
        return None
    if kind == "padding":
        # A mask over keys only, [B, 1, 1, Lk] (it becomes a key padding), sometimes a batch with no key at all.
        keys = torch.rand(b, lk, generator=gen) < _pick(draw, [0.5, 0.8, 1.0])
        if draw(st.booleans()) and b > 1:
            keys[0] = False
        return keys[:, None, None, :]
    shape = _pick(draw, [(lq, lk), (b, 1, lq, lk), (1, hq, lq, lk), (b, hq, lq, lk)])
    mask = torch.rand(shape, generator=gen) < _pick(draw, [0.3, 0.7, 0.95])
    if kind == "rows":
        empty = torch.rand(shape[:-1], generator=gen) < 0.4
        mask = mask & ~empty[..., None]  # fully masked rows
    return mask


# Each property test runs every scenario, so that no kind of case depends on the luck of one derandomised sequence.
SCENARIOS = ("dense", "ties", "pre", "post", "nothing-kept", "degenerate")
# Degenerate rows and inputs; the "degenerate" scenario forces one of them.
ODDITIES = (
    "nan-query", "nan-key", "no-keys", "masked-rows", "keeps-everything", "short-rows", "offset-before-keys",
    "large-scores",
)  # fmt: skip


@st.composite
def cases(draw, *, kernel: bool = False, scenario: str | None = None) -> Case:
    """An attention call for the reference (or, with ``kernel``, kernel-sized for the Triton kernels).

    ``scenario`` (one of :data:`SCENARIOS`; drawn when ``None``): ``"dense"`` has no threshold, ``"ties"`` integer
    scores with thresholds on their grid (placement "pre"), ``"pre"`` Gaussian scores and placement "pre", ``"post"``
    placement "post", ``"nothing-kept"`` θ = +inf in either placement (every sdc mode, often a NaN query or key),
    ``"degenerate"`` one of :data:`ODDITIES`. Everything else is drawn in every scenario.
    """
    scenario = scenario or _pick(draw, SCENARIOS)
    odd = _pick(draw, ODDITIES) if scenario == "degenerate" else None
    if scenario == "nothing-kept" and draw(st.booleans()):
        odd = _pick(draw, ["nan-query", "nan-key"])
    b = _int(draw, 1, 2)
    hkv = _int(draw, 1, 2)
    hq = hkv * _pick(draw, [1, 2, 3])
    if kernel:
        lq = _pick(draw, [1, 1, 2, 4, 5, 9, 33])
        lk = _pick(draw, [1, 3, 7, 16, 17, 40])
        d = _pick(draw, [16, 32])
        dv = _pick(draw, [d, 16, 32])
    else:
        lq = _pick(draw, [1, 1, 2, 3, 5, 8])
        lk = _int(draw, 1, 12)
        d = _pick(draw, [1, 3, 8, 16])
        dv = _pick(draw, [d, d, 2, 5])
    if odd == "no-keys":
        lk = 0
    dtype = _pick(draw, [torch.float32, torch.float16])
    gen = torch.Generator().manual_seed(_int(draw, 0, 2**31 - 1))
    exact = scenario == "ties" or (scenario != "pre" and draw(st.booleans()))
    kw: dict = {}
    if exact:
        q = torch.randint(-2, 3, (b, hq, lq, d), generator=gen).float()
        k = torch.randint(-2, 3, (b, hkv, lk, d), generator=gen).float()
        kw["scale"] = _pick(draw, [1.0, 0.5, 0.25])
        spread = 1.0
    else:
        spread = _pick(draw, [0.5, 1.0, 3.0])
        q = torch.randn(b, hq, lq, d, generator=gen) * spread
        k = torch.randn(b, hkv, lk, d, generator=gen)
        if draw(st.booleans()):
            kw["scale"] = _pick(draw, [0.1, 0.3, 1.0])
        if draw(st.booleans()):
            kw["softcap"] = _pick(draw, [1.0, 2.5, 10.0])
    if odd == "large-scores":  # a common score offset of 1024 · scale (issue D7: precision must not depend on it)
        q[..., 0], k[..., 0] = 32.0, 32.0
    v = torch.randn(b, hkv, lk, dv, generator=gen)
    if odd in ("nan-query", "nan-key"):  # NaN in, NaN out
        target = k if odd == "nan-key" and k.numel() else q
        target.view(-1)[torch.randint(target.numel(), (1,), generator=gen)] = float("nan")
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)

    kw["causal"] = draw(st.booleans()) or odd == "offset-before-keys"
    if odd == "offset-before-keys":
        kw["q_offset"] = -_int(draw, 1, lq)  # the first rows see no key
    elif draw(st.booleans()):
        kw["q_offset"] = _int(draw, -2, lk + 2)
    mask = _mask(draw, gen, b, hq, lq, lk, rows=odd == "masked-rows")
    if mask is not None:
        kw["attn_mask"] = mask
    if draw(st.booleans()):
        sinks = torch.randn(hq, generator=gen) * 1.5
        kw["sinks"] = sinks.tolist() if draw(st.booleans()) else sinks

    placement = {"dense": None, "ties": "pre", "pre": "pre", "post": "post"}.get(scenario)
    if scenario in ("nothing-kept", "degenerate"):
        placement = _pick(draw, ["pre", "pre", "post", None if scenario == "degenerate" else "pre"])
    if placement is not None:
        kw["placement"] = placement
        grid = PRE_GRID if placement == "pre" else POST_GRID
        scale = 1.0 if exact or placement == "post" else spread
        kw["theta"] = _table(draw, hq, lk, grid, infinite=scenario != "ties", scale=scale)
        if scenario == "nothing-kept":
            kw["theta"] = _pick(draw, [INF, torch.full((hq, max(1, lk)), INF)])
        elif odd == "keeps-everything":
            kw["theta"] = _pick(draw, [-INF, 0.0 if placement == "post" else -INF])
        if placement == "pre":
            sdc = _pick(draw, ["exact", "none", "threshold", "calibrated"])
            kw["sdc"] = sdc
            if sdc == "calibrated":
                kw["sdc_table"] = _table(draw, hq, lk, None, infinite=False)
            kw["sdc_scale"] = _pick(draw, [1.0, 0.0, 0.5, 2.0])
        kw["k_dense"] = lk + _int(draw, 0, 1) if odd == "short-rows" else _pick(draw, [0, 0, 1, 2, 4])
        if draw(st.booleans()):
            kw["cap"] = _int(draw, 1, 4)
    kw["vmc"] = draw(st.booleans())
    return Case(q, k, v, kw, exact_scores=exact)


# ---- the checker --------------------------------------------------------------------------------------------------


def _scores64(case: Case) -> torch.Tensor:
    """Float64 scores ``[B, Hq, Lq, Lk]`` (soft-capped) as the oracle computes them."""
    q, k = case.q.double(), case.k.double()
    hq, hkv = q.shape[1], k.shape[1]
    scale = case.kwargs.get("scale", q.shape[-1] ** -0.5)
    s = scale * q @ k.repeat_interleave(hq // hkv, 1).transpose(-1, -2)
    cap = case.kwargs.get("softcap")
    return cap * torch.tanh(s / cap) if cap else s


def _visibility(case: Case) -> torch.Tensor:
    b, hq, lq, _ = case.q.shape
    lk = case.k.shape[2]
    vis = torch.ones(b, hq, lq, lk, dtype=torch.bool)
    if case.kwargs.get("causal", True):
        offset = case.kwargs.get("q_offset")
        offset = lk - lq if offset is None else offset
        vis &= torch.arange(lk)[None, :] <= (torch.arange(lq)[:, None] + offset)
    mask = case.kwargs.get("attn_mask")
    if mask is not None:
        vis &= mask.expand(b, hq, lq, lk)
    return vis


def _row_thresholds(case: Case, n: torch.Tensor) -> torch.Tensor:
    hq = case.q.shape[1]
    t = torch.as_tensor(case.kwargs["theta"], dtype=torch.float32).double()
    t = t.reshape(1, 1) if t.dim() == 0 else (t[:, None] if t.dim() == 1 else t)
    t = t.expand(hq, t.shape[1])
    idx = (n.clamp(1, t.shape[1]) - 1).long()
    return t[torch.arange(hq)[None, :, None], idx]


def near_a_tie(case: Case, margin: float = MARGIN) -> bool:
    """Whether a keep decision of this case is within rounding of its threshold (so float32 backends and the float64
    oracle may legitimately disagree). Exact ties of exact scores (placement "pre") are not: they are tested."""
    theta = case.kwargs.get("theta")
    if theta is None or case.k.shape[2] == 0:
        return False
    placement = case.kwargs.get("placement", "pre")
    if case.exact_scores and placement == "pre":
        return False
    vis = _visibility(case)
    n = vis.sum(-1)
    th = _row_thresholds(case, n)[..., None]
    s = _scores64(case)
    prunable = (n > case.kwargs.get("k_dense", 0))[..., None] & vis
    if placement == "pre":
        gap = (s - th).abs()
    else:
        sinks = case.kwargs.get("sinks")
        logits = s.masked_fill(~vis, -INF)
        if sinks is not None:
            sink = torch.as_tensor(sinks, dtype=torch.float64).expand(s.shape[1])[None, :, None, None]
            logits = torch.cat([logits, sink.expand(*s.shape[:3], 1)], -1)
        log_p = torch.log_softmax(logits, -1)[..., : s.shape[-1]]
        with torch.no_grad():
            gap = (log_p - torch.log(th.clamp_min(0.0))).abs()
        gap = torch.where(th > 0, gap, torch.full_like(gap, INF))  # θ <= 0 keeps every key exactly
    close = prunable & torch.isfinite(th) & (gap < margin * th.abs().clamp_min(1.0))
    return bool(close[~torch.isnan(gap)].any())


def check_case(case: Case, backend: str = "reference") -> None:
    """Assert that ``top_theta_attention(..., backend)`` meets the contract on ``case`` (see the module doc)."""
    q, k, v = case.q, case.k, case.v
    out, stats = sparse_attention.top_theta_attention(q, k, v, **case.kwargs, backend=backend, return_stats=True)
    out64, kept64, visible64, kept_v64 = oracle_top_theta(q, k, v, **case.kwargs)
    b, hq, lq, _ = q.shape
    assert out.shape == (b, hq, lq, v.shape[-1]) and out.dtype == q.dtype, f"{case}: output {out.shape} {out.dtype}"
    out = out.detach().cpu()
    assert torch.equal(stats.visible.cpu().long(), visible64), f"{case}: visible counts differ"

    nan_rows = kept64 == -1
    got_nan = torch.isnan(out).any(-1)
    assert torch.equal(got_nan, nan_rows), f"{case}: NaN rows {got_nan.nonzero().tolist()} != {nan_rows.nonzero()}"
    assert bool(torch.isnan(out[nan_rows]).all()), f"{case}: a NaN row is NaN in some columns only"
    kept = stats.kept.cpu().long()
    assert torch.equal(kept[~nan_rows], kept64[~nan_rows]), (
        f"{case}: kept counts differ at rows {(kept != kept64).logical_and(~nan_rows).nonzero().tolist()[:6]}"
    )
    if lq == 1 and not bool(nan_rows.any()):
        assert stats.kept_v_rows is not None, f"{case}: decode call without kept_v_rows"
        assert torch.equal(stats.kept_v_rows.cpu().long(), kept_v64), f"{case}: kept V rows differ"

    good = ~nan_rows
    if not bool(good.any()):
        return
    err = float((out.double() - out64)[good].abs().max())
    magnitude = float(out64[good].abs().max())
    clean = [torch.nan_to_num(t) for t in (q, k, v)]
    if k.shape[2] == 0:
        tol = 4.0 * torch.finfo(q.dtype).eps * max(1.0, magnitude)
    else:
        kw = case.kwargs
        tol = tolerance(
            *clean, kw.get("attn_mask"), scale=kw.get("scale"), causal=kw.get("causal", True),
            q_offset=kw.get("q_offset"), magnitude=magnitude,
        )  # fmt: skip
    assert err <= tol, f"{case}: max abs error {err:.3e} exceeds the tolerance {tol:.3e}"


# ---- the property tests -------------------------------------------------------------------------------------------

SETTINGS = dict(derandomize=True, deadline=None, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_reference_meets_the_contract(scenario):
    @settings(max_examples=REFERENCE_EXAMPLES // len(SCENARIOS), **SETTINGS)
    @given(case=cases(scenario=scenario))
    def run(case):
        assume(not near_a_tie(case))
        check_case(case, "reference")

    run()


def _to(case: Case, device: str) -> Case:
    moved = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in case.kwargs.items()}
    return replace(case, q=case.q.to(device), k=case.k.to(device), v=case.v.to(device), kwargs=moved)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_kernels_meet_the_contract(scenario):
    # On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py); float32 and float16 only (DESIGN.md).
    device = "cuda" if torch.cuda.is_available() else "cpu"

    @settings(max_examples=KERNEL_EXAMPLES // len(SCENARIOS), **SETTINGS)
    @given(case=cases(kernel=True, scenario=scenario))
    def run(case):
        assume(not near_a_tie(case))
        check_case(_to(case, device), "triton")

    run()


def test_exact_ties_are_drawn():
    """The "ties" scenario does produce rows where a visible score equals its threshold (else ">" vs ">=" would go
    untested)."""
    seen = []

    @settings(max_examples=REFERENCE_EXAMPLES // len(SCENARIOS), phases=[Phase.generate], **SETTINGS)
    @given(case=cases(scenario="ties"))
    def count(case):
        if torch.isnan(case.q).any() or torch.isnan(case.k).any():
            return
        vis = _visibility(case)
        th = _row_thresholds(case, vis.sum(-1))[..., None]
        seen.append(bool(((_scores64(case) == th) & vis).any()))

    count()
    assert sum(seen) >= len(seen) // 4, f"only {sum(seen)} of {len(seen)} cases of the ties scenario have a tie"


# ---- the mutation self-check: planted bugs in the reference must be caught ----------------------------------------


def _threshold_at_or_above(call, state):
    """Planted bug: keep ``s >= θ`` instead of ``s > θ`` (θ one float32 step lower makes ">" act as ">=")."""
    if call.theta is None or call.placement != "pre":
        return reference.threshold_rule(call, state)
    lower = torch.nextafter(call.theta, torch.full_like(call.theta, -INF))
    return reference.threshold_rule(replace(call, theta=lower), state)


def _cap_keeps_the_oldest(call, state):
    """Planted bug: ``cap`` keeps the first kept keys instead of the most recent ones."""
    if not call.cap:
        return reference.threshold_rule(call, state)
    keep, prunable, th = reference.threshold_rule(replace(call, cap=0), state)
    from_left = keep.cumsum(-1, dtype=torch.int32)
    return keep & ((from_left <= call.cap) | ~prunable[..., None]), prunable, th


def _lookup_at_n(table, n):
    """Planted bug: look the table up at index n instead of n - 1."""
    idx = n.clamp(0, table.shape[1] - 1).long()
    return table[torch.arange(table.shape[0], device=n.device)[None, :, None], idx]


def _gqa_modulo(call):
    """Planted bug: query head h reads kv head ``h % Hkv`` instead of ``h // G``."""
    key, value = call.key.repeat(1, call.groups, 1, 1), call.value.repeat(1, call.groups, 1, 1)
    return reference.attend(replace(call, key=key, value=value))


MUTATIONS = {
    "drops-the-sink": (lambda call: reference.attend(replace(call, sinks=None)), None),
    "keeps-at-the-threshold": (lambda call: reference.attend(call, _threshold_at_or_above), None),
    "forgets-sdc-scale": (lambda call: reference.attend(replace(call, sdc_scale=1.0)), None),
    "looks-up-at-n": (None, _lookup_at_n),
    "caps-the-oldest": (lambda call: reference.attend(call, _cap_keeps_the_oldest), None),
    "prunes-at-k-dense": (lambda call: reference.attend(replace(call, k_dense=max(0, call.k_dense - 1))), None),
    "shifts-the-diagonal": (lambda call: reference.attend(replace(call, q_offset=call.q_offset + 1)), None),
    "gqa-modulo": (_gqa_modulo, None),
    "ignores-softcap": (lambda call: reference.attend(replace(call, softcap=0.0)), None),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_the_checker_catches_planted_bugs(name, monkeypatch):
    attention, lookup = MUTATIONS[name]
    if attention is not None:
        monkeypatch.setattr(reference, "attention", attention)
    if lookup is not None:
        monkeypatch.setattr(reference, "lookup", lookup)

    seen = []

    @settings(max_examples=MUTATION_EXAMPLES, phases=[Phase.generate], report_multiple_bugs=False, **SETTINGS)
    @given(case=cases())
    def run(case):
        assume(not near_a_tie(case))
        seen.append(case)
        check_case(case, "reference")

    with pytest.raises(AssertionError):
        run()
    # The case that caught the bug is one the real reference passes: the failure was the planted bug's.
    monkeypatch.undo()
    check_case(seen[-1], "reference")
