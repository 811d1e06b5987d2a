"""Fine-tuning a causal LM with the attention-condensation regularizer (the ``train`` command).

:func:`finetune` runs AdamW on random windows of a token stream, minimising ``(1 - α) · LM loss + α · KL + λ · R``
where R is the condensation regularizer of every non-dense attention layer (:func:`sparse_attention.condensation`)
and KL the distillation term (:func:`distillation_loss`): the divergence of the model's next-token distribution from
a frozen teacher's, by default the model itself as it was before the fine-tune. The distillation term is what holds
the perplexity while the regularizer condenses the attention. Per step it records the LM loss, KL, R and the mean
top-k softmax mass of the regularized rows.

Under ``torch.distributed`` (``torchrun``; ``process_group``) it trains data-parallel with
``torch.nn.parallel.DistributedDataParallel``: every process draws the same global batch of ``batch_size`` windows
and takes its contiguous share of them; the losses are normalised by the global counts (LM tokens and distilled
positions, regularized rows), so the averaged gradients, and the weights they train, are those of one process on the
whole global batch.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..hf.condensation import condensation
from ..ops import distributed
from ..ops.contract import check_int
from .data import token_stream


@dataclass
class StepLog:
    """What one optimizer step of :func:`finetune` saw.

    Attributes:
        step: 0-based step index.
        lm_loss: the model's next-token cross-entropy on the step's batch (nats).
        reg_loss: the regularizer R on the same batch (mean ``-log m_i`` or ``1 - m_i``).
        topk_mass: mean top-k softmax mass ``m_i`` over the regularized (layer, head, row) triples (NaN if none).
        lam: the λ applied at this step (after warm-up).
        seconds: wall time of the step (the teacher's forward included).
        kl: the distillation term on the same batch (nats per predicted token), ``None`` without distillation.
    """

    step: int
    lm_loss: float
    reg_loss: float
    topk_mass: float
    lam: float
    seconds: float
    kl: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        kl = "" if self.kl is None else f" kl {self.kl:.4f}"
        return (
            f"step {self.step + 1}: lm_loss {self.lm_loss:.4f}{kl} reg {self.reg_loss:.4f} "
            f"topk_mass {self.topk_mass:.4f} lam {self.lam:.3g} ({self.seconds:.2f}s)"
        )


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(teacher ‖ student)`` between next-token distributions, in nats.

    ``Σ_v p_t(v) (log p_t(v) - log p_s(v))`` per position, computed in float32 from logits ``[..., V]`` of the same
    shape, averaged over every leading position. Gradients flow into ``student_logits`` only (the teacher's logits are
    detached). Zero exactly when the two distributions agree.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape: the teacher must share the student's vocabulary and see the same batch"
        )
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
    return torch.sum(log_t.exp() * (log_t - log_s), dim=-1).mean()


def _window_sampler(tokenizer, data, seq_len: int, batch_size: int, generator: torch.Generator):
    """A function returning a ``[batch_size, seq_len]`` int64 batch of random windows of ``data``."""
    if isinstance(data, str):
        data = [data]
    if isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
        data = token_stream(tokenizer, data)
    if not isinstance(data, torch.Tensor) or data.dtype not in (torch.int64, torch.int32) or data.dim() not in (1, 2):
        raise ValueError(
            "data must be a 1-D token stream or 2-D [N, L] windows of token ids (int64 tensor), or text (str or a list "
            f"of str, with a tokenizer); got {type(data).__name__}"
            + (f" of dtype {data.dtype} and shape {tuple(data.shape)}" if isinstance(data, torch.Tensor) else "")
        )
    data = data.long().cpu()
    if data.dim() == 1:
        if data.numel() <= seq_len:
            raise ValueError(f"the token stream has {data.numel()} tokens; seq_len={seq_len} needs more than that")
        offsets = torch.arange(seq_len)

        def sample() -> torch.Tensor:
            starts = torch.randint(0, data.numel() - seq_len + 1, (batch_size, 1), generator=generator)
            return data[starts + offsets]

        return sample
    if data.shape[1] < seq_len or data.shape[0] == 0:
        raise ValueError(f"windows of shape {tuple(data.shape)} are shorter than seq_len={seq_len} (or empty)")

    def sample_rows() -> torch.Tensor:
        rows = torch.randint(0, data.shape[0], (batch_size,), generator=generator)
        return data[rows, :seq_len]

    return sample_rows


def finetune(
    model: torch.nn.Module,
    tokenizer,
    data,
    *,
    k: int = 16,
    lam: float = 0.1,
    steps: int = 100,
    lr: float = 1e-4,
    batch_size: int = 8,
    seq_len: int = 256,
    kind: str = "logmass",
    dense_layers=None,
    warmup: int = 0,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    device=None,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = True,
    log: Callable[[StepLog], None] | None = None,
    distill: float = 0.0,
    teacher: torch.nn.Module | None = None,
    process_group="auto",
) -> list[StepLog]:
    """Fine-tune a causal LM so that its attention condenses onto the top k keys of each row.

    Each step draws ``batch_size`` random windows of ``seq_len`` tokens, computes the model's LM loss and the
    condensation regularizer R of every non-dense layer in the same forward pass, and takes one AdamW step on
    ``(1 - distill) · LM loss + distill · KL + λ · R``, where KL is :func:`distillation_loss` against the teacher's
    logits on the same windows (predicting the same tokens as the LM loss). The model is left in training mode on
    ``device``, with its attention implementation restored.

    Args:
        model: a transformers causal LM (``model(input_ids=..., labels=...)`` returns ``.loss``) whose attention goes
            through ``AttentionInterface``.
        tokenizer: used only when ``data`` is text; may be ``None`` otherwise.
        data: a 1-D int64 token stream (windows start anywhere), 2-D ``[N, L >= seq_len]`` int64 windows (rows are
            drawn at random and cut to ``seq_len``), or text: a ``str`` or a list of ``str``, tokenized and joined
            with the tokenizer's eos token.
        k: top-k size of the regularizer (default 16).
        lam: regularizer weight λ (default 0.1); 0 trains the LM loss alone and only measures R.
        steps: optimizer steps (default 100).
        lr: AdamW learning rate, constant (default 1e-4).
        batch_size, seq_len: windows per step and tokens per window (defaults 8 and 256).
        kind: ``"logmass"`` (default) or ``"mass"``.
        dense_layers: layers left out of the regularizer; default as :func:`sparse_attention.condensation`.
        warmup: steps over which λ ramps up linearly (default 0).
        weight_decay: AdamW weight decay (default 0).
        grad_clip: max gradient norm, ``None`` for no clipping (default 1.0).
        device: where to train (default: the model's device).
        seed: seeds the window sampling (default 0); the model's dropout uses torch's global generator.
        backend: regularizer backend (``"auto"``, ``"reference"``, ``"triton"``).
        progress: show a tqdm progress bar (default True; on the process of rank 0 only).
        log: called with each step's :class:`StepLog` (e.g. ``print``), on every process.
        distill: weight α of the distillation term, in [0, 1] (default 0: the LM loss alone). 1 trains on the
            teacher's distribution only: with λ = 0 the model then stays where it is, and with λ > 0 it finds the
            condensed model closest to the teacher.
        teacher: the frozen model whose next-token distribution is distilled (same vocabulary); it runs in eval mode
            without gradients and is never updated. Default, when ``distill > 0``: a copy of ``model`` taken before
            the first step (the original model). Given with ``distill == 0`` it is an error.
        process_group: ``"auto"`` (default: the default process group when ``torch.distributed`` is initialised with
            several processes, else none), ``None`` (this process alone) or a ``torch.distributed.ProcessGroup``.
            With a group of N processes the model is wrapped in ``DistributedDataParallel`` for the run (on CUDA,
            ``device`` must be this process's GPU); each step's ``batch_size`` windows (the global batch, the same
            on every process as every process draws it with ``seed``) are split into N contiguous shares (sizes
            differing by at most one), the LM loss is normalised by the global token count and R by the global
            number of regularized rows, so the run equals a single process training on the global batch up to
            float rounding of the gradient all-reduce; dropout draws different masks. The :class:`StepLog` values
            are those of the global batch, the same on every process. Every process must call :func:`finetune`
            with the same arguments.

    Returns:
        The history, one :class:`StepLog` per step.

    Raises:
        ValueError: bad ``steps``, ``batch_size``, ``seq_len``, ``lr``, data that is neither a token tensor nor text,
        text without a tokenizer, data shorter than ``seq_len``, a non-finite loss during training, a bad
        ``process_group`` or fewer windows per step than processes; and as :func:`sparse_attention.condensation` for
        ``k``, ``kind``, ``lam``, ``warmup``, ``dense_layers``, ``backend``; ``distill`` outside [0, 1], or a
        ``teacher`` without ``distill``, or one that is the model itself.
    """
    check_int("steps", steps)
    check_int("batch_size", batch_size)
    check_int("seq_len", seq_len)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(distill, bool) or not isinstance(distill, (int, float)) or not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill must be a number in [0, 1] (the weight of the distillation term), got {distill!r}")
    if teacher is not None and distill == 0:
        raise ValueError("a teacher was given with distill=0: pass distill > 0 to use it, or no teacher")
    if teacher is model:
        raise ValueError("the teacher must be a separate, frozen model, not the model being fine-tuned")
    group = distributed.resolve_group(process_group)
    world, rank = distributed.world_size(group), distributed.rank(group)
    if batch_size < world:
        raise ValueError(f"batch_size={batch_size} windows per step cannot be shared out to {world} processes")
    sample = _window_sampler(tokenizer, data, seq_len, batch_size, torch.Generator().manual_seed(seed))
    if device is None:
        device = next(iter(model.parameters())).device
    device = torch.device(device)
    if distill > 0:
        if teacher is None:
            teacher = copy.deepcopy(model)
        teacher.to(device).eval().requires_grad_(False)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    net = model
    loss_kwargs = {}
    if group is not None:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, process_group=group
        )
        # transformers' causal LM loss with num_items_in_batch is sum / num_items_in_batch: this process's token
        # losses over the global token count, times N, so that DDP's gradient average is the global mean.
        loss_kwargs["num_items_in_batch"] = batch_size * (seq_len - 1) / world
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    history: list[StepLog] = []
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="finetune", dynamic_ncols=True)
    try:
        with condensation(
            model, k, kind, lam=lam, warmup=warmup, dense_layers=dense_layers, backend=backend, process_group=group
        ) as reg:
            for step in range(steps):
                start = time.perf_counter()
                batch = sample().tensor_split(world)[rank].to(device)
                out = net(input_ids=batch, labels=batch, use_cache=False, **loss_kwargs)
                lm_loss = out.loss
                reg_loss = reg.loss
                lam_now = reg.current_lam
                loss = lm_loss
                kl = torch.zeros((), device=device)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(input_ids=batch, use_cache=False).logits
                    # This share's mean, weighted as the LM loss is: its positions over the global count, times N.
                    share = len(batch) * world / batch_size
                    kl = distillation_loss(out.logits[:, :-1], teacher_logits[:, :-1]) * share
                    loss = (1.0 - distill) * lm_loss + distill * kl
                if lam_now > 0:
                    loss = loss + lam_now * reg_loss
                # The logged values are the global batch's; deciding on them keeps every process in step.
                values = torch.stack([lm_loss.detach().float(), kl.detach().float(), loss.detach().float()])
                lm_value, kl_value, loss_value = (distributed.all_reduce(values, group) / world).tolist()
                if not math.isfinite(loss_value):
                    raise ValueError(f"the loss became {loss_value} at step {step}; lower lr or lam")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                entry = StepLog(
                    step=step,
                    lm_loss=lm_value,
                    reg_loss=reg.loss_value,
                    topk_mass=reg.topk_mass,
                    lam=lam_now,
                    seconds=time.perf_counter() - start,
                    kl=kl_value if teacher is not None else None,
                )
                history.append(entry)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        lm=f"{entry.lm_loss:.3f}", reg=f"{entry.reg_loss:.3f}", mass=f"{entry.topk_mass:.3f}"
                    )
                if log is not None:
                    log(entry)
    finally:
        if bar is not None:
            bar.close()
        del net  # DDP's gradient hooks go with it; the model itself holds the trained weights
    return history
