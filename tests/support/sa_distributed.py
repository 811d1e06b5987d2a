"""Two-process tests on torch.distributed (gloo, CPU): the launcher helpers and the worker scenarios.

The tests run this file under ``torchrun --standalone`` (a free port is picked by torchrun's own rendezvous), e.g.
``python -m torch.distributed.run --standalone --nproc-per-node 2 sa_distributed.py calibration OUT``; every rank
writes what it computed to ``OUT/<scenario>-rank<r>.pt`` and the test compares. A scenario computes its
single-process reference (``process_group=None``, the whole global batch) in the same process, after the distributed
part, so both run with the same thread count and kernels. Children run with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
LAUNCH_TIMEOUT = 300  # seconds; a launch takes ~15-30 s on a loaded 2-core machine


def gloo_skip_reason() -> str | None:
    """Why two gloo processes cannot run here, or ``None`` when they can."""
    import torch.distributed as dist

    if not dist.is_available():
        return "this torch build has no torch.distributed"
    if not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    return None


def child_env(**extra) -> dict:
    """The environment of a launched process: one thread, offline, no tokenizer threads."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    env.update(extra)
    return env


def torchrun_command(*args: str, nproc: int = 2) -> list[str]:
    """``torchrun --standalone --nproc-per-node N --tee 3 ARGS`` (``--tee 3`` prefixes every line with its rank)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "--tee=3",
        *args,
    ]


def start(command: list[str], cwd) -> subprocess.Popen:
    """Start ``command`` in ``cwd`` (text output captured, merged)."""
    return subprocess.Popen(
        command, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen, what: str) -> str:
    """Wait for ``process``; its output, or an AssertionError with the tail of it if it failed or timed out."""
    try:
        out, _ = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        raise AssertionError(f"{what} timed out after {LAUNCH_TIMEOUT} s:\n{out[-6000:]}") from None
    assert process.returncode == 0, f"{what} exited with {process.returncode}:\n{out[-6000:]}"
    return out


def trainer_command(launcher: str, out_dir: Path) -> list[str]:
    """The ``trainer`` scenario on two processes by ``launcher`` (``"torchrun"`` or ``"accelerate"``), or on one
    plain process (``"single"``)."""
    script = [str(HERE / "sa_distributed.py"), "trainer", str(out_dir)]
    if launcher == "torchrun":
        return torchrun_command(*script)
    if launcher == "accelerate":
        # On CPU, accelerate's own --cpu launcher is single-process (multi-CPU needs mpirun); --multi_gpu is its
        # torchrun launcher, and the Trainer then initialises gloo because there is no GPU.
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0", *script,
        ]  # fmt: skip
    return [sys.executable, *script]


def run_scenario(scenario: str, out_dir: Path, nproc: int = 2) -> list[dict]:
    """Run a worker scenario on ``nproc`` processes; the per-rank results."""
    command = torchrun_command(str(HERE / "sa_distributed.py"), scenario, str(out_dir), nproc=nproc)
    finish(start(command, out_dir), f"scenario {scenario!r}")
    return [torch.load(out_dir / f"{scenario}-rank{r}.pt", weights_only=False) for r in range(nproc)]


SOURCE_DIR = HERE.parents[1] / "sparse_attention"


def save_tiny_checkpoint(root: Path) -> Path:
    """A tiny GPT-2 (3 layers, no dropout) and a byte-level BPE tokenizer trained on this package's sources."""
    from sa_testing import tiny_gpt2
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    files = sorted(str(p) for p in SOURCE_DIR.rglob("*.py"))
    bpe = ByteLevelBPETokenizer()
    bpe.train(files, vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    no_dropout(tiny_gpt2(n_layer=3, vocab=len(tok), positions=128)).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def save_text_dir(root: Path) -> Path:
    """Six source files of this package as text."""
    for p in sorted(SOURCE_DIR.rglob("*.py"))[:6]:
        (root / (p.stem + ".txt")).write_text(p.read_text())
    return root


# ----------------------------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------------------------


def no_dropout(model):
    """``model`` with every dropout off, so that a data-parallel run can equal the single-process one."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    return model


def calibration_batches() -> list:
    """Batches of mixed lengths (one left-padded): dealt out by ``shard``, rank 0 sees rows of at most 24 keys
    (record capacity 64), rank 1 up to 100 (capacity 128), so the merge must first agree on the capacity."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 97, (2, length), generator=gen) for length in (16, 100, 24, 40, 20)]
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :9] = 0
    batches.append({"input_ids": torch.randint(0, 97, (2, 30), generator=gen), "attention_mask": mask})
    return batches


