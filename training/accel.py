"""Training on any device (engine/device.py resolves it): mixed precision, and how often the
loop reads figures back from the device.

On CUDA every `.item()` / `float()` of a device tensor waits for the GPU to finish its queue;
the loop therefore keeps the step's loss parts on the device, sums them there (`RunningParts`)
and reads them back once per logging interval (`log_interval`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def cpu_bf16_available() -> bool:
    """bfloat16 autocast only pays on CPUs with avx512_bf16 (slower than float32 elsewhere)."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


@dataclass
class Precision:
    """Autocast dtype (None = float32 throughout) and, for float16, the grad scaler."""

    device_type: str = "cpu"
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def choose(cls, device: torch.device, enabled: bool) -> Precision:
        """enabled: [train] bf16 and no --no-bf16. CUDA: bf16 where the GPU supports it, else
        fp16 with a grad scaler; CPU: bf16 on avx512_bf16 CPUs, else float32."""
        if not enabled:
            return cls(device.type)
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return cls("cuda", torch.bfloat16)
            return cls("cuda", torch.float16, torch.amp.GradScaler("cuda"))
        if device.type == "cpu" and cpu_bf16_available():
            return cls("cpu", torch.bfloat16)
        return cls(device.type)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward_step(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """loss.backward() and opt.step(), through the scaler for float16 (it skips a step
        whose gradients overflowed, without a host sync of ours)."""
        if self.scaler is None:
            loss.backward()
            opt.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)
        self.scaler.update()

    def __str__(self) -> str:
        if self.dtype is None:
            return "off (float32)"
        name = "bf16" if self.dtype == torch.bfloat16 else "fp16"
        return f"{name} autocast on {self.device_type}" + (" + grad scaler" if self.scaler else "")


def log_interval(configured: int, device: torch.device) -> int:
    """[train] log_every; 0 = every step on the CPU (a read-back costs nothing there), every
    50 steps on a GPU."""
    if configured > 0:
        return int(configured)
    return 50 if device.type == "cuda" else 1


class RunningParts:
    """Loss parts summed where they were computed, read back as means once an interval."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.count = 0

    def add(self, parts: dict[str, torch.Tensor | float]) -> None:
        for key, value in parts.items():
            # float64 like the Python floats this replaced: CPU figures stay bit-identical
            value = value.detach().double() if isinstance(value, torch.Tensor) else value
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def read(self) -> dict[str, float]:
        """The means since the last read (one host-device sync), and start over."""
        out = {key: float(value) / max(1, self.count) for key, value in self.sums.items()}
        self.sums, self.count = {}, 0
        return out
