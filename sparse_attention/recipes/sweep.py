"""What pruning costs and what it saves, over k: the sweep behind ``sparse-attention sweep``.

For each checkpoint and each k, every method is calibrated (Top-θ methods, on the calibration windows) and measured on
the held-out windows: perplexity and next-token accuracy, the kept attention-element fraction in prefill and the kept
V-row fraction while generating, in the pruned layers and over all layers. The methods:

===========================  ==========================================================================
``dense``                    exact dense attention (once per checkpoint, ``k`` is ``None``)
``top-k``                    exact top-k in the pruned layers, softmax renormalised over the kept keys
``top-theta pre exact``      Top-θ on scores, exact softmax denominator (``sdc="exact"``)
``top-theta pre exact vmc``  the same plus V-mean compensation (calibrated with it)
``top-theta pre threshold``  Top-θ on scores, denominator compensated with ``exp(θ - m)`` per dropped key
``top-theta pre calibrated`` Top-θ on scores, denominator compensated with the calibrated dropped mass
``top-theta post vmc``       Top-θ on softmax probabilities, with V-mean compensation
===========================  ==========================================================================

Every record carries ``dense_ppl_original``, the dense perplexity of the *original* checkpoint on the same text, so
that "the same quality" means the same thing for every checkpoint: :func:`fronts` picks, per (checkpoint, method),
the least work whose perplexity is within a budget of it.

Fractions are computed from the raw kept/visible counts of :func:`~sparse_attention.collect_stats`: "pruned" over the
layers outside ``dense_layers`` (the layers Top-θ and top-k prune; for ``dense`` the same layers, which keep 1.0), "all"
over every layer. Decode counts come from greedy generation of ``new_tokens`` tokens after ``prompt_len``-token
prompts (the first of the new tokens comes from the prompt's prefill, so ``new_tokens - 1`` decode steps are counted).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Mapping, Sequence

import torch

from ..hf.backend import configure, language_model
from ..hf.calibration import calibrate
from ..hf.stats import TopKAttention, collect_stats
from ..ops.contract import DEFAULT_DENSE_LAYERS, DEFAULT_SIGMA, check_int
from .data import batches
from .evaluation import generate_continuations, lm_metrics

DEFAULT_KS: tuple[int, ...] = (2, 4, 8, 16, 32, 64)

# name -> (placement, sdc, vmc) of the Top-θ methods; "dense" and "top-k" have no calibration.
TOP_THETA_METHODS: dict[str, tuple[str, str, bool]] = {
    "top-theta pre exact": ("pre", "exact", False),
    "top-theta pre exact vmc": ("pre", "exact", True),
    "top-theta pre threshold": ("pre", "threshold", False),
    "top-theta pre calibrated": ("pre", "calibrated", False),
    "top-theta post vmc": ("post", "exact", True),
}
METHODS: tuple[str, ...] = ("dense", "top-k", *TOP_THETA_METHODS)
"""Every method the sweep knows, in the order it measures them."""

DEFAULT_BUDGET = 0.01
"""Perplexity budget of :func:`fronts`: at most 1 % above the original model's dense perplexity."""


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """The methods in :data:`METHODS` order, without repeats; ``ValueError`` naming an unknown one."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(
            f"unknown sweep method(s) {unknown or methods!r}; choose from: {', '.join(repr(m) for m in METHODS)}"
        )
    return tuple(m for m in METHODS if m in methods)


def _counts(stats, layers: Collection[int]) -> dict[str, int]:
    """Summed prefill kept/visible elements and decode kept/visible V rows over ``layers``."""
    kept = sum(int(stats.prefill_kept[i].sum()) for i in layers if i in stats.prefill_kept)
    vis = sum(int(stats.prefill_visible[i].sum()) for i in layers if i in stats.prefill_visible)
    kept_v = sum(int(stats.decode_kept_v[i]) for i in layers if i in stats.decode_kept_v)
    vis_v = sum(int(stats.decode_visible_v[i]) for i in layers if i in stats.decode_visible_v)
    return {"kept": kept, "visible": vis, "kept_v": kept_v, "visible_v": vis_v}


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@contextlib.contextmanager
def _decode_threads(model):
    """One intra-op thread for generation on CPU: a decode step's ops are too small to gain from more, and on a
    shared machine the threads' synchronisation made generation ten times slower. Restored afterwards."""
    if next(model.parameters()).device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure_setup(
    model,
    heldout: torch.Tensor,
    prompts: torch.Tensor,
    *,
    new_tokens: int,
    batch_size: int,
    pruned_layers: Collection[int],
    k: int | None = None,
) -> dict:
    """Measure the model's current attention set-up: LM metrics on ``heldout``, prefill and decode fractions.

    The model must already run ``top_theta`` (configured, or inside :class:`~sparse_attention.TopKAttention`).
    Returns the record fields of one measurement (see the module docstring).
    """
    start = time.perf_counter()
    with collect_stats(model, k=k) as pre:
        metrics = lm_metrics(model, heldout, batch_size)
    with collect_stats(model) as dec, _decode_threads(model):
        generate_continuations(model, prompts, new_tokens)
    layers = sorted(set(pre.prefill_kept) | set(dec.decode_kept_v))
    pruned = _counts(pre, [i for i in layers if i in pruned_layers])
    every = _counts(pre, layers)
    dec_pruned = _counts(dec, [i for i in layers if i in pruned_layers])
    dec_every = _counts(dec, layers)
    return {
        "ppl": metrics["perplexity"],
        "loss": metrics["loss"],
        "accuracy": metrics["accuracy"],
        "tokens": metrics["tokens"],
        "kept_element_fraction_pruned": _ratio(pruned["kept"], pruned["visible"]),
        "kept_element_fraction_all": _ratio(every["kept"], every["visible"]),
        "kept_v_fraction_pruned": _ratio(dec_pruned["kept_v"], dec_pruned["visible_v"]),
        "kept_v_fraction_all": _ratio(dec_every["kept_v"], dec_every["visible_v"]),
        "kept_per_k": pre.kept_per_k(),
        "prefill_counts_pruned": [pruned["kept"], pruned["visible"]],
        "decode_counts_pruned": [dec_pruned["kept_v"], dec_pruned["visible_v"]],
        "per_layer": {str(i): v for i, v in pre.kept_fraction_per_layer().items()},
        "decode_per_layer": {str(i): v for i, v in dec.kept_v_fraction_per_layer().items()},
        "seconds": time.perf_counter() - start,
    }


