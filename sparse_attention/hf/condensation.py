"""Attention-condensation training of Hugging Face models: the regularizer of every attention layer, in one loss.

Inside ``with condensation(model, k=16) as reg:`` the model runs with ``attn_implementation="top_theta"``. In
training mode that backend computes ordinary dense attention and shows each layer's call (query, key, causality, key
padding, softcap, sinks) to :meth:`Condensation.observe`, which adds the layer's
:func:`~sparse_attention.topk_regularizer` terms;
``reg.loss`` is then the mean of ``-log m_i`` (or ``1 - m_i``) over every regularized (layer, head, row) of the
latest forward pass, differentiable. Layers listed in ``dense_layers`` are skipped; evaluation-mode forwards record
nothing.

Per-step behaviour: every call of ``model`` (the object given to :func:`condensation`) starts a fresh record, and in
training mode advances ``reg.step``, which drives the λ warm-up. Read ``reg.loss`` / ``reg.penalty`` after the forward
and before the next one; reading does not clear anything.

Plain PyTorch::

    with sparse_attention.condensation(model, k=16, lam=0.05, warmup=100) as reg:
        for batch in loader:
            out = model(**batch)
            loss = out.loss + reg.penalty  # = reg.current_lam * reg.loss, λ ramped over 100 steps
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

transformers' ``Trainer``: :class:`sparse_attention.CondensationTrainer` adds ``reg.lam_at(global_step) · reg.loss``
to the ``Trainer``'s loss (λ ramps by optimizer steps, and keeps its weight under gradient accumulation)::

    with sparse_attention.condensation(model, k=16, warmup=100) as reg:
        sparse_attention.CondensationTrainer(model=model, args=args, train_dataset=data, condensation=reg).train()

Gradient checkpointing re-runs layers during the backward pass; those calls record again, harmlessly: the records are
dropped at the next forward of the model.

Data parallelism (DDP, FSDP, ``Trainer`` under ``torchrun`` / ``accelerate launch``): with a process group
(``process_group``, default ``"auto"``: the default group when ``torch.distributed`` is initialised with several
processes), the end of every training forward of the model all-reduces the regularized row count, and ``reg.loss`` on
each process is ``(sum of this process's row losses) · world_size / (rows of all processes)``. DDP and FSDP average
gradients over the processes, so the gradient of ``reg.loss`` they apply is that of the mean over every regularized
row of the global batch, exactly as one process on the whole batch, whatever the split of rows between processes.
(Without the all-reduce that holds only when every process has the same number of regularized rows.) ``reg.rows`` and
``reg.topk_mass`` then describe the global batch, and ``reg.loss_value`` is the global mean as a float.
"""

from __future__ import annotations

import math

import torch

from ..ops import distributed, regularizer
from ..ops.contract import BACKENDS, DEFAULT_DENSE_LAYERS, AttentionCall, check_choice, check_int
from ..ops.regularizer import KINDS, RegularizerTerms
from .backend import ModelContext, language_model, model_settings


def _dense_layers_of(model) -> tuple[int, ...]:
    """The dense layers of a model configured for Top-θ inference, else the default dense layers (Top-θ inference
    keeps them dense, so regularizing them is wasted)."""
    _, config = language_model(model)
    settings = model_settings(config)
    if settings is not None and settings.thresholds is not None:
        return tuple(settings.thresholds.dense_layers)
    return DEFAULT_DENSE_LAYERS


