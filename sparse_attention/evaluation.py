"""Quality and work measurements of dense, exact top-k and Top-θ attention on a causal language model.

The report behind ``python -m sparse_attention demo`` / ``evaluate``: held-out perplexity and next-token accuracy,
the kept attention-element fraction in prefill, the kept V-row fraction while generating, per-layer/head kept
fractions, and the kept count over k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .calibration import calibrate
from .hf import TopKAttention, collect_stats, configure, model_settings
from .thresholds import Thresholds


def token_windows(tokenizer, texts: Sequence[str], seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Tokenise ``texts`` (an end-of-text token after each) and cut non-overlapping windows ``[N, seq_len]``.

    When there are more than ``max_windows`` windows, evenly spaced ones are kept (deterministic).
    Raises ``ValueError`` when the text is too short for one window.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        # verbose=False: long documents are cut into windows below, so the max-length warning does not apply.
        ids.extend(tokenizer(text, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    windows = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    if max_windows is not None and n > max_windows:
        windows = windows[torch.linspace(0, n - 1, max_windows).round().long()]
    return windows


def _batches(windows: torch.Tensor, batch_size: int):
    return [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]


@torch.no_grad()
def lm_metrics(model, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Held-out next-token loss, perplexity and accuracy over ``windows [N, L]``."""
    device = next(model.parameters()).device
    total_loss, correct, count = 0.0, 0, 0
    for batch in _batches(windows, batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        total_loss += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
        count += target.numel()
    loss = total_loss / count
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / count, "tokens": count}