CALIBRATION_SETTINGS = {
    "pre": dict(k=4, placement="pre", dense_layers=(0,)),
    "post-max-rows": dict(k=3, placement="post", max_rows=8, sigma=0.5, dense_layers=()),
}


def _thresholds(th) -> dict:
    return {"n_points": th.n_points, "theta": th.theta, "sdc_table": th.sdc_table}


def scenario_calibration(rank: int, world: int) -> dict:
    from sa_testing import tiny_gpt2

    import sparse_attention as sa

    model = tiny_gpt2(n_layer=3, positions=128)
    batches = calibration_batches()
    result = {"shard_sizes": len(sa.shard(batches))}
    for name, settings in CALIBRATION_SETTINGS.items():
        result[name] = {
            "sharded": _thresholds(sa.calibrate(model, sa.shard(batches), progress=False, **settings)),
            # Every process passing every batch: each record counted `world` times, mean and std unchanged.
            "replicated": _thresholds(sa.calibrate(model, batches, progress=False, **settings)),
            # Opting out inside the initialised job: this process alone, on the union of the shards.
            "single": _thresholds(sa.calibrate(model, batches, progress=False, process_group=None, **settings)),
        }
    result["rank0_write_failure"] = _rank0_write_failure(rank)
    return result


def _rank0_write_failure(rank: int) -> str:
    """What the command line's rank-0-only write raises on each process when the write fails on rank 0."""
    from sparse_attention.cli import _on_rank0

    def write() -> None:
        raise OSError("disk full")

    try:
        _on_rank0(write)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "nothing raised"


VOCAB = 97
K = 4
LAM = 0.5


