"""Generation requests, their checked results, and the candidate history of one target.

Candidate history of one target (SPEC section 3): regenerate adds, interpolate moves
between two candidates, vary perturbs the current one, undo goes back.

A knob sweeps alpha or delta through many values: an interpolation (vary) result replaces
the current entry when that entry is an interpolation between the same two candidates (a
variation of the same parent), so one sweep is one undo step, not fifty.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from daemon import rules
from daemon.rules import MAX_SEED
from engine.tokens import N_SYMBOLS, STEPS_PER_BAR

log = logging.getLogger(__name__)

class PerformanceError(ValueError):
    """Any refused operation on the performance; the state is left unchanged."""


class RequestError(PerformanceError):
    """make_request / set_target / clear / set_mode got something it cannot do."""


class HistoryError(PerformanceError):
    """Nothing to interpolate between, vary or undo."""


class StaleRequestError(PerformanceError):
    """A result for a request made before a mode change or relocation."""


class ResultError(PerformanceError):
    """Generations that do not fit their request (length, range, bars)."""


@dataclass
class Bar:
    """One bar of the buffer (also what a history keeps of the bars a candidate replaced)."""

    tokens: list[int]
    owner: str  # player | coperformer | empty
    version: int  # content version: changes whenever what the bar plays changes


@dataclass(frozen=True)
class GenerationRequest:
    kind: str  # regenerate | interpolate | vary
    tokens: tuple[int, ...]  # the 128-token snapshot (target positions: placeholders)
    first_bar: int  # buffer bars, 1-based inclusive, as the engine sees them
    last_bar: int
    params: dict[str, Any]  # seed, temperature | alpha, z_a, z_b | delta, seed, z
    serial: int  # increases with every request of this Performance
    epoch: int  # results of an older epoch (mode change, relocation) are stale
    key: tuple  # which candidate history the result belongs to
    known: frozenset[tuple[int, ...]] = field(default=frozenset())  # for the re-roll rule

    @property
    def bars(self) -> int:
        return self.last_bar - self.first_bar + 1


def checked(rule: rules.Rule, name: str, value: Any) -> Any:
    """`value` by its rule in `daemon.rules` (the same rule commands are checked with)."""
    try:
        return rule(name, value)
    except rules.RuleError as err:
        raise RequestError(str(err)) from None


def check_bars(first_bar: Any, bars: Any) -> tuple[int, int]:
    try:
        return rules.check_target(first_bar, bars)
    except rules.RuleError as err:
        raise RequestError(str(err)) from None


@dataclass
class Candidate:
    tokens: tuple[int, ...]  # the target's tokens
    z: Any  # latent (numpy array from the engine)
    kind: str  # regenerate | interpolate | vary
    alpha: float | None = None  # interpolate: where between anchors A and B
    delta: float | None = None  # vary: how far from the parent
    anchors: tuple[int, int] | None = None  # interpolate: cids of A and B
    parent: int | None = None  # vary: cid of the candidate it perturbs
    cid: int = 0  # id within its history


@dataclass
class History:
    key: tuple  # ("loop", first_bar, last_bar) | ("follow", first absolute bar, bars)
    first_bar: int  # buffer bars the engine was asked for
    last_bar: int
    context: tuple[int, ...]  # the tokens the first request was made from
    base: list[Bar]  # the bars before the first candidate (undo past it restores them)
    candidates: list[Candidate] = field(default_factory=list)
    index: int = -1  # -1 = the base
    _next_cid: int = 0

    @property
    def current(self) -> Candidate | None:
        return self.candidates[self.index] if self.index >= 0 else None

    def known(self) -> set[tuple[int, ...]]:
        return {c.tokens for c in self.candidates}

    def by_cid(self, cid: int) -> Candidate | None:
        return next((c for c in self.candidates if c.cid == cid), None)

    def add(self, cand: Candidate) -> None:
        self._next_cid += 1
        cand.cid = self._next_cid
        cur = self.current
        sweep = cur is not None and cur.kind == cand.kind and (
            (cand.kind == "interpolate" and cur.anchors == cand.anchors)
            or (cand.kind == "vary" and cur.parent == cand.parent)
        )
        if sweep:
            self.candidates[self.index] = cand
        else:
            self.candidates.append(cand)
            self.index = len(self.candidates) - 1

    def undo(self) -> bool:
        if self.index < 0:
            return False
        self.index -= 1
        return True

    def anchors(self) -> tuple[Candidate, Candidate]:
        """A, B = the two latest distinct non-interpolated candidates up to the current one."""
        found: list[Candidate] = []
        for cand in reversed(self.candidates[: self.index + 1]):
            if cand.kind != "interpolate" and all(cand.tokens != f.tokens for f in found):
                found.append(cand)
                if len(found) == 2:
                    return found[1], found[0]
        raise HistoryError("interpolate needs two different candidates: regenerate again first")

    def vary_parent(self) -> Candidate:
        """Variations perturb the current candidate; a variation's own parent if it is one,
        so a delta sweep moves away from one candidate instead of drifting."""
        cur = self.current
        if cur is None:
            raise HistoryError("vary needs a current candidate: regenerate first")
        if cur.kind == "vary" and cur.parent is not None:
            return self.by_cid(cur.parent) or cur
        return cur


def candidate_from(request: GenerationRequest, gen: Any) -> Candidate:
    """Check one engine result against its request (duck-typed Generation)."""
    tokens = getattr(gen, "tokens", None)
    if tokens is None:
        raise ResultError(f"request #{request.serial}: result has no tokens")
    tokens = tuple(int(t) for t in tokens)
    want = request.bars * STEPS_PER_BAR
    if len(tokens) != want:
        raise ResultError(f"request #{request.serial}: {len(tokens)} tokens, expected {want}")
    if any(not 0 <= t < N_SYMBOLS for t in tokens):
        raise ResultError(f"request #{request.serial}: tokens outside 0..{N_SYMBOLS - 1}")
    got = (getattr(gen, "first_bar", request.first_bar), getattr(gen, "last_bar",
                                                                   request.last_bar))
    if got != (request.first_bar, request.last_bar):
        raise ResultError(f"request #{request.serial}: result is for bars {got}, expected "
                          f"{(request.first_bar, request.last_bar)}")
    p = request.params
    return Candidate(tokens, getattr(gen, "z", None), request.kind, alpha=p.get("alpha"),
                     delta=p.get("delta"), anchors=p.get("anchors"), parent=p.get("parent"))


def run_request(engine: Any, request: GenerationRequest, *, retries: int = 3) -> list[Any]:
    """Run a request on an engine (synchronous; call it off the timing path).

    Regenerate applies the re-roll rule: a roll identical to a candidate already in the
    history is drawn again with another seed, up to `retries` more times.
    """
    p, args = request.params, (request.tokens, request.first_bar, request.last_bar)
    if request.kind == "interpolate":
        return list(engine.interpolate(*args, p["z_a"], p["z_b"], [p["alpha"]]))
    if request.kind == "vary":
        return [engine.vary(*args, p["z"], p["delta"], seed=p.get("seed"))]
    seed = p.get("seed")
    gen = None
    for attempt in range(retries + 1):
        try_seed = None if seed is None else (seed + 7919 * attempt) % (MAX_SEED + 1)
        gen = engine.infill(*args, seed=try_seed, temperature=p.get("temperature"))
        if tuple(int(t) for t in gen.tokens) not in request.known:
            return [gen]
        log.info("re-roll: seed %s gave a candidate already in the history", try_seed)
    return [gen]