@torch.no_grad()
def generate_continuations(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuations of ``prompts [N, P]`` with the KV cache (decode steps have ``Lq == 1``)."""
    device = next(model.parameters()).device
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    return model.generate(
        input_ids=prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
    )  # fmt: skip


def measure(model, heldout: torch.Tensor, *, k: int | None, prompts: torch.Tensor, new_tokens: int, batch_size: int):
    """LM metrics plus work statistics of the model's current attention set-up."""
    with collect_stats(model, k=k) as stats:
        metrics = lm_metrics(model, heldout, batch_size)
    with collect_stats(model) as dec:
        generate_continuations(model, prompts, new_tokens)
    report = stats.report()
    return {
        **metrics,
        "kept_fraction": report["kept_fraction"],
        "kept_fraction_pruned_layers": report["kept_fraction_pruned_layers"],
        "kept_v_fraction": dec.kept_v_fraction(),
        "kept_v_fraction_pruned_layers": dec.kept_v_fraction(include_dense=False),
        "kept_per_k": report["kept_per_k"],
        "per_layer": report["per_layer"],
        "per_head": report["per_head"],
    }


def compare(
    model,
    heldout: torch.Tensor,
    calibration: torch.Tensor,
    *,
    ks: Sequence[int] = (8, 16, 32),
    placement: str = "pre",
    sdc: str = "exact",
    vmc: bool = False,
    sigma: float = 0.1,
    dense_layers: Sequence[int] = (0, 1),
    prompt_len: int = 64,
    new_tokens: int = 32,
    num_prompts: int = 4,
    batch_size: int = 8,
    progress: bool = True,
    thresholds: dict[int, Thresholds] | None = None,
) -> list[dict]:
    """Dense, exact top-k and Top-θ (calibrated on ``calibration`` windows) for each k, measured on ``heldout``.

    Returns one record per (method, k). The model's own Top-θ configuration is restored afterwards.
    """
    from tqdm.auto import tqdm

    saved = getattr(model.config, "top_theta", None)
    prompts = heldout[:num_prompts, :prompt_len]
    calib_batches = _batches(calibration, batch_size)
    records = []
    steps = tqdm(total=1 + 2 * len(ks), desc="evaluating", disable=not progress)
    try:
        configure(model, None)
        rec = measure(model, heldout, k=None, prompts=prompts, new_tokens=new_tokens, batch_size=batch_size)
        records.append({"method": "dense", "k": None, **rec})
        steps.update()
        for k in ks:
            with TopKAttention(model, k, dense_layers):
                rec = measure(model, heldout, k=k, prompts=prompts, new_tokens=new_tokens, batch_size=batch_size)
            records.append({"method": "top-k", "k": k, **rec})
            steps.update()
            th = (thresholds or {}).get(k)
            if th is None:
                th = calibrate(
                    model, calib_batches, k=k, placement=placement, sigma=sigma, dense_layers=dense_layers,
                    progress=False,
                )  # fmt: skip
            configure(model, th, sdc=sdc, vmc=vmc)
            rec = measure(model, heldout, k=k, prompts=prompts, new_tokens=new_tokens, batch_size=batch_size)
            records.append({"method": "top-theta", "k": k, "placement": placement, "sdc": sdc, "vmc": vmc, **rec})
            steps.update()
    finally:
        steps.close()
        model.config.top_theta = saved
    return records


def evaluate_configured(model, heldout: torch.Tensor, *, prompt_len=64, new_tokens=32, num_prompts=4, batch_size=8):
    """Measure a model as configured (``config.top_theta``) next to dense attention: two records."""
    settings = model_settings(model.config)
    if settings is None or settings.thresholds is None:
        raise ValueError("the model has no Top-θ thresholds configured: pass --thresholds or calibrate first")
    prompts = heldout[:num_prompts, :prompt_len]
    k = settings.thresholds.k
    rec = measure(model, heldout, k=k, prompts=prompts, new_tokens=new_tokens, batch_size=batch_size)
    saved = model.config.top_theta
    try:
        model.config.top_theta = None
        dense = measure(model, heldout, k=None, prompts=prompts, new_tokens=new_tokens, batch_size=batch_size)
    finally:
        model.config.top_theta = saved
    return [
        {"method": "dense", "k": None, **dense},
        {"method": "top-theta", "k": k, "placement": settings.thresholds.placement, "sdc": settings.sdc,
         "vmc": settings.vmc, **rec},
    ]  # fmt: skip


def format_table(records: list[dict]) -> str:
    """A fixed-width text table of the records."""

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    names = ("kept", "kept*", "keptV", "keptV*", "kept/k")
    header = f"{'method':<10} {'k':>4} {'ppl':>9} {'acc':>7} " + " ".join(f"{n:>7}" for n in names)
    lines = [header, "-" * len(header)]
    for r in records:
        lines.append(
            f"{r['method']:<10} {fmt(r['k'], 'd'):>4} {r['perplexity']:>9.3f} {r['accuracy']:>7.4f} "
            f"{fmt(r['kept_fraction'], '.4f'):>7} {fmt(r['kept_fraction_pruned_layers'], '.4f'):>7} "
            f"{fmt(r['kept_v_fraction'], '.4f'):>7} {fmt(r['kept_v_fraction_pruned_layers'], '.4f'):>7} "
            f"{fmt(r['kept_per_k'], '.3f'):>7}"
        )
    lines.append("kept = prefill kept attention-element fraction (all layers), * = pruned layers only;")
    lines.append(
        "keptV = kept V-row fraction over generated decode steps; kept/k = kept count of rows longer than k / k."
    )
    return "\n".join(lines)


def plot(records: list[dict], path) -> bool:
    """Draw perplexity against kept fraction (PNG). Returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = [r for r in records if r["method"] == "dense"]
    for method, marker in (("top-k", "s"), ("top-theta", "o")):
        rs = [r for r in records if r["method"] == method]
        if rs:
            xs = [r["kept_fraction_pruned_layers"] for r in rs]
            ax.plot(xs, [r["perplexity"] for r in rs], marker=marker, label=method)
            for r, x in zip(rs, xs, strict=True):
                ax.annotate(f"k={r['k']}", (x, r["perplexity"]), textcoords="offset points", xytext=(4, 4))
    if dense:
        ax.axhline(dense[0]["perplexity"], color="gray", linestyle="--", label="dense")
    ax.set_xlabel("kept attention-element fraction (pruned layers)")
    ax.set_ylabel("held-out perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
