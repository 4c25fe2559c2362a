"""Targets and their candidate histories: requests to the engine and what comes back (SPEC 3-4).

The generation half of `daemon.buffer.Performance` (a mixin over its bars): which bars are the
target, the `GenerationRequest` a command makes (a snapshot of the buffer, the target, the
history's anchors), and `apply` / `undo` / `clear`, which write a history's current entry (or
the bars it replaced) into the bars. Nothing here runs the engine: `run_request` does that,
away from the timing path.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from daemon import rules
from daemon.history import (
    MAX_SEED,
    Bar,
    GenerationRequest,
    History,
    HistoryError,
    RequestError,
    ResultError,
    StaleRequestError,
    candidate_from,
    check_bars,
    checked,
)
from engine.tokens import N_BARS, REST, STEPS_PER_BAR

log = logging.getLogger(__name__)

KINDS = ("regenerate", "interpolate", "vary")
_PARAMS = {
    "regenerate": {"seed", "temperature", "first_bar", "bars"},
    "interpolate": {"alpha"},
    "vary": {"delta", "seed"},
}


class Targets:
    """Mixin: needs the bars of `daemon.buffer.Performance` (declared below)."""

    mode: str
    alpha: float
    delta: float
    _target: tuple[int, int]
    _histories: dict[tuple, History]
    _follow_key: tuple | None
    _serial: int
    _epoch: int
    _base: int

    if TYPE_CHECKING:  # provided by Performance (declared only for readers and checkers)
        current_bar: int

        def _bar_at(self, abs_bar: int, create: bool = False) -> Bar | None: ...
        def _recording(self, abs_bar: int) -> bool: ...
        def _new_version(self) -> int: ...
        def _empty(self) -> Bar: ...
        def buffer_tokens(self) -> list[int]: ...

    @property
    def target(self) -> tuple[int, int]:
        """(first_bar, bars) in buffer bars; follow mode always targets the last bars."""
        first, bars = self._target
        return (N_BARS + 1 - bars, bars) if self.mode == "follow" else (first, bars)

    def set_target(self, first_bar: int, bars: int) -> None:
        self._target = check_bars(first_bar, bars)

    def update_target(self, first_bar: int | None = None, bars: int | None = None) -> None:
        """Knob-friendly: missing values keep the current ones, the start moves to fit."""
        first = self._target[0] if first_bar is None else first_bar
        length = self._target[1] if bars is None else bars
        length = checked(rules.BARS, "bars", length)
        first = checked(rules.FIRST_BAR, "first_bar", first)
        self._target = (min(first, N_BARS + 1 - length), length)

    def _history_key(self) -> tuple | None:
        if self.mode == "loop":
            first, bars = self._target
            return ("loop", first, first + bars - 1)
        return self._follow_key

    def _abs_bars(self, key: tuple) -> list[int]:
        """Absolute bars (loop: slot numbers) a history's target covers."""
        if key[0] == "loop":
            return list(range(key[1] - 1, key[2]))
        return list(range(key[1], key[1] + key[2]))

    def clear(self, first_bar: int | None = None, bars: int | None = None) -> int:
        """Removes co-performer content (the player's bars stay); returns bars cleared."""
        if first_bar is None:
            if bars is not None:
                raise RequestError("clear: 'bars' needs 'first_bar'")
            key = self._history_key()
            abs_bars = self._abs_bars(key) if key else []
        else:
            first_bar, bars = check_bars(first_bar, 1 if bars is None else bars)
            start = 0 if self.mode == "loop" else self._base
            abs_bars = [start + b - 1 for b in range(first_bar, first_bar + bars)]
        cleared = 0
        for abs_bar in abs_bars:
            bar = self._bar_at(abs_bar)
            if bar is not None and bar.owner == "coperformer":
                bar.tokens[:] = [REST] * STEPS_PER_BAR
                bar.owner, bar.version = "empty", self._new_version()
                cleared += 1
        return cleared

    def history(self) -> History | None:
        key = self._history_key()
        return self._histories.get(key) if key else None

    def make_request(self, kind: str, **params: Any) -> GenerationRequest:
        if kind not in KINDS:
            raise RequestError(f"unknown request kind {kind!r}; expected one of {KINDS}")
        unknown = set(params) - _PARAMS[kind]
        if unknown:
            raise RequestError(f"{kind}: unknown parameter(s) {sorted(unknown)}")
        seed = checked(rules.SEED, "seed", params.get("seed"))
        if kind == "regenerate":
            return self._regenerate_request(params)
        hist = self.history()
        if hist is None or hist.current is None:
            raise HistoryError(f"{kind} needs a current candidate: regenerate first")
        tokens = hist.context if self.mode == "follow" else tuple(self.buffer_tokens())
        if kind == "interpolate":
            alpha = checked(rules.ALPHA, "alpha", params.get("alpha"))
            a, b = hist.anchors()  # raises HistoryError with fewer than two
            out = {"alpha": float(alpha), "z_a": a.z, "z_b": b.z, "anchors": (a.cid, b.cid)}
        else:
            delta = checked(rules.DELTA, "delta", params.get("delta"))
            parent = hist.vary_parent()
            if seed is None:
                # One direction per parent (the engine draws a fresh eps on None): a delta
                # sweep moves away from the candidate instead of jumping between variations.
                seed = zlib.crc32(repr((hist.key, parent.cid)).encode()) % (MAX_SEED + 1)
            out = {"delta": float(delta), "seed": seed, "z": parent.z, "parent": parent.cid}
        return self._request(kind, tokens, hist.first_bar, hist.last_bar, out, hist.key)

    def _regenerate_request(self, params: dict[str, Any]) -> GenerationRequest:
        temperature = params.get("temperature")
        if temperature is not None:
            temperature = checked(rules.TEMPERATURE, "temperature", temperature)
        first, bars = self.target
        if "first_bar" in params or "bars" in params:
            first = params.get("first_bar", first)
            length = params.get("bars", bars)
            if self.mode == "follow" and "first_bar" not in params and isinstance(length, int):
                # Follow mode has no start bar (the target ends at bar 8): only the length moves.
                first = min(self._target[0], N_BARS + 1 - length)
            first, bars = check_bars(first, length)
            self._target = (first, bars)  # validated: only now does the state change
            first, bars = self.target
        out = {"seed": params.get("seed"), "temperature": temperature}
        buffer = self.buffer_tokens()
        if self.mode == "loop":
            key = ("loop", first, first + bars - 1)
            return self._request("regenerate", tuple(buffer), first, first + bars - 1, out, key)
        # Follow: the N bars after the next bar line, from the 8-N bars before it.
        anchor = self.current_bar + 1
        tokens = tuple(buffer[bars * STEPS_PER_BAR :] + [REST] * (bars * STEPS_PER_BAR))
        return self._request("regenerate", tokens, first, N_BARS, out, ("follow", anchor, bars))

    def _request(self, kind, tokens, first, last, params, key) -> GenerationRequest:
        self._serial += 1
        hist = self._histories.get(key)
        known = frozenset(c.tokens for c in hist.candidates) if hist else frozenset()
        return GenerationRequest(kind, tokens, first, last, params, self._serial, self._epoch,
                                 key, known)

    def is_duplicate(self, tokens: Any, request: GenerationRequest | None = None) -> bool:
        """Is this roll identical to a candidate already in the history (re-roll rule)?"""
        if request is not None:
            return tuple(int(t) for t in tokens) in request.known
        hist = self.history()
        return hist is not None and tuple(int(t) for t in tokens) in hist.known()

    def apply(self, request: GenerationRequest, generations: list[Any]) -> None:
        """Adds the engine's result(s) to the target's history and makes the last one current."""
        if not isinstance(request, GenerationRequest):
            raise ResultError(f"apply needs a GenerationRequest, got {type(request).__name__}")
        if request.epoch != self._epoch:
            raise StaleRequestError(
                f"result of request #{request.serial} is stale (mode changed or transport "
                "relocated since); dropped"
            )
        if not generations:
            raise ResultError(f"request #{request.serial}: no generations to apply")
        cands = [candidate_from(request, g) for g in generations]  # validate all first
        hist = self._histories.get(request.key)
        if hist is None:
            base = [replace(b, tokens=list(b.tokens)) for b in self._bars_of(request.key)]
            hist = History(request.key, request.first_bar, request.last_bar, request.tokens, base)
            self._histories[request.key] = hist
        for cand in cands:
            hist.add(cand)
        if request.key[0] == "follow":
            self._follow_key = request.key
        self._show(hist)

    def _bars_of(self, key: tuple) -> list[Bar]:
        bars = [self._bar_at(b, create=True) for b in self._abs_bars(key)]
        return [b if b is not None else self._empty() for b in bars]

    def _show(self, hist: History) -> None:
        """Write the history's current entry (or the base) into its bars."""
        version = self._new_version()  # one version over all bars: a held note spans them
        cand = hist.current
        for i, abs_bar in enumerate(self._abs_bars(hist.key)):
            bar = self._bar_at(abs_bar, create=True)
            if bar is None or self._recording(abs_bar):
                log.debug("candidate bar %d not shown: rolled out or being recorded", abs_bar)
                continue  # gone by, or the player is playing there right now
            if cand is None:
                old = hist.base[i]
                bar.tokens[:], bar.owner = list(old.tokens), old.owner
            else:
                bar.tokens[:] = cand.tokens[i * STEPS_PER_BAR : (i + 1) * STEPS_PER_BAR]
                bar.owner = "coperformer"
            bar.version = version
        if cand is not None:
            self.alpha = cand.alpha if cand.alpha is not None else self.alpha
            self.delta = cand.delta if cand.delta is not None else self.delta

    def undo(self) -> bool:
        """Back one candidate (past the first: what the bars held before); False = nothing."""
        hist = self.history()
        if hist is None or not hist.undo():
            return False
        self._show(hist)
        return True

    def select(self, index: int) -> int:
        """Candidate `index` (1-based, as the page lists them) becomes current; 0 = the bars as
        they were before the first candidate (like undoing past it)."""
        hist = self.history()
        if hist is None:
            raise HistoryError("select needs candidates for the target: regenerate first")
        n = len(hist.candidates)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= n:
            raise HistoryError(f"candidate {index!r} does not exist: the target has {n} "
                               "candidate(s), 1..n (0 = the bars before them)")
        hist.index = index - 1
        self._show(hist)
        return index

    def next_alpha(self, direction: int, steps: int) -> float:
        """Alpha one interpolation step (1/J) further, clamped to 0..1."""
        if direction not in (-1, 1) or isinstance(direction, bool):
            raise RequestError(f"direction must be -1 or 1, got {direction!r}")
        return min(1.0, max(0.0, round(self.alpha + direction / steps, 6)))
