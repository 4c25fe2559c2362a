"""Where a decode's time goes (issue 12): torch.profiler over whole decodes of a backend's
decoder, split into time inside operators (their own CPU time: arithmetic plus each
operator's fixed cost) and time between them (the TorchScript interpreter or Python).

Used by `python -m engine.bench --profile`; the profiler itself adds a little per operator,
so these figures are for the split, not for latency (bench's timings are).
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile


def _top_level(events) -> list:
    """Operator events not nested in another operator (their self times add up to the
    operator time once; nested calls are part of their parent's cost)."""
    return [e for e in events if e.cpu_parent is None or e.cpu_parent.name in ("forward",)]


def decode_profile(decoder, x: torch.Tensor, z: torch.Tensor, start: int, length: int,
                   repeats: int = 5) -> dict:
    """Per decode of `length` tokens: wall ms, ms inside operators, the rest (between them),
    operator calls per step and the five most expensive operators (ms per decode)."""
    with torch.inference_mode():
        for _ in range(3):
            decoder(x, z, start, length, 0.0, None)
            decoder(x, z, start, 1, 0.0, None)
        per_len: dict[int, dict] = {}
        for n in (1, length):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(repeats):
                    decoder(x, z, start, n, 0.0, None)
                wall = (time.perf_counter() - t0) * 1e3 / repeats
            events = [e for e in prof.events() if e.name.startswith(("aten::", "prim::", "mkldnn"))]
            top = _top_level(events)
            inside = sum(e.cpu_time_total for e in top) / 1e3 / repeats  # us -> ms per decode
            by_name: dict[str, float] = {}
            for e in top:
                by_name[e.name] = by_name.get(e.name, 0.0) + e.cpu_time_total / 1e3 / repeats
            per_len[n] = {"wall": wall, "inside": inside, "calls": len(top) / repeats,
                          "by_name": by_name}
    full, first = per_len[length], per_len[1]
    steps = max(length - 1, 1)
    top5 = sorted(full["by_name"].items(), key=lambda kv: -kv[1])[:5]
    return {"wall_ms": round(full["wall"], 2), "inside_ops_ms": round(full["inside"], 2),
            "between_ops_ms": round(full["wall"] - full["inside"], 2),
            "context_wall_ms": round(first["wall"], 2),
            "step_wall_us": round((full["wall"] - first["wall"]) / steps * 1e3, 1),
            "step_inside_ops_us": round((full["inside"] - first["inside"]) / steps * 1e3, 1),
            "op_calls_per_step": round((full["calls"] - first["calls"]) / steps, 1),
            "top_ops_ms": {k: round(v, 2) for k, v in top5}}


def latent_profile(latent, x: torch.Tensor, start: int, length: int, repeats: int = 5) -> dict:
    """The prior for a new context: wall ms and the five most expensive operators."""
    with torch.inference_mode():
        for _ in range(3):
            latent(x, start, length)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(repeats):
                latent(x, start, length)
            wall = (time.perf_counter() - t0) * 1e3 / repeats
    top = _top_level([e for e in prof.events() if e.name.startswith(("aten::", "prim::"))])
    by_name: dict[str, float] = {}
    for e in top:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.cpu_time_total / 1e3 / repeats
    top5 = sorted(by_name.items(), key=lambda kv: -kv[1])[:5]
    return {"wall_ms": round(wall, 2), "inside_ops_ms": round(sum(by_name.values()), 2),
            "top_ops_ms": {k: round(v, 2) for k, v in top5}}
