"""The musical state: 8 bars of tokens, who owns each bar, candidate histories (SPEC 3-4).

No I/O, no asyncio, no torch: the app feeds note events and clock positions in, asks
`output_token(step)` for what the co-performer plays, turns commands into
`GenerationRequest`s (run them with `run_request` away from the timing path) and hands the
engine's results back to `apply`. Positions are absolute transport steps (16 per bar).

- loop: absolute bar b lives in buffer slot b % 8. A bar the player plays into during a pass
  becomes the player's (the co-performer stops there at once) and is rewritten by that take.
- hand-over: a co-performer bar is claimed only by a note onset inside it. A note held over its
  line claims nothing and silences nothing (released within the quantizer's tolerance of the
  line it never even sounds there); in an empty or player bar a held note records as usual.
- follow: the buffer is the window of the last 8 bars (slot 7 = the bar now playing) and rolls
  at each bar line. A regenerate of N bars targets the N bars after the next bar line; they
  wait in `_upcoming` until the window rolls onto them.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, replace
from typing import Any

from daemon.history import (
    MAX_SEED,
    GenerationRequest,
    History,
    HistoryError,
    PerformanceError,
    RequestError,
    ResultError,
    StaleRequestError,
    candidate_from,
    check_bars,
    is_number,
    run_request,
)
from daemon.quantize import Quantizer, check_midi, check_position
from engine.tokens import HOLD, N_BARS, REST, SEQ_LEN, STEPS_PER_BAR, is_pitch

log = logging.getLogger(__name__)

MODES = ("loop", "follow")
KINDS = ("regenerate", "interpolate", "vary")
_PARAMS = {
    "regenerate": {"seed", "temperature", "first_bar", "bars"},
    "interpolate": {"alpha"},
    "vary": {"delta", "seed"},
}

__all__ = [
    "Bar", "GenerationRequest", "HistoryError", "Performance", "PerformanceError",
    "RequestError", "ResultError", "StaleRequestError", "run_request",
]


@dataclass
class Bar:
    tokens: list[int]
    owner: str  # player | coperformer | empty
    version: int


class Performance:
    def __init__(
        self,
        *,
        mode: str = "loop",
        polyphony: str = "highest",
        record: bool = True,
        target: tuple[int, int] = (1, 1),
        max_hold_bars: int = 4,
    ) -> None:
        if mode not in MODES:
            raise RequestError(f"mode must be 'loop' or 'follow', not {mode!r}")
        self._quant = Quantizer(polyphony, max_hold_bars)
        self.mode = mode
        self.record = bool(record)
        self._target = check_bars(*target)
        self._versions = 0
        self._slots = [self._empty() for _ in range(N_BARS)]
        self._base = -(N_BARS - 1)  # follow: absolute bar of slot 0
        self._upcoming: dict[int, Bar] = {}  # follow: absolute bar -> bar not yet in the window
        self._touched: set[int] = set()  # absolute bars the player is recording into
        self._recent: dict[int, int] = {}  # absolute step -> final token, last two bars
        self._position = 0.0
        self._histories: dict[tuple, History] = {}
        self._follow_key: tuple | None = None  # follow: history of the latest response
        self.alpha = 0.0
        self.delta = 0.0
        self._serial = 0
        self._epoch = 0

    # ----- bars -------------------------------------------------------------------------
    def _new_version(self) -> int:
        self._versions += 1
        return self._versions

    def _empty(self) -> Bar:
        return Bar([REST] * STEPS_PER_BAR, "empty", self._new_version())

    @property
    def current_bar(self) -> int:
        """Absolute (0-based) bar of the transport position."""
        return int(self._position // STEPS_PER_BAR)

    def _bar_at(self, abs_bar: int, create: bool = False) -> Bar | None:
        if self.mode == "loop":
            return self._slots[abs_bar % N_BARS]
        if self._base <= abs_bar < self._base + N_BARS:
            return self._slots[abs_bar - self._base]
        if abs_bar >= self._base + N_BARS:
            if create and abs_bar not in self._upcoming:
                self._upcoming[abs_bar] = self._empty()
            return self._upcoming.get(abs_bar)
        return None  # rolled out of the window

    def _recording(self, abs_bar: int) -> bool:
        if self.mode == "loop":
            return any(b % N_BARS == abs_bar % N_BARS for b in self._touched)
        return abs_bar in self._touched

    def _touch(self, abs_bar: int) -> None:
        """The player plays into this bar: it becomes theirs and their take rewrites it."""
        if abs_bar in self._touched:
            return
        bar = self._bar_at(abs_bar, create=True)
        if bar is None:
            return
        first = abs_bar * STEPS_PER_BAR
        # Steps of this take already final in the bar (a note held over its line) stay.
        bar.tokens[:] = [self._recent.get(first + i, REST) for i in range(STEPS_PER_BAR)]
        bar.owner, bar.version = "player", self._new_version()
        self._touched.add(abs_bar)

    def _write(self, step: int, token: int) -> None:
        abs_bar = step // STEPS_PER_BAR
        self._recent[step] = token
        self._recent.pop(step - 2 * STEPS_PER_BAR, None)
        bar = self._bar_at(abs_bar)
        # Only an onset (note_on) claims a co-performer bar; sound held over its line does not.
        if token != REST and (bar is None or bar.owner != "coperformer"):
            self._touch(abs_bar)
        if abs_bar in self._touched and (bar := self._bar_at(abs_bar)) is not None:
            bar.tokens[step % STEPS_PER_BAR] = token

    def _roll(self) -> None:
        while self._base + N_BARS - 1 < self.current_bar:
            self._slots.pop(0)
            self._base += 1
            self._slots.append(self._upcoming.pop(self._base + N_BARS - 1, None) or self._empty())
        self._upcoming = {b: bar for b, bar in self._upcoming.items() if b >= self._base + N_BARS}
        # A response whose bars have all rolled out can never be heard again.
        gone = [k for k in self._histories if k[0] == "follow" and k[1] + k[2] <= self._base]
        for key in gone:
            del self._histories[key]
        if self._follow_key in gone:
            self._follow_key = None

    # ----- player input and clock -------------------------------------------------------
    def note_on(self, pitch: int, velocity: int, position: float) -> None:
        check_midi("pitch", pitch)
        check_midi("velocity", velocity)
        check_position(position)
        if not self.record:
            return
        step = self._quant.note_on(pitch, velocity, position)
        if velocity > 0:
            self._touch(step // STEPS_PER_BAR)

    def note_off(self, pitch: int, position: float) -> None:
        check_midi("pitch", pitch)
        check_position(position)
        if self.record:
            self._quant.note_off(pitch, position)

    def advance(self, position: float) -> None:
        """Called by the clock every step: finalizes quantized steps, rolls the follow window."""
        position = check_position(position)
        if position < self._position or position > self._position + STEPS_PER_BAR:
            self.relocate(position)
            return
        self._position = position
        if self.mode == "follow":
            self._roll()
        for step, token in self._quant.advance(position):
            self._write(step, token)
        # Bars whose steps are all final can take no more of this take.
        done = self._quant.next_step // STEPS_PER_BAR
        self._touched = {b for b in self._touched if b >= done}

    def relocate(self, position: float) -> None:
        """Transport start / song position jump: held notes are dropped, the window re-based."""
        position = check_position(position)
        self._quant.reset(position)
        self._touched.clear()
        self._recent.clear()
        self._position = position
        if self.mode == "follow":
            # Pending responses were placed on the old timeline.
            self._base = self.current_bar - (N_BARS - 1)
            self._upcoming.clear()
            self._histories.clear()
            self._follow_key = None
            self._epoch += 1

    def stop(self) -> None:
        """Transport stop: notes still held are ended where the transport stopped."""
        for step, token in self._quant.release_all(self._position):
            self._write(step, token)
        self._touched.clear()

    def set_record(self, on: bool) -> None:
        if not isinstance(on, bool):
            raise RequestError(f"record must be true or false, got {on!r}")
        if self.record and not on:
            self.stop()
        self.record = on

    def output_token(self, step: int) -> tuple[int, int, int | None] | None:
        """What the co-performer plays at `step`: (token, content version, the pitch token of
        the note the step is in: the token itself, the onset a hold continues, or None)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise RequestError(f"step must be an int >= 0, got {step!r}")
        bar = self._playing(step)
        if bar is None:
            return None
        token = bar.tokens[step % STEPS_PER_BAR]
        note = token if is_pitch(token) else None
        onset = step
        while token == HOLD and onset > 0 and onset > step - SEQ_LEN:
            onset -= 1  # back through the same content (a held note spans its bars)
            before = self._playing(onset)
            if before is None or before.version != bar.version:
                break
            if (t := before.tokens[onset % STEPS_PER_BAR]) != HOLD:
                note = t if is_pitch(t) else None
                break
        return token, bar.version, note

    def _playing(self, step: int) -> Bar | None:
        abs_bar = step // STEPS_PER_BAR
        bar = self._bar_at(abs_bar)
        if bar is None or bar.owner != "coperformer" or abs_bar in self._touched:
            return None
        return bar

    # ----- mode, target, clear ----------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        """Keeps the music (re-mapped so the bar now playing stays put), drops what is pending."""
        if mode not in MODES:
            raise RequestError(f"mode must be 'loop' or 'follow', not {mode!r}")
        if mode == self.mode:
            return
        self.stop()
        cur = self.current_bar
        window = range(cur - (N_BARS - 1), cur + 1)
        if mode == "follow":
            self._slots = [self._slots[b % N_BARS] for b in window]
            self._base = window.start
        else:
            slots = list(self._slots)
            for b in range(self._base, self._base + N_BARS):
                slots[b % N_BARS] = self._slots[b - self._base]
            self._slots = slots
        self.mode = mode
        self._upcoming.clear()
        self._histories.clear()
        self._follow_key = None
        self._epoch += 1

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
        check_bars(1, length)
        if isinstance(first, bool) or not isinstance(first, int) or not 1 <= first <= N_BARS:
            raise RequestError(f"first_bar must be an int 1..{N_BARS}, got {first!r}")
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

    # ----- generation -------------------------------------------------------------------
    def buffer_tokens(self) -> list[int]:
        return [t for bar in self._slots for t in bar.tokens]

    def history(self) -> History | None:
        key = self._history_key()
        return self._histories.get(key) if key else None

    def make_request(self, kind: str, **params: Any) -> GenerationRequest:
        if kind not in KINDS:
            raise RequestError(f"unknown request kind {kind!r}; expected one of {KINDS}")
        unknown = set(params) - _PARAMS[kind]
        if unknown:
            raise RequestError(f"{kind}: unknown parameter(s) {sorted(unknown)}")
        seed = params.get("seed")
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
        ):
            raise RequestError(f"seed must be an int 0..{MAX_SEED} or None, got {seed!r}")
        if kind == "regenerate":
            return self._regenerate_request(params)
        hist = self.history()
        if hist is None or hist.current is None:
            raise HistoryError(f"{kind} needs a current candidate: regenerate first")
        tokens = hist.context if self.mode == "follow" else tuple(self.buffer_tokens())
        if kind == "interpolate":
            alpha = params.get("alpha")
            if not is_number(alpha) or not 0.0 <= alpha <= 1.0:
                raise RequestError(f"alpha must be a number 0..1, got {alpha!r}")
            a, b = hist.anchors()  # raises HistoryError with fewer than two
            out = {"alpha": float(alpha), "z_a": a.z, "z_b": b.z, "anchors": (a.cid, b.cid)}
        else:
            delta = params.get("delta")
            if not is_number(delta) or delta < 0:
                raise RequestError(f"delta must be a number >= 0, got {delta!r}")
            parent = hist.vary_parent()
            if seed is None:
                # One direction per parent (the engine draws a fresh eps on None): a delta
                # sweep moves away from the candidate instead of jumping between variations.
                seed = zlib.crc32(repr((hist.key, parent.cid)).encode()) % (MAX_SEED + 1)
            out = {"delta": float(delta), "seed": seed, "z": parent.z, "parent": parent.cid}
        return self._request(kind, tokens, hist.first_bar, hist.last_bar, out, hist.key)

    def _regenerate_request(self, params: dict[str, Any]) -> GenerationRequest:
        temperature = params.get("temperature")
        if temperature is not None and (not is_number(temperature) or temperature < 0):
            raise RequestError(f"temperature must be a number >= 0, got {temperature!r}")
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

    def next_alpha(self, direction: int, steps: int) -> float:
        """Alpha one interpolation step (1/J) further, clamped to 0..1."""
        if direction not in (-1, 1) or isinstance(direction, bool):
            raise RequestError(f"direction must be -1 or 1, got {direction!r}")
        return min(1.0, max(0.0, round(self.alpha + direction / steps, 6)))

    def snapshot(self) -> dict[str, Any]:
        hist = self.history()
        first, bars = self.target
        tokens = self.buffer_tokens()
        assert len(tokens) == SEQ_LEN
        return {
            "mode": self.mode,
            "record": self.record,
            "polyphony": self._quant.polyphony,
            "tokens": tokens,
            "owners": [b.owner for b in self._slots],
            "target": {"first_bar": first, "bars": bars},
            "alpha": self.alpha,
            "delta": self.delta,
            "history": {
                "length": len(hist.candidates) if hist else 0,
                "index": hist.index if hist else -1,
            },
            "upcoming_bars": sorted(b - self._base + 1 for b in self._upcoming),
        }