def training_batch():
    """A global batch of 3 windows (shares of 2 and 1 on two ranks), the last left-padded by 7 tokens: the ranks see
    different numbers of LM tokens and regularized rows, so per-rank means would weigh them wrongly."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (3, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, :7] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _share(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.tensor_split(world)[rank]


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[name] = g.detach().clone()
    return out


def _weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        w = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = w.detach().clone()
    return out


def _step_losses(net, model, reg_process_group, rank, world, *, exact: bool):
    """One forward of ``net`` (the model or its DDP / FSDP form) on this rank's share of the training batch:
    ``(loss to backpropagate, tensor [LM loss, R, total] of the global batch)``; ``exact=False`` uses per-rank
    means (HF's default LM loss, the regularizer with ``process_group=None``)."""
    import sparse_attention as sa
    from sparse_attention.ops import distributed

    ids, mask, labels = training_batch()
    kwargs = {}
    if exact:
        kwargs["num_items_in_batch"] = float((labels[:, 1:] != -100).sum()) / world
    local = {"input_ids": _share(ids, rank, world), "attention_mask": _share(mask, rank, world)}
    with sa.condensation(
        model, K, lam=LAM, dense_layers=(), backend="reference", process_group=reg_process_group
    ) as reg:
        lm = net(**local, labels=_share(labels, rank, world), use_cache=False, **kwargs).loss
        reg_loss = reg.loss
    loss = lm + LAM * reg_loss
    group = distributed.resolve_group("auto") if world > 1 else None
    values = distributed.all_reduce(torch.stack([lm, reg_loss, loss]).detach(), group) / world
    return loss, values


def _adamw_steps(net, model, reg_group, rank, world, steps: int) -> list[list[float]]:
    """``steps`` AdamW steps with gradient clipping on the training batch; the global losses of each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(steps):
        loss, values = _step_losses(net, model, reg_group, rank, world, exact=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(values.tolist())
    return history


def _stream():
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (4000,), generator=gen)


FINETUNE = dict(k=K, lam=LAM, steps=3, lr=1e-3, batch_size=3, seq_len=24, dense_layers=(), backend="reference")


def scenario_training(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from sa_testing import tiny_gpt2
    from torch.nn.parallel import DistributedDataParallel

    import sparse_attention as sa

    base = no_dropout(tiny_gpt2(n_layer=3))
    result = {"initial": _weights(base)}
    try:
        sa.finetune(copy.deepcopy(base), None, _stream(), progress=False, **{**FINETUNE, "batch_size": 1})
        result["one_window_for_two"] = "nothing raised"
    except ValueError as exc:
        result["one_window_for_two"] = str(exc)

    # DDP, one step: the exact normalisation, and per-rank means (what DDP gives without it) for contrast.
    for name, exact, reg_group in (("ddp", True, "auto"), ("ddp_per_rank_means", False, None)):
        model = copy.deepcopy(base).train()
        net = DistributedDataParallel(model)
        loss, values = _step_losses(net, model, reg_group, rank, world, exact=exact)
        loss.backward()
        result[name] = {"losses": values, "grads": _grads(model)}
        del net

    # FSDP2 (fully_shard of each block, then the root), one step and then three AdamW steps.
    from torch.distributed.fsdp import fully_shard

    def sharded():
        model = copy.deepcopy(base).train()
        for block in model.transformer.h:
            fully_shard(block)
        return fully_shard(model)

    try:
        model = sharded()
        loss, values = _step_losses(model, model, "auto", rank, world, exact=True)
        loss.backward()
        result["fsdp"] = {"losses": values, "grads": _grads(model)}
        model = sharded()
        result["fsdp_steps"] = {
            "history": _adamw_steps(model, model, "auto", rank, world, 3),
            "weights": _weights(model),
        }
    except Exception as exc:  # reported to the test, which fails with the reason
        result["fsdp_error"] = f"{type(exc).__name__}: {exc}"

    # DDP through sparse_attention.finetune (process_group="auto").
    model = copy.deepcopy(base)
    history = sa.finetune(model, None, _stream(), progress=False, **FINETUNE)
    result["finetune"] = {"history": [e.to_dict() for e in history], "weights": _weights(model)}
    # The same with the distillation term (a teacher copied on every process, its KL over the global positions).
    model = copy.deepcopy(base)
    history = sa.finetune(model, None, _stream(), progress=False, distill=0.5, **FINETUNE)
    result["finetune_distill"] = {"history": [e.to_dict() for e in history], "weights": _weights(model)}

    dist.barrier()
    if rank == 0:  # the single-process references, on the whole global batch
        model = copy.deepcopy(base).train()
        loss, values = _step_losses(model, model, None, 0, 1, exact=False)
        loss.backward()
        result["single"] = {"losses": values, "grads": _grads(model)}
        model = copy.deepcopy(base).train()
        result["single_steps"] = {"history": _adamw_steps(model, model, None, 0, 1, 3), "weights": _weights(model)}
        model = copy.deepcopy(base)
        history = sa.finetune(model, None, _stream(), progress=False, process_group=None, **FINETUNE)
        result["single_finetune"] = {"history": [e.to_dict() for e in history], "weights": _weights(model)}
        model = copy.deepcopy(base)
        history = sa.finetune(model, None, _stream(), progress=False, process_group=None, distill=0.5, **FINETUNE)
        result["single_finetune_distill"] = {"history": [e.to_dict() for e in history], "weights": _weights(model)}
    return result


TRAINER_WINDOWS = 8
TRAINER_GLOBAL_BATCH = 4


def trainer_run(out_dir: Path) -> dict:
    """Three optimizer steps of :class:`~sparse_attention.CondensationTrainer` on a global batch of 4 windows (in
    dataset order), on however many processes the launcher started (none: one process). transformers' ``Trainer``
    initialises the process group itself (gloo on CPU) from torchrun's environment."""
    from sa_testing import tiny_gpt2
    from transformers import TrainingArguments

    import sparse_attention as sa

    world = int(os.environ.get("WORLD_SIZE", "1"))
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (TRAINER_WINDOWS, 24), generator=gen)
    # Windows 2, 3 and 6 are left-padded: on two processes the second one has fewer tokens and regularized rows.
    mask = torch.ones_like(ids)
    mask[[2, 3, 6], :9] = 0
    labels = ids.masked_fill(mask == 0, -100)
    data = [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels, strict=True)]
    args = TrainingArguments(
        output_dir=str(out_dir / f"trainer-{world}"), per_device_train_batch_size=TRAINER_GLOBAL_BATCH // world,
        max_steps=3, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        train_sampling_strategy="sequential", disable_tqdm=True, seed=0,
    )  # fmt: skip
    model = no_dropout(tiny_gpt2(n_layer=3))
    with sa.condensation(model, K, lam=LAM, warmup=2, dense_layers=(), backend="reference") as reg:
        trainer = sa.CondensationTrainer(model=model, args=args, train_dataset=data, condensation=reg)
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "condensation_loss" in entry]
    return {"world": world, "logs": logs, "weights": _weights(model)}


SCENARIOS = {"calibration": scenario_calibration, "training": scenario_training}


def main(scenario: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if scenario == "trainer":
        result = trainer_run(Path(out_dir))
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(result, Path(out_dir) / f"trainer-{result['world']}-rank{rank}.pt")
        return
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        result = SCENARIOS[scenario](rank, world)
        torch.save(result, Path(out_dir) / f"{scenario}-rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
