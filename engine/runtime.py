"""The engine the daemon calls: load a model folder once, warm it up, then infill /
interpolate / vary (SPEC section 2 "Applications", section 6 figures).

    engine = Engine.load("models/clsm-default")          # TorchScript parts, 1 thread
    g = engine.infill(tokens, 5, 6, seed=7)             # bars 5..6 between bars 1-4 and 7-8
    points = engine.interpolate(tokens, 5, 6, z_a, z_b, [0.0, 0.5, 1.0])
    v = engine.vary(tokens, 5, 6, g.z, 0.5, seed=1)

Decoding: argmax (the paper's), or sampling at a temperature within a top-p nucleus, set at load
(`Engine.load(..., temperature=0.9, top_p=0.9)`, the daemon's `[engine]` config) and
overridable per infill. Sampling draws its Gumbel noise from the context and target position
alone, not from the call: every candidate, variation and interpolation point of one target
shares it, so they differ by z only (the latent space stays what moves the music, and a
variation at delta 0 is its parent).

Synchronous and CPU-heavy (a few ms per call): call it from one worker thread or process.
Device (`device=` auto | cpu | cuda, engine/device.py): the parts load and warm up on it; on
CUDA the fast backends decode with their TorchScript loop (the C++ one is CPU-only) and no
CUDA graphs are built. Seeded draws come from CPU generators, so a seed means the same z on
every device. The CUDA path has not run on a GPU (README, GPU).
Calls are serialised by a lock. Every bad input or model problem raises one `EngineError`
whose message says what to fix; the engine stays usable afterwards.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine import tokens as tk
from engine.device import DeviceError, randn, resolve_device, synchronize
from engine.folder import BACKENDS, EngineError, load_parts, read_manifest

__all__ = ["BACKENDS", "Engine", "EngineError", "Generation"]

log = logging.getLogger(__name__)

PRIOR_CACHE_SIZE = 32  # contexts whose p(w | xC, tau) is kept: re-rolls skip the prior


@dataclass
class Generation:
    tokens: list[int]  # the target's tokens only, 16 per bar
    first_bar: int  # 1-based, inclusive
    last_bar: int
    z: np.ndarray  # (d_z,) latent of this candidate
    latency_ms: float  # wall time of the call that produced it


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise EngineError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_float(name: str, value: object, low: float, high: float = math.inf) -> float:
    """The engine's own contract only (a negative temperature or delta, an alpha outside 0..1
    mean nothing to the model); how far a player may turn a knob is `daemon.rules`'s call."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise EngineError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except OverflowError:
        raise EngineError(f"{name} must be a finite number") from None
    if not (math.isfinite(out) and low <= out <= high):  # also rejects nan
        bound = f"{low}..{high}" if high < math.inf else f">= {low}"
        raise EngineError(f"{name} must be {bound}, got {value!r}")
    return out


