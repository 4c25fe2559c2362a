"""A stand-in for engine.runtime.Engine with the contract's interface (no model needed).

`--engine fake` runs the daemon with it (benchmarks, end-to-end tests, trying the daemon
without a model); unit tests use it directly (tests/fakes.py re-exports it).

Tokens are a deterministic function of z, and z of the seed, so: the same seed gives the
same candidate, interpolation at alpha 0 / 1 gives back A / B, and `period` makes seeds
repeat (seed % period) to exercise the re-roll rule. Every call is recorded. Temperature 0
(argmax) gives what the real model's argmax decodes sound like: long notes, here one held
through each bar (hand-over and mid-bar tests need notes that hold).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.tokens import HOLD, N_PITCHES, N_SYMBOLS, SEQ_LEN, STEPS_PER_BAR, target_steps


class FakeEngineError(ValueError):
    """What the real engine's EngineError is for the fake."""


@dataclass
class FakeGeneration:
    tokens: list[int]
    first_bar: int
    last_bar: int
    z: np.ndarray
    latency_ms: float = 1.0


@dataclass
class FakeEngine:
    d_z: int = 8
    period: int | None = None  # seeds repeat with this period (re-roll tests)
    fail: bool = False  # every call raises FakeEngineError
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _auto_seed: int = 1000

    def _check(self, tokens: Sequence[int], first_bar: int, last_bar: int) -> None:
        if self.fail:
            raise FakeEngineError("fake engine told to fail")
        if len(tokens) != SEQ_LEN:
            raise FakeEngineError(f"expected {SEQ_LEN} tokens, got {len(tokens)}")
        target_steps(first_bar, last_bar)

    def _z(self, seed: int | None) -> np.ndarray:
        if seed is None:
            self._auto_seed += 1
            seed = self._auto_seed
        if self.period is not None:
            seed %= self.period
        return np.random.default_rng(seed).standard_normal(self.d_z)

    def _gen(self, z: np.ndarray, first_bar: int, last_bar: int,
             legato: bool = False) -> FakeGeneration:
        n = (last_bar - first_bar + 1) * STEPS_PER_BAR
        # A hash of the rounded latent: equal z -> equal tokens, different z -> different.
        digest = zlib.crc32(np.round(z, 6).tobytes())
        rng = np.random.default_rng(digest)
        if legato:  # one pitch per bar, held to the bar's end
            pitches = rng.integers(0, N_PITCHES, n // STEPS_PER_BAR)
            tokens = [int(p) if i % STEPS_PER_BAR == 0 else HOLD
                      for p in pitches for i in range(STEPS_PER_BAR)]
        else:
            tokens = [int(t) for t in rng.integers(0, N_SYMBOLS, n)]
        return FakeGeneration(tokens, first_bar, last_bar, z.copy())

    def infill(self, tokens, first_bar, last_bar, *, seed=None, z=None, temperature=None):
        self.calls.append(("infill", {"first_bar": first_bar, "last_bar": last_bar, "seed": seed,
                                      "temperature": temperature, "tokens": list(tokens)}))
        self._check(tokens, first_bar, last_bar)
        return self._gen(self._z(seed) if z is None else np.asarray(z), first_bar, last_bar,
                         legato=temperature == 0)

    def interpolate(self, tokens, first_bar, last_bar, z_a, z_b, alphas):
        self.calls.append(("interpolate", {"first_bar": first_bar, "last_bar": last_bar,
                                           "alphas": list(alphas), "tokens": list(tokens)}))
        self._check(tokens, first_bar, last_bar)
        return [self._gen((1 - a) * np.asarray(z_a) + a * np.asarray(z_b), first_bar, last_bar)
                for a in alphas]

    def vary(self, tokens, first_bar, last_bar, z, delta, *, seed=None):
        self.calls.append(("vary", {"first_bar": first_bar, "last_bar": last_bar,
                                    "delta": delta, "seed": seed, "tokens": list(tokens)}))
        self._check(tokens, first_bar, last_bar)
        eps = np.random.default_rng(seed if seed is not None else 7).standard_normal(self.d_z)
        return self._gen(np.asarray(z) + delta * eps, first_bar, last_bar)

    def info(self) -> dict[str, Any]:
        return {"name": "fake", "backend": "fake", "params": 0, "device": "cpu"}
