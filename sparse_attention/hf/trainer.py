"""transformers' ``Trainer`` with the attention-condensation regularizer in its loss.

:class:`CondensationTrainer` adds ``λ(step) · R`` to the loss the ``Trainer`` computes, where R is ``reg.loss`` of a
:func:`sparse_attention.condensation` entered on the same model::

    with sparse_attention.condensation(model, k=16, lam=0.05, warmup=100) as reg:
        CondensationTrainer(model=model, args=args, train_dataset=data, condensation=reg).train()

It runs wherever the ``Trainer`` runs: one process, or DDP / FSDP under ``torchrun`` or ``accelerate launch``. Under
a launcher the regularizer's default ``process_group="auto"`` finds the process group the ``Trainer`` initialises, so
``reg.loss`` is each process's share of the mean over the global batch's regularized rows (see
:mod:`sparse_attention.hf.condensation`), just as the ``Trainer`` scales the LM loss by the global token count
(``average_tokens_across_devices``): training on N processes with ``per_device_train_batch_size = B / N`` follows
the same path as one process with ``B`` (to float rounding; dropout masks aside).
"""

from __future__ import annotations

import transformers

from .condensation import Condensation


class CondensationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose training loss is ``LM loss + reg.lam_at(global_step) · reg.loss``.

    λ follows the regularizer's ``lam`` and ``warmup`` by optimizer steps (``state.global_step``), not by forward
    passes. Under gradient accumulation the regularizer term of each micro-batch is divided by the number of
    accumulated micro-batches, as the ``Trainer`` does with the LM loss, so ``lam`` means the same for any
    ``gradient_accumulation_steps`` (the term is then the mean of the micro-batches' means, equal to the mean over
    the accumulated rows when every micro-batch has as many regularized rows, e.g. windows of equal length).

    The logs gain ``condensation_loss`` (R) and ``topk_mass`` (mean top-k softmax mass of the regularized rows),
    averaged over the forwards since the previous log, over every process's rows.

    Args:
        condensation: the entered :class:`~sparse_attention.Condensation` of the model given as ``model``.
        *args, **kwargs: as ``transformers.Trainer``.

    Raises:
        TypeError: ``condensation`` is not a :class:`~sparse_attention.Condensation`.
        ValueError: it regularizes another model than ``model``; or the ``Trainer`` would use
            ``torch.nn.DataParallel`` (several GPUs in one process), whose replicas the regularizer does not see:
            launch one process per GPU with ``torchrun`` or ``accelerate launch``.
    """

    def __init__(self, *args, condensation: Condensation, **kwargs):
        if not isinstance(condensation, Condensation):
            raise TypeError(
                "condensation must be the Condensation of the model (with sparse_attention.condensation(model) as "
                f"reg: ... condensation=reg), got {type(condensation).__name__}"
            )
        super().__init__(*args, **kwargs)
        if condensation.model is not self.model:
            raise ValueError("condensation regularizes another model than the one given to the Trainer as model=")
        if self.args.n_gpu > 1:
            raise ValueError(
                f"the Trainer would run torch.nn.DataParallel over {self.args.n_gpu} GPUs in one process, whose model "
                "replicas the regularizer does not see: launch one process per GPU (torchrun or accelerate launch)"
            )
        self.condensation = condensation
        self._reg_logs = [0.0, 0.0, 0]  # sums of R and of the top-k mass, forwards

    def _loss_is_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether the ``Trainer`` leaves the loss undivided by the accumulation steps (its own rule)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            self.compute_loss_func is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The ``Trainer``'s loss plus ``λ · R`` in training mode (nothing is added in evaluation)."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        reg = self.condensation
        if self.model.training:
            term = reg.loss
            if self._loss_is_scaled_for_accumulation(num_items_in_batch):
                steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
                term = term / steps
            lam = reg.lam_at(self.state.global_step)
            if lam > 0:
                loss = loss + lam * term.to(loss.device)
            mass = reg.topk_mass
            if mass == mass:  # NaN when no row was regularized
                self._reg_logs[0] += reg.loss_value
                self._reg_logs[1] += mass
                self._reg_logs[2] += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add ``condensation_loss`` and ``topk_mass`` to the training logs."""
        total, mass, count = self._reg_logs
        if count and "loss" in logs:
            logs = {**logs, "condensation_loss": round(total / count, 6), "topk_mass": round(mass / count, 6)}
            self._reg_logs = [0.0, 0.0, 0]
        super().log(logs, *args, **kwargs)
