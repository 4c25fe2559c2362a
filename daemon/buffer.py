"""The musical state: 8 bars of tokens, who owns each bar, candidate histories (SPEC 3-4).

Targets, requests and candidate histories are in daemon/targets.py (mixed into Performance).

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
from typing import Any

from daemon import rules
from daemon.history import (
    Bar,
    GenerationRequest,
    History,
    HistoryError,
    PerformanceError,
    RequestError,
    ResultError,
    StaleRequestError,
    check_bars,
    checked,
    run_request,
)
from daemon.quantize import Quantizer, check_midi, check_position
from daemon.targets import KINDS, Targets
from engine.tokens import HOLD, N_BARS, REST, SEQ_LEN, STEPS_PER_BAR, is_pitch

log = logging.getLogger(__name__)

__all__ = [
    "KINDS", "Bar", "GenerationRequest", "HistoryError", "Performance", "PerformanceError",
    "RequestError", "ResultError", "StaleRequestError", "run_request",
]


class Performance(Targets):
    def __init__(
        self,
        *,
        mode: str = "loop",
        polyphony: str = "highest",
        record: bool = True,
        target: tuple[int, int] = (1, 1),
        max_hold_bars: int = 4,
    ) -> None:
        checked(rules.MODE, "mode", mode)
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
        checked(rules.ON_OFF, "record", on)
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
        checked(rules.MODE, "mode", mode)
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

    def buffer_tokens(self) -> list[int]:
        return [t for bar in self._slots for t in bar.tokens]

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