class Condensation(ModelContext):
    """The regularizer of one model's attention layers; create it with :func:`condensation`.

    Attributes:
        k, kind, lam, warmup, backend, process_group: as given to :func:`condensation`.
        dense_layers: layer indices that are not regularized.
        step: training forwards of the model so far, minus one (-1 before the first); drives :attr:`lam`. Settable.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        k: int = 16,
        kind: str = "logmass",
        *,
        lam: float = 1.0,
        warmup: int = 0,
        dense_layers=None,
        backend: str = "auto",
        process_group="auto",
    ):
        super().__init__(model, switch=True)
        distributed.check_group(process_group)
        check_int("k", k)
        check_choice("kind", kind, KINDS)
        check_choice("backend", backend, BACKENDS)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (steps), got {warmup!r}")
        if dense_layers is None:
            dense_layers = _dense_layers_of(model)
        try:
            self.dense_layers = frozenset(int(i) for i in dense_layers)
        except (TypeError, ValueError):
            raise ValueError(f"dense_layers must be an iterable of layer indices, got {dense_layers!r}") from None
        self.k = k
        self.kind = kind
        self.lam = float(lam)
        self.warmup = warmup
        self.backend = backend
        self.process_group = process_group
        self.step = -1
        self._records: list[tuple[int | None, RegularizerTerms]] = []
        # (world size, global [rows, mass_sum, loss_sum]) of the latest training forward under a process group.
        self._global: tuple[int, torch.Tensor] | None = None
        self._hooks = []

    def __enter__(self) -> Condensation:
        super().__enter__()
        self._hooks = [
            self.model.register_forward_pre_hook(self._on_forward),
            self.model.register_forward_hook(self._after_forward),
        ]
        self.reset()
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.reset()
        return super().__exit__(*exc)

    def _on_forward(self, module, args) -> None:
        self.reset()
        if module.training:
            self.step += 1

    def _after_forward(self, module, args, output) -> None:
        """Under a process group, sum the row count, top-k mass and loss of the forward over its processes (every
        process runs the training forwards, so this collective is matched on all of them)."""
        if not module.training:
            return
        group = distributed.resolve_group(self.process_group)
        if group is None:
            return
        local = torch.zeros(3, dtype=torch.float64, device=self._device())
        if self._records:
            local = torch.stack([self._sum(f).detach().double() for f in ("rows", "mass_sum", "loss_sum")])
        self._global = (distributed.world_size(group), distributed.all_reduce(local, group))

    def _device(self) -> torch.device:
        return next(iter(self.model.parameters()), torch.empty(0)).device

    def reset(self) -> None:
        """Drop the records of the current forward (the next forward of the model does this by itself)."""
        self._records.clear()
        self._global = None

    def _check_merged(self) -> None:
        if self._global is None and self._records and distributed.resolve_group(self.process_group) is not None:
            raise RuntimeError(
                "under a process group the regularizer's rows are counted over all processes at the end of the "
                "model's training forward: read reg.loss after model(...) returns (or pass process_group=None)"
            )

    def observe(self, module, call: AttentionCall, out, stats, dense: bool) -> None:
        """The backend's training-mode calls: add the layer's regularizer terms (the call keeps its causality,
        query offset, key padding, softcap and sinks, so the fused kernels skip tiles by index)."""
        if module.training:
            self.record_call(module, call)

    def record_call(self, module: torch.nn.Module, call: AttentionCall) -> None:
        """Add the regularizer terms of one prepared attention call, unless its layer is dense."""
        layer = getattr(module, "layer_idx", None)
        if layer in self.dense_layers:
            return
        # With lam = 0 the loss only measures; building its graph would waste memory.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.lam > 0):
            terms = regularizer.terms(call, self.k, self.kind, self.backend)
        self._records.append((layer, terms))

    def record(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
        *,
        causal: bool = True,
        q_offset: int | None = None,
        softcap: float | None = None,
        sinks=None,
    ) -> None:
        """Add the regularizer terms of one attention call given as tensors (for attention code that does not go
        through the ``top_theta`` backend).

        Args:
            module: the attention module; its ``layer_idx`` decides whether the layer is dense (skipped).
            query: ``[B, Hq, Lq, D]``. key: ``[B, Hkv, Lk, D]``, not repeated for GQA.
            attn_mask: boolean, broadcastable to ``[B, Hq, Lq, Lk]``, True = attend; combined with ``causal``.
            scale: the attention's score scale; default ``module.scaling`` when it has one, else ``D ** -0.5``.
            causal, q_offset, softcap, sinks: as in :func:`sparse_attention.topk_regularizer`.

        Raises:
            As :func:`~sparse_attention.topk_regularizer` for inconsistent tensors.
        """
        if scale is None:
            scale = getattr(module, "scaling", None)
        call = regularizer.prepare(
            query, key, self.k, scale=scale, causal=causal, q_offset=q_offset, attn_mask=attn_mask, softcap=softcap,
            sinks=sinks, kind=self.kind,
        )  # fmt: skip
        self.record_call(module, call)

    def _sum(self, field: str) -> torch.Tensor | None:
        if not self._records:
            return None
        device = getattr(self._records[0][1], field).device
        return sum(getattr(terms, field).to(device) for _, terms in self._records)

    @property
    def loss(self) -> torch.Tensor:
        """Mean per-row loss over every regularized (layer, head, row) of the latest forward: a float32 scalar,
        differentiable with respect to the model's parameters. Zero when nothing was recorded (evaluation mode,
        only dense layers, or no row longer than k).

        Under a process group: this process's share, ``(sum of its row losses) · world_size / (rows of all
        processes)``, whose average over the processes (what DDP and FSDP do with gradients) is the global mean.

        Raises:
            RuntimeError: under a process group, read during the model's forward (before the rows are counted).
        """
        self._check_merged()
        loss_sum = self._sum("loss_sum")
        if loss_sum is None:
            return torch.zeros((), dtype=torch.float32, device=self._device())
        if self._global is not None:
            world, totals = self._global
            return loss_sum * (world / totals[0].clamp_min(1.0).to(loss_sum))
        return loss_sum / self._sum("rows").clamp_min(1.0)

    @property
    def loss_value(self) -> float:
        """The mean per-row loss of the latest forward over every process's rows, as a float (for logging; the same
        on every process); ``reg.loss.item()`` for a single process."""
        self._check_merged()
        if self._global is not None:
            totals = self._global[1]
            return float(totals[2] / totals[0].clamp_min(1.0))
        return float(self.loss.detach())

    @property
    def rows(self) -> int:
        """Number of regularized (layer, head, row) triples recorded in the latest forward (of every process, under a
        process group)."""
        self._check_merged()
        if self._global is not None:
            return int(self._global[1][0])
        rows = self._sum("rows")
        return 0 if rows is None else int(rows.item())

    @property
    def topk_mass(self) -> float:
        """Mean top-k softmax mass over the regularized rows of the latest forward (of every process, under a process
        group); NaN when there are none."""
        self._check_merged()
        if self._global is not None:
            rows, mass = self._global[1][0], self._global[1][1]
            return float(mass / rows) if rows > 0 else float("nan")
        mass = self._sum("mass_sum")
        rows = self._sum("rows")
        if mass is None or rows.item() == 0:
            return float("nan")
        return (mass / rows).item()

    def layer_mass(self) -> dict[int | None, float]:
        """Mean top-k mass per regularized layer in the latest forward (of this process's rows)."""
        mass: dict[int | None, float] = {}
        rows: dict[int | None, float] = {}
        for layer, terms in self._records:
            mass[layer] = mass.get(layer, 0.0) + terms.mass_sum.item()
            rows[layer] = rows.get(layer, 0.0) + terms.rows.item()
        return {layer: mass[layer] / rows[layer] for layer in mass if rows[layer] > 0}

    def lam_at(self, step: int) -> float:
        """λ at training step ``step`` (0-based): ``lam · min(1, (step + 1) / warmup)``, or ``lam`` without warm-up."""
        if self.warmup == 0:
            return self.lam
        return self.lam * min(1.0, (max(step, 0) + 1) / self.warmup)

    @property
    def current_lam(self) -> float:
        """λ at the current :attr:`step`."""
        return self.lam_at(self.step)

    @property
    def penalty(self) -> torch.Tensor:
        """``current_lam · loss``: add it to the LM loss."""
        return self.current_lam * self.loss


def condensation(
    model: torch.nn.Module,
    k: int = 16,
    kind: str = "logmass",
    *,
    lam: float = 1.0,
    warmup: int = 0,
    dense_layers=None,
    backend: str = "auto",
    process_group="auto",
) -> Condensation:
    """Context manager that regularizes a Hugging Face model's attention toward its top k keys while training.

    ``with condensation(model, k=16, lam=0.05) as reg: loss = model(**batch).loss + reg.penalty`` (see the module
    docstring for a ``Trainer`` example).

    Args:
        model: a transformers model whose attention goes through ``AttentionInterface`` (GPT-2, Llama, Mistral,
            Qwen2, ...). It is switched to ``attn_implementation="top_theta"`` inside the block and back on exit.
        k: top-k size (default 16). Rows with at most k visible keys are not regularized.
        kind: ``"logmass"`` (default, mean ``-log m_i``) or ``"mass"`` (mean ``1 - m_i``).
        lam: regularizer weight λ used by ``reg.penalty`` (default 1.0). With ``lam=0`` the regularizer is only
            measured (``reg.loss`` then has no gradient).
        warmup: training steps over which λ ramps linearly from ``lam / warmup`` up to ``lam`` (default 0: none).
        dense_layers: layer indices (``module.layer_idx``) left out; default: the model's Top-θ dense layers when
            it is configured, else the first two layers, which Top-θ inference keeps dense. Pass ``()`` for all.
        backend: regularizer backend, ``"auto"`` (fused Triton kernels for CUDA tensors), ``"reference"`` or
            ``"triton"``.
        process_group: ``"auto"`` (default: the default process group when ``torch.distributed`` is initialised with
            several processes, else none), ``None`` (this process alone) or a ``torch.distributed.ProcessGroup``.
            With a group, ``reg.loss`` is this process's share of the global mean (see the module docstring), so
            that DDP / FSDP gradient averaging trains on the mean over every regularized row of the global batch.
            Pass the model itself (not its DDP wrapper); every process must run the same training forwards.

    Returns:
        A :class:`Condensation`; use it in a ``with`` statement.

    Raises:
        ValueError: bad ``k``, ``kind``, ``lam``, ``warmup``, ``dense_layers``, ``backend`` or ``process_group``; on
        entry, when another condensation is already active on the model. TypeError: ``model`` is not a
        ``torch.nn.Module``.
    """
    return Condensation(
        model, k, kind, lam=lam, warmup=warmup, dense_layers=dense_layers, backend=backend,
        process_group=process_group,
    )  # fmt: skip
