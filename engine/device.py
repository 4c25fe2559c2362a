"""The one device setting of the engine, training.train, training.baselines and
training.evaluate (`--device cpu|cuda|auto`, config key `device`).

    device = resolve_device("auto")            # cuda when torch.cuda.is_available(), else cpu
    x = to_device(batch, device)               # pinned + non-blocking copy on CUDA
    synchronize(device)                        # before reading a clock around GPU work

A setting this machine cannot honour ("cuda" without a usable CUDA build or GPU, a GPU index
beyond the machine's, a typo) raises DeviceError with a one-line message that says what to do;
entry points print it and exit (SPEC section 5), the engine turns it into an EngineError.

Random draws: callers keep their seeded torch.Generator on the CPU and move the draws to the
device (`randn`), so a seed gives the same numbers on every device (a CUDA generator gives other
numbers for the same seed); the draws here are small (latents, Gumbel noise of one target).
"""

from __future__ import annotations

import argparse
import re

import torch

CHOICES = ("auto", "cpu", "cuda")  # "cuda:N" is accepted too (one GPU of several)
_NAME = re.compile(r"^(auto|cpu|cuda)(:\d+)?$")


class DeviceError(ValueError):
    """A device setting this machine cannot run."""


def cuda_available() -> bool:
    """torch.cuda.is_available(), in one place so tests can stand in a machine with a GPU."""
    return torch.cuda.is_available()


def resolve_device(name: str | torch.device, local_rank: int | None = None) -> torch.device:
    """"auto" -> cuda if available else cpu; "cpu"; "cuda" / "cuda:N" only where CUDA is usable.
    local_rank (torchrun's LOCAL_RANK) picks one GPU per process: cuda:local_rank."""
    text = str(name).strip().lower()
    match = _NAME.match(text)
    if not match or (match.group(2) and match.group(1) != "cuda"):
        raise DeviceError(f"unknown device {str(name)[:40]!r}: use auto, cpu or cuda (cuda:N "
                          f"for one GPU of several)")
    kind = match.group(1)
    if kind == "auto":
        kind = "cuda" if cuda_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not cuda_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no usable GPU"
        raise DeviceError(f"device {text!r} requested but CUDA is not available here ({build}): "
                          f"use --device cpu or auto, or install a CUDA build of torch (README, GPU)")
    index = local_rank if local_rank is not None else (int(match.group(2)[1:]) if match.group(2)
                                                       else None)
    if index is None:
        return torch.device("cuda")
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"GPU {index} requested but this machine has {count}: start at most "
                          f"{count} process(es) per node (torchrun --nproc-per-node {count})")
    return torch.device("cuda", index)


def add_device_argument(parser: argparse.ArgumentParser, default: str | None) -> None:
    """--device; default None = the config's `device` key."""
    shown = "the config's device" if default is None else default
    parser.add_argument("--device", default=default, metavar="auto|cpu|cuda",
                        help=f"where to compute (default {shown}; auto = cuda when available)")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch onto the device: through pinned memory and without waiting on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def randn(shape: tuple[int, ...], gen: torch.Generator, device: torch.device,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, 1) draws from a CPU generator, placed on the device (see the module docstring)."""
    return torch.randn(shape, generator=gen, dtype=dtype).to(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