def sweep(
    models: Mapping[str, torch.nn.Module],
    heldout: torch.Tensor,
    calibration: torch.Tensor,
    *,
    original: str,
    ks: Sequence[int] = DEFAULT_KS,
    methods: Sequence[str] = METHODS,
    dense_only: Collection[str] = (),
    sigma: float = DEFAULT_SIGMA,
    dense_layers: Sequence[int] = DEFAULT_DENSE_LAYERS,
    prompt_len: int = 64,
    new_tokens: int = 32,
    num_prompts: int = 4,
    batch_size: int = 8,
    done: Sequence[dict] = (),
    on_record: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Measure every (checkpoint, method, k) on the same held-out windows; see the module docstring.

    Args:
        models: checkpoint name → model (``"shipped"``, ``"condensed"``, a control's name, ...), each a causal LM
            whose attention goes through ``AttentionInterface``. Each is measured in turn; its Top-θ configuration
            and attention implementation are restored afterwards.
        heldout: ``[N, L]`` token windows to measure on. calibration: ``[M, L']`` windows to calibrate on.
        original: the name in ``models`` whose dense perplexity is every record's ``dense_ppl_original``.
        ks: the k of top-k and of the calibrations (rows with at most k visible keys are never pruned).
        methods: a subset of :data:`METHODS`; ``"dense"`` is always measured (it anchors the fronts).
        dense_only: names of ``models`` measured with dense attention only (e.g. the original, as a reference).
        sigma, dense_layers: calibration settings (θ = mean + sigma · std; layers never pruned).
        prompt_len, new_tokens, num_prompts: the decode measurement (prompts are the first ``prompt_len`` tokens of
            the first ``num_prompts`` held-out windows).
        batch_size: windows per forward pass (perplexity and calibration).
        done: records of an earlier run with the same settings; their (checkpoint, method, k) are not measured again.
        on_record: called with the full list of records after each new one (e.g. to write them to disk).
        progress: show a progress bar.

    Returns:
        All records (``done`` first, in order), one per (checkpoint, method, k).

    Raises:
        ValueError: an unknown method, a bad k, ``original`` not among ``models``, a ``dense_only`` name not among
        them, held-out windows shorter than ``prompt_len`` or fewer than ``num_prompts``, and as
        :func:`~sparse_attention.calibrate` (e.g. no calibration row longer than k).
    """
    from tqdm.auto import tqdm

    methods = check_methods(("dense", *methods))
    ks = tuple(dict.fromkeys(check_int("k", k) for k in ks))
    if original not in models:
        raise ValueError(f"original={original!r} is not one of the checkpoints {list(models)}")
    unknown = [name for name in dense_only if name not in models]
    if unknown:
        raise ValueError(f"dense_only names {unknown} are not among the checkpoints {list(models)}")
    check_int("prompt_len", prompt_len)
    check_int("new_tokens", new_tokens)
    check_int("num_prompts", num_prompts)
    if heldout.dim() != 2 or heldout.shape[1] < prompt_len + 1 or heldout.shape[0] < num_prompts:
        raise ValueError(
            f"held-out windows of shape {tuple(heldout.shape)} cannot give {num_prompts} prompts of {prompt_len} "
            "tokens: use more or longer windows, or a smaller --prompt-len / --num-prompts"
        )
    dense_layers = tuple(sorted(int(i) for i in dense_layers))
    records = [dict(r) for r in done]
    seen = {(r["checkpoint"], r["method"], r["k"]) for r in records}
    prompts = heldout[:num_prompts, :prompt_len]
    calib_batches = batches(calibration, batch_size)

    # The original first: its dense perplexity goes into every record.
    order = [original, *[name for name in models if name != original]]
    plan = []
    for name in order:
        for method in methods if name not in dense_only else ("dense",):
            for k in (None,) if method == "dense" else ks:
                if (name, method, k) not in seen:
                    plan.append((name, method, k))
    dense_ppl = {r["checkpoint"]: r["ppl"] for r in records if r["method"] == "dense"}
    bar = tqdm(total=len(plan), desc="sweep", disable=not progress, dynamic_ncols=True)
    try:
        for name in order:
            todo = [(m, k) for n, m, k in plan if n == name]
            if todo:
                _sweep_model(
                    name, models[name], todo, heldout, prompts, calib_batches, records, dense_ppl, original=original,
                    sigma=sigma, dense_layers=dense_layers, new_tokens=new_tokens, batch_size=batch_size, bar=bar,
                    on_record=on_record,
                )  # fmt: skip
    finally:
        bar.close()
    return records


def _sweep_model(name, model, todo, heldout, prompts, calib_batches, records, dense_ppl, *, original, sigma,
                 dense_layers, new_tokens, batch_size, bar, on_record):  # fmt: skip
    _, config = language_model(model)
    saved_settings = getattr(config, "top_theta", None)
    saved_impl = getattr(config, "_attn_implementation", None)
    pruned_layers = [i for i in range(config.num_hidden_layers) if i not in dense_layers]
    thresholds: dict[tuple[int, str, bool], object] = {}
    common = dict(new_tokens=new_tokens, batch_size=batch_size, pruned_layers=pruned_layers)

    def add(method, k, rec, **extra):
        if method == "dense":
            dense_ppl[name] = rec["ppl"]
        base = dense_ppl.get(original)
        record = {
            "checkpoint": name,
            "method": method,
            "k": k,
            **extra,
            "dense_ppl_original": base,
            "ppl_vs_original": None if base is None else rec["ppl"] / base - 1.0,
            "dense_ppl": dense_ppl.get(name),
            **rec,
        }
        records.append(record)
        bar.set_postfix_str(f"{name} {method} k={k} ppl {rec['ppl']:.2f}")
        bar.update()
        if on_record is not None:
            on_record(records)

    try:
        for method, k in todo:
            if method == "dense":
                configure(model, None)
                add(method, k, measure_setup(model, heldout, prompts, **common))
            elif method == "top-k":
                configure(model, None)
                with TopKAttention(model, k, dense_layers):
                    add(method, k, measure_setup(model, heldout, prompts, k=k, **common))
            else:
                placement, sdc, vmc = TOP_THETA_METHODS[method]
                key = (k, placement, vmc)
                calib_seconds = 0.0
                if key not in thresholds:
                    start = time.perf_counter()
                    configure(model, None)
                    thresholds[key] = calibrate(
                        model, calib_batches, k=k, placement=placement, sigma=sigma, dense_layers=dense_layers,
                        vmc=vmc, progress=False,
                    )  # fmt: skip
                    calib_seconds = time.perf_counter() - start
                configure(model, thresholds[key], sdc=sdc, vmc=vmc)
                rec = measure_setup(model, heldout, prompts, k=k, **common)
                add(method, k, rec, placement=placement, sdc=sdc, vmc=vmc, calibration_seconds=calib_seconds)
    finally:
        config.top_theta = saved_settings
        if saved_impl is not None:
            model.set_attn_implementation(saved_impl)


def fronts(records: Sequence[dict], budget: float = DEFAULT_BUDGET) -> list[dict]:
    """Per (checkpoint, method): the least work measured within ``budget`` of the original's dense perplexity.

    A point qualifies when ``ppl <= (1 + budget) · dense_ppl_original``. For each (checkpoint, method) the result
    gives the qualifying record with the smallest prefill kept fraction (pruned layers) and, separately, the one with
    the smallest decode kept V-row fraction (pruned layers): their k, perplexity and fraction, or ``None`` when no
    point of that curve is within the budget. Plus ``best_ppl_increase``, the smallest measured ``ppl_vs_original``.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["checkpoint"], r["method"]), []).append(r)
    out = []
    for (name, method), rs in groups.items():
        ok = [r for r in rs if r["ppl"] <= (1.0 + budget) * r["dense_ppl_original"]]
        entry = {"checkpoint": name, "method": method, "budget": budget}
        for field, short in (("kept_element_fraction_pruned", "elements"), ("kept_v_fraction_pruned", "v_rows")):
            cands = [r for r in ok if r[field] is not None]
            best = min(cands, key=lambda r: (r[field], r["ppl"])) if cands else None
            entry[f"best_{short}"] = (
                None if best is None else {"k": best["k"], "ppl": best["ppl"], "fraction": best[field],
                                           "ppl_vs_original": best["ppl_vs_original"]}
            )  # fmt: skip
        entry["best_ppl_increase"] = min(r["ppl_vs_original"] for r in rs)
        out.append(entry)
    return out


def best_top_theta(front: Sequence[dict], checkpoint: str, what: str = "elements") -> dict | None:
    """The Top-θ method of ``checkpoint`` whose within-budget point keeps least (``what``: "elements" or "v_rows"),
    as ``{"method": ..., "k": ..., "ppl": ..., "fraction": ...}``, or ``None`` when no Top-θ point is within budget."""
    best = None
    for entry in front:
        point = entry[f"best_{what}"]
        if entry["checkpoint"] != checkpoint or entry["method"] not in TOP_THETA_METHODS or point is None:
            continue
        if best is None or point["fraction"] < best["fraction"]:
            best = {"method": entry["method"], **point}
    return best


def format_sweep(records: Sequence[dict]) -> str:
    """A fixed-width text table of sweep records."""

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    header = (
        f"{'checkpoint':<12} {'method':<25} {'k':>3} {'ppl':>9} {'Δppl%':>7} {'acc':>6} "
        f"{'kept*':>7} {'kept':>7} {'keptV*':>7} {'keptV':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        lines.append(
            f"{r['checkpoint']:<12} {r['method']:<25} {fmt(r['k'], 'd'):>3} {r['ppl']:>9.3f} "
            f"{fmt(None if r['ppl_vs_original'] is None else 100 * r['ppl_vs_original'], '+.2f'):>7} "
            f"{r['accuracy']:>6.4f} {fmt(r['kept_element_fraction_pruned'], '.4f'):>7} "
            f"{fmt(r['kept_element_fraction_all'], '.4f'):>7} {fmt(r['kept_v_fraction_pruned'], '.4f'):>7} "
            f"{fmt(r['kept_v_fraction_all'], '.4f'):>7}"
        )
    lines.append(
        "Δppl% = perplexity over the original model's dense perplexity; kept = prefill kept attention elements, "
        "keptV = decode kept V rows; * = pruned layers only."
    )
    return "\n".join(lines)


def plot_sweep(records: Sequence[dict], path, *, budget: float = DEFAULT_BUDGET, title: str | None = None) -> bool:
    """Perplexity against kept fraction, prefill elements and decode V rows side by side, one curve per
    (checkpoint, method); the original model's dense perplexity and the budget above it as lines. PNG at ``path``.
    Returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    base = next((r["dense_ppl_original"] for r in records if r["dense_ppl_original"] is not None), None)
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in records))
    methods = [m for m in METHODS if m != "dense" and any(r["method"] == m for r in records)]
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    fields = (
        ("kept_element_fraction_pruned", "kept attention-element fraction, prefill (pruned layers)"),
        ("kept_v_fraction_pruned", "kept V-row fraction, decode (pruned layers)"),
    )
    ppls = [r["ppl"] for r in records]
    top = max(ppls) if base is None else min(max(ppls), base * 1.25)
    bottom = min(ppls) if base is None else min(min(ppls), base) * 0.99
    for ax, (field, label) in zip(axes, fields, strict=True):
        for ci, name in enumerate(checkpoints):
            for mi, method in enumerate(methods):
                rs = sorted(
                    (r for r in records if r["checkpoint"] == name and r["method"] == method and r[field] is not None),
                    key=lambda r: r["k"],
                )
                if rs:
                    ax.plot(
                        [r[field] for r in rs], [min(r["ppl"], top) for r in rs], linestyle=styles[ci % len(styles)],
                        color=colors[mi % len(colors)], marker="o", markersize=3, label=f"{name}: {method}",
                    )  # fmt: skip
            dense = [r for r in records if r["checkpoint"] == name and r["method"] == "dense"]
            if dense and dense[0]["ppl"] != base:  # the original's dense line is drawn below
                ax.axhline(dense[0]["ppl"], color="gray", linestyle=styles[ci % len(styles)], linewidth=0.8,
                           label=f"{name}: dense")  # fmt: skip
        if base is not None:
            ax.axhline(base, color="black", linewidth=1.0, label="original model, dense")
            ax.axhline(base * (1 + budget), color="black", linewidth=0.8, linestyle="--",
                       label=f"original dense + {100 * budget:g} %")  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a log axis
        ax.set_ylim(bottom, top * 1.01)
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"held-out perplexity (clipped at {top:.1f})")
    axes[1].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
