"""Data parallelism on ``torch.distributed``: which processes a job merges over, and the few collectives it needs.

Calibration (:func:`sparse_attention.calibrate`), the condensation regularizer (:func:`sparse_attention.condensation`)
and fine-tuning (:func:`sparse_attention.finetune`) take a ``process_group`` argument:

- ``"auto"`` (the default): the default process group when ``torch.distributed`` is initialised with more than one
  process (as under ``torchrun``, ``accelerate launch`` or transformers' ``Trainer``), else none. A job that never
  initialises ``torch.distributed`` runs exactly as before, with no collective.
- ``None``: none; this process alone, with no collective. Use it to calibrate or train on one rank of an initialised
  job (with ``"auto"``, the other ranks would have to take part).
- a ``torch.distributed.ProcessGroup``: that group.

Collectives run on the device the group's backend needs: CPU for gloo, the current CUDA device for NCCL.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

AUTO = "auto"


def _dist():
    import torch.distributed as dist

    return dist


def check_group(process_group) -> None:
    """Raise unless ``process_group`` is ``"auto"``, ``None`` or a ``torch.distributed.ProcessGroup``."""
    if process_group is None or (isinstance(process_group, str) and process_group == AUTO):
        return
    dist = _dist()
    if dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        return
    raise ValueError(
        f"process_group must be 'auto', None (this process alone) or a torch.distributed.ProcessGroup, got "
        f"{process_group!r}"
    )


def resolve_group(process_group):
    """The process group a job merges over, or ``None`` for a single process (see the module docstring).

    Raises:
        ValueError: ``process_group`` is none of ``"auto"``, ``None``, a ``ProcessGroup``; or a ``ProcessGroup``
            while ``torch.distributed`` is not initialised.
    """
    check_group(process_group)
    if process_group is None:
        return None
    dist = _dist()
    if isinstance(process_group, str):
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        return dist.group.WORLD
    if not dist.is_initialized():
        raise ValueError("process_group is a ProcessGroup but torch.distributed is not initialised")
    return process_group


def rank(group) -> int:
    """This process's rank in ``group`` (0 for ``None``, a single process)."""
    return 0 if group is None else _dist().get_rank(group)


def world_size(group) -> int:
    """Processes in ``group`` (1 for ``None``)."""
    return 1 if group is None else _dist().get_world_size(group)


def _collective_device(group, device: torch.device) -> torch.device:
    backend = str(_dist().get_backend(group))
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device  # a backend per device type ("cpu:gloo,cuda:nccl") takes tensors where they are


def all_reduce(tensor: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced (``"sum"`` or ``"max"``) over ``group``: a new tensor on ``tensor``'s device. Every process of
    the group must call it with a tensor of the same shape and dtype. With ``group=None`` a copy of ``tensor``."""
    if group is None:
        return tensor.clone()
    dist = _dist()
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    work = tensor.detach().to(_collective_device(group, tensor.device), copy=True)
    dist.all_reduce(work, op=reduce_op, group=group)
    return work.to(tensor.device)


def barrier(group) -> None:
    """Wait for every process of ``group`` (nothing for ``None``)."""
    if group is not None:
        _dist().barrier(group=group)


def shard(items, process_group=AUTO):
    """This process's share of ``items``: every ``world_size``-th item from its rank on, as a list (a tensor: its rows,
    as a tensor); all of them for a single process. Use it to give each rank its calibration batches:
    ``calibrate(model, shard(batches), k=16)``.

    Raises:
        TypeError: ``items`` is not a sequence (a list, tuple or tensor; an iterator cannot be shared out).
        ValueError: a bad ``process_group`` (see :func:`resolve_group`).
    """
    if not isinstance(items, (Sequence, torch.Tensor)):
        raise TypeError(f"items must be a sequence (list, tuple or tensor) to shard, got {type(items).__name__}")
    group = resolve_group(process_group)
    share = items[rank(group) :: world_size(group)]
    return share if isinstance(items, torch.Tensor) else list(share)