class Engine:
    """A loaded, warmed CLSM. Build it with `Engine.load`."""

    def __init__(self, latent, decoder, manifest: dict, *, name: str, backend: str,
                 device: str, threads: int, max_batch: int, temperature: float = 0.0,
                 top_p: float = 1.0):
        self.latent, self.decoder, self.manifest = latent, decoder, manifest
        self.temperature, self.top_p = temperature, top_p  # the default decoding
        self.name, self.backend, self.device = name, backend, torch.device(device)
        self.threads, self.max_batch = threads, max_batch
        self.d_z = int(manifest["model_args"].get("d_z", 128))
        self.n_out = int(manifest["model_args"].get("n_out", tk.N_SYMBOLS))
        self._lock = threading.Lock()
        self._priors: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.load_ms = self.warmup_ms = 0.0

    @classmethod
    def load(cls, model_dir: str | Path, *, backend: str = "torchscript", device: str = "cpu",
             threads: int = 1, max_batch: int = 8, warm: bool = True,
             temperature: float = 0.0, top_p: float = 1.0) -> Engine:
        """temperature 0 = argmax by default; > 0 = sampling within the top_p nucleus."""
        t0 = time.perf_counter()
        temperature = _check_float("temperature", temperature, 0.0)
        top_p = _check_float("top_p", top_p, 0.0, 1.0)
        if top_p == 0.0:
            raise EngineError("top_p must be in (0, 1]: 1 keeps every token")
        if backend not in BACKENDS:
            raise EngineError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        threads = _check_int("threads", threads)
        max_batch = _check_int("max_batch", max_batch)
        if threads < 1 or max_batch < 1:
            raise EngineError("threads and max_batch must be >= 1")
        try:
            dev = resolve_device(device)  # auto | cpu | cuda[:N]
        except DeviceError as e:
            raise EngineError(str(e)) from None
        torch.set_num_threads(threads)  # the daemon's timing path keeps the other cores
        folder = Path(model_dir)
        manifest = read_manifest(folder)
        latent, decoder = load_parts(folder, manifest, backend, str(dev))
        engine = cls(latent, decoder, manifest, name=manifest.get("name", folder.name),
                     backend=backend, device=str(dev), threads=threads, max_batch=max_batch,
                     temperature=temperature, top_p=top_p)
        engine.load_ms = (time.perf_counter() - t0) * 1e3
        if warm:
            try:
                engine.warm_up()
            except Exception as e:  # noqa: BLE001 - swapped parts, a wrong d_z: a lying manifest
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
                raise EngineError(f"model folder {folder} does not match its manifest (parts or "
                                  f"model_args): {first_line}; re-export the model folder") from e
        log.info("engine %s (%s, %s, %d thread(s)) ready: load %.0f ms, warm-up %.0f ms",
                 engine.name, backend, dev, threads, engine.load_ms, engine.warmup_ms)
        return engine

    # ------------------------------------------------------------------ public calls

    def infill(self, tokens: Sequence[int], first_bar: int, last_bar: int, *,
               seed: int | None = None, z: np.ndarray | None = None,
               temperature: float | None = None) -> Generation:
        """Bars first..last given the rest. z=None draws z ~ p(z | xC, tau) with `seed`
        (None = a fresh random seed); temperature None = the engine's decoding, 0 = argmax,
        > 0 = sampling (within the engine's top_p)."""
        t0 = time.perf_counter()
        x, start, length = self._request(tokens, first_bar, last_bar)
        temp = (self.temperature if temperature is None
                else _check_float("temperature", temperature, 0.0))
        gen = self._generator(seed)
        with self._lock, torch.inference_mode():
            if z is None:
                mean, logvar = self._prior(x, start, length)
                eps = randn((self.d_z,), gen, self.device)
                zt = self.latent.flow_inverse((mean + (0.5 * logvar).exp() * eps)[None])
            else:
                zt = self._latent(z, "z")[None]
            out = self._decode(x, zt, start, length, temp)
        return self._result(out[0], zt[0], first_bar, last_bar, t0)

    def interpolate(self, tokens: Sequence[int], first_bar: int, last_bar: int,
                    z_a: np.ndarray, z_b: np.ndarray,
                    alphas: Sequence[float]) -> list[Generation]:
        """z(alpha) = f^-1((1 - alpha) f(z_a) + alpha f(z_b)), decoded together with the
        engine's decoding. alpha 0 and 1 use z_a and z_b exactly."""
        t0 = time.perf_counter()
        x, start, length = self._request(tokens, first_bar, last_bar)
        if isinstance(alphas, str | bytes) or not isinstance(alphas, Sequence | np.ndarray):
            raise EngineError(f"alphas must be a list of numbers in 0..1, got {alphas!r}")
        alpha = [_check_float("alpha", a, 0.0, 1.0) for a in alphas]
        if not alpha:
            raise EngineError("alphas is empty: give at least one alpha in 0..1")
        za, zb = self._latent(z_a, "z_a"), self._latent(z_b, "z_b")
        with self._lock, torch.inference_mode():
            w = self.latent.flow_forward(torch.stack([za, zb]))
            a = torch.tensor(alpha, dtype=w.dtype, device=self.device)[:, None]
            z = self.latent.flow_inverse((1 - a) * w[0] + a * w[1])
            z = torch.where(a == 0, za, torch.where(a == 1, zb, z))  # endpoints exactly
            outs = [self._decode(x, z[i:i + self.max_batch], start, length, self.temperature)
                    for i in range(0, len(alpha), self.max_batch)]
        out = torch.cat(outs)
        return [self._result(out[i], z[i], first_bar, last_bar, t0) for i in range(len(alpha))]

    def vary(self, tokens: Sequence[int], first_bar: int, last_bar: int, z: np.ndarray,
             delta: float, *, seed: int | None = None) -> Generation:
        """z(delta) = f^-1(f(z) + delta * eps), eps ~ N(0, Sigma of p(w | xC, tau)), decoded
        with the engine's decoding."""
        t0 = time.perf_counter()
        x, start, length = self._request(tokens, first_bar, last_bar)
        d = _check_float("delta", delta, 0.0)
        z0 = self._latent(z, "z")[None]
        gen = self._generator(seed)
        with self._lock, torch.inference_mode():
            if d == 0.0:
                zt = z0
            else:
                _, logvar = self._prior(x, start, length)
                eps = randn((self.d_z,), gen, self.device)
                zt = self.latent.flow_inverse(self.latent.flow_forward(z0)
                                              + d * (0.5 * logvar).exp() * eps)
            out = self._decode(x, zt, start, length, self.temperature)
        return self._result(out[0], zt[0], first_bar, last_bar, t0)

    def info(self) -> dict:
        m = self.manifest
        return {"name": self.name, "backend": self.backend, "device": str(self.device),
                "decoding": ("argmax" if self.temperature <= 0.0 else
                             f"temperature={self.temperature:g},top_p={self.top_p:g}"),
                "threads": self.threads, "max_batch": self.max_batch,
                "params": m.get("params", {}).get("inference"), "d_z": self.d_z,
                "dtype": m.get("dtype"), "source": m.get("source"),
                "format_version": m.get("format_version"), "torch": torch.__version__,
                # the C++ decode (engine/native.py) or its TorchScript fallback: 5x apart
                "native": bool(getattr(self.decoder, "compiled_ahead", False)),
                "load_ms": round(self.load_ms, 1), "warmup_ms": round(self.warmup_ms, 1)}

    def warm_up(self) -> None:
        """Run every shape later calls use, twice (TorchScript profiles a shape on its first
        runs, then optimises): 1-4 bar targets through the prior, the flow and the decoder
        at batch 1 and max_batch, argmax and sampling. The start position is a plain int
        inside the scripted loop, not a shape: measured, a first call at a new start bar
        costs what a steady call does, so one start per length suffices. A native decoder
        (engine/native.py) is compiled ahead and has nothing to profile: it runs once per
        length at batch 1 and once at max_batch, enough to find a folder whose parts do not
        fit together (a third of the start-up otherwise went into batch-8 decodes)."""
        t0 = time.perf_counter()
        x = torch.full((1, tk.SEQ_LEN), tk.REST, dtype=torch.long, device=self.device)
        ahead = getattr(self.decoder, "compiled_ahead", False)
        with self._lock, torch.inference_mode():
            for bars in range(1, tk.MAX_TARGET_BARS + 1):
                length = bars * tk.STEPS_PER_BAR
                start = (tk.N_BARS - bars) // 2 * tk.STEPS_PER_BAR
                for _ in range(2):
                    self.latent(x, start, length)
                for batch in (1, 2, self.max_batch):  # 2: interpolation's flow_forward
                    z = self.latent.flow_inverse(torch.zeros(batch, self.d_z, device=self.device))
                    self.latent.flow_forward(z)
                    if batch == 2 or (ahead and batch > 1 and bars > 1):
                        continue
                    for _ in range(1 if ahead else 2):
                        self.decoder(x, z, start, length, 0.0, None)
                        self._decode(x, z, start, length, self.temperature or 1.0)
        synchronize(self.device)  # CUDA queues work: warm means done
        self.warmup_ms = (time.perf_counter() - t0) * 1e3

    # ------------------------------------------------------------------ helpers

    def _request(self, tokens: Sequence[int], first_bar: int,
                 last_bar: int) -> tuple[torch.Tensor, int, int]:
        first_bar, last_bar = _check_int("first_bar", first_bar), _check_int("last_bar", last_bar)
        if isinstance(tokens, str | bytes):
            raise EngineError("tokens must be a sequence of 128 ints, not a string")
        try:
            items = list(tokens)
            if not all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in items):
                raise EngineError(f"tokens must be integers 0..{tk.N_SYMBOLS - 1}; got "
                                  f"{[t for t in items if not isinstance(t, int | np.integer)][:3]}")
            buf = tk.validate_tokens(items)
            start, end = tk.target_steps(first_bar, last_bar)
        except tk.TokenError as e:
            raise EngineError(str(e)) from e
        except (TypeError, ValueError) as e:
            raise EngineError(f"tokens must be 128 ints in 0..{tk.N_SYMBOLS - 1}: {e}") from e
        x = torch.tensor(buf, dtype=torch.long, device=self.device)[None]
        return x, start, end - start

    def _latent(self, z: object, name: str) -> torch.Tensor:
        try:
            arr = np.asarray(z, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise EngineError(f"{name} must be {self.d_z} numbers: {e}") from e
        if arr.shape != (self.d_z,) or not np.isfinite(arr).all():
            raise EngineError(f"{name} must be {self.d_z} finite numbers, got shape {arr.shape}")
        return torch.from_numpy(arr.copy()).to(self.device)

    def _generator(self, seed: int | None) -> torch.Generator:
        if seed is None:
            seed = random.SystemRandom().getrandbits(63)
        seed = _check_int("seed", seed)
        return torch.Generator().manual_seed(seed % (1 << 63))

    def _prior(self, x: torch.Tensor, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p(w | xC, tau), remembered per context and target."""
        ctx = x[0].clone()
        ctx[start:start + length] = tk.POS  # the target's content does not matter
        key = (start, length, ctx.cpu().numpy().tobytes())
        if key in self._priors:
            self._priors.move_to_end(key)
            return self._priors[key]
        mean, logvar = self.latent(x, start, length)
        self._priors[key] = (mean[0], logvar[0])
        if len(self._priors) > PRIOR_CACHE_SIZE:
            self._priors.popitem(last=False)
        return mean[0], logvar[0]

    def _noise(self, x: torch.Tensor, start: int, length: int, batch: int) -> torch.Tensor:
        """Gumbel noise (batch, length, n_out) that depends on the context and target position
        only (see the module docstring): seeded by a checksum of the context tokens."""
        ctx = x[0].clone()
        ctx[start:start + length] = tk.POS
        key = zlib.crc32(ctx.cpu().numpy().astype(np.int64).tobytes() + bytes([start, length]))
        gen = torch.Generator().manual_seed(key)
        u = torch.rand((1, length, self.n_out), generator=gen).clamp_(1e-9, 1 - 1e-7)
        return (-(-u.log()).log()).to(self.device).expand(batch, -1, -1)

    def _decode(self, x: torch.Tensor, z: torch.Tensor, start: int, length: int,
                temperature: float) -> torch.Tensor:
        """Tokens (B, length). Batches other than 1 are padded to max_batch: those are the
        shapes warmed up, so latency stays flat (TorchScript re-profiles new shapes)."""
        n = z.size(0)
        if 1 < n < self.max_batch:
            z = torch.cat([z, z[-1:].expand(self.max_batch - n, -1)])
        if temperature <= 0.0:
            tokens, _ = self.decoder(x, z, start, length, 0.0, None)
        elif self.top_p < 1.0:
            gumbel = self._noise(x, start, length, z.size(0)).contiguous()
            tokens, _ = self.decoder(x, z, start, length, temperature, gumbel, self.top_p)
        else:  # also for model folders exported before top_p existed
            gumbel = self._noise(x, start, length, z.size(0)).contiguous()
            tokens, _ = self.decoder(x, z, start, length, temperature, gumbel)
        return tokens[:n]

    @staticmethod
    def _result(tokens: torch.Tensor, z: torch.Tensor, first_bar: int, last_bar: int,
                t0: float) -> Generation:
        return Generation(tokens=tokens.tolist(), first_bar=first_bar, last_bar=last_bar,
                          z=z.float().cpu().numpy().copy(),
                          latency_ms=(time.perf_counter() - t0) * 1e3)
