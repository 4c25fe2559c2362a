"""Data-parallel training with torchrun (PyTorch DDP: nccl on CUDA, one GPU a process picked
by LOCAL_RANK; gloo on the CPU).

    torchrun --standalone --nproc-per-node 2 -m training.train ...          # one machine
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29400 --rdzv-id clsm -m training.train ...     # several machines

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here is a no-op and the
run is a plain single process. Every rank draws its own batches (its own seed stream) and DDP
averages the gradients, so each rank holds identical weights after every step; rank 0 alone
logs, validates and writes checkpoints.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int | None:
    """This process's index on its machine (torchrun's LOCAL_RANK; its GPU), None alone."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else None


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def process_group(device: torch.device | None = None):
    """Join torchrun's process group if launched by torchrun (nccl for a CUDA device, which
    becomes this process's current GPU; gloo otherwise); always leave it on the way out."""
    device = device or torch.device("cpu")
    is_launched = launched()
    if is_launched and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Rank 0 validates and checkpoints while the others wait in the next all-reduce.
        dist.init_process_group(backend_for(device), timeout=timedelta(minutes=30))
    try:
        yield
    finally:
        if is_launched and dist.is_initialized():
            dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where collective tensors live: nccl reduces CUDA tensors only."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """DDP around the model (already on its device) when distributed (it broadcasts rank 0's
    weights on entry)."""
    if not dist.is_initialized():
        return model
    device = next(model.parameters()).device
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any: ranks stop together (deadline, signal)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def weight_fingerprints(model: torch.nn.Module) -> list[float]:
    """Every rank's checksum of its weights, gathered (one entry per rank): equal entries mean
    the ranks hold the same model, which DDP promises and a test checks."""
    with torch.no_grad():
        params = unwrap(model).parameters()
        local = torch.stack([p.double().sum() + (p.double() ** 2).sum() for p in params]).sum()
    if not dist.is_initialized():
        return [float(local)]
    gathered = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local)
    return [float(t) for t in gathered]
