"""Quality and work measurements of dense, exact top-k and Top-θ attention on a causal language model.

The report behind ``python -m sparse_attention demo`` / ``evaluate``: held-out perplexity and next-token accuracy,
the kept attention-element fraction in prefill, the kept V-row fraction while generating, per-layer/head kept
fractions, and the kept count over k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..hf.backend import configure, language_model, model_settings
from ..hf.calibration import calibrate
from ..hf.stats import TopKAttention, collect_stats
from ..ops.contract import DEFAULT_DENSE_LAYERS, DEFAULT_SIGMA
from ..ops.thresholds import Thresholds
from .data import batches


@torch.no_grad()
def lm_metrics(model, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Held-out next-token loss, perplexity and accuracy over ``windows [N, L]``."""
    device = next(model.parameters()).device
    total_loss, correct, count = 0.0, 0, 0
    for batch in batches(windows, batch_size):
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
    sdc_scale: float = 1.0,
    cap: int | None = None,
    vmc: bool = False,
    sigma: float = DEFAULT_SIGMA,
    dense_layers: Sequence[int] = DEFAULT_DENSE_LAYERS,
    prompt_len: int = 64,
    new_tokens: int = 32,
    num_prompts: int = 4,
    batch_size: int = 8,
    backend: str = "auto",
    progress: bool = True,
    thresholds: dict[int, Thresholds] | None = None,
) -> list[dict]:
    """Dense, exact top-k and Top-θ (calibrated on ``calibration`` windows, with the ``vmc`` it runs with) for each
    k, measured on ``heldout``; ``backend`` runs the Top-θ attention with ``sdc``, ``sdc_scale``, ``cap`` and ``vmc``.

    Returns one record per (method, k). The model's own Top-θ configuration is restored afterwards.
    """
    from tqdm.auto import tqdm

    _, config = language_model(model)
    saved = getattr(config, "top_theta", None)
    prompts = heldout[:num_prompts, :prompt_len]
    calib_batches = batches(calibration, batch_size)
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
                    vmc=vmc, progress=False,
                )  # fmt: skip
            configure(model, th, sdc=sdc, sdc_scale=sdc_scale, cap=cap, vmc=vmc, backend=backend)
            rec = measure(model, heldout, k=k, prompts=prompts, new_tokens=new_tokens, batch_size=batch_size)
            settings = {"placement": placement, "sdc": sdc, "sdc_scale": sdc_scale, "cap": cap, "vmc": vmc}
            records.append({"method": "top-theta", "k": k, **settings, **rec})
            steps.update()
    finally:
        steps.close()
        config.top_theta = saved
    return records


def evaluate_configured(model, heldout: torch.Tensor, *, prompt_len=64, new_tokens=32, num_prompts=4, batch_size=8):
    """Measure a model as configured (``config.top_theta``) next to dense attention: two records."""
    _, config = language_model(model)
    settings = model_settings(config)
    if settings is None or settings.thresholds is None:
        raise ValueError("the model has no Top-θ thresholds configured: pass --thresholds or calibrate first")
    prompts = heldout[:num_prompts, :prompt_len]
    k = settings.thresholds.k if isinstance(settings.thresholds.k, int) else None
    rec = measure(model, heldout, k=k, prompts=prompts, new_tokens=new_tokens, batch_size=batch_size)
    saved = config.top_theta
    try:
        config.top_theta = None
        dense = measure(model, heldout, k=None, prompts=prompts, new_tokens=new_tokens, batch_size=batch_size)
    finally:
        config.top_theta = saved
    return [
        {"method": "dense", "k": None, **dense},
        {"method": "top-theta", "k": k, "placement": settings.thresholds.placement, "sdc": settings.sdc,
         "sdc_scale": settings.sdc_scale, "cap": settings.cap, "vmc": settings.vmc, **rec},
    ]  # fmt: skip
