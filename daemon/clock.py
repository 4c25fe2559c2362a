"""Transport clocks: internal (own timing thread) and external (24 PPQN MIDI clock).

Both drive the same three hooks:
- `fire(step)`: the timing path; sends the notes already planned for `step`. The internal clock
  calls it from its own thread at the step's ideal time (absolute deadlines on time.monotonic,
  sleep then spin; asyncio's timer granularity is far too coarse); the external clock calls it
  on the loop as soon as the step's first tick arrives.
- `ClockEvent`s on an asyncio queue, for the loop side: `plan` (decide step k's notes now, a
  little before it sounds), `step` (k has sounded, at its ideal time), `start` / `stop`.
Steps are absolute (16 per bar from transport start); 6 MIDI clock ticks make a step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import mido

from daemon import rules

log = logging.getLogger(__name__)

TICKS_PER_STEP = 6  # 24 PPQN / 4 sixteenths per quarter
STEPS_PER_BEAT = 4


def step_seconds(bpm: float) -> float:
    return 60.0 / bpm / STEPS_PER_BEAT


@dataclass(frozen=True)
class ClockEvent:
    kind: Literal["plan", "step", "start", "stop"]
    step: int
    time: float  # ideal time of the step (plan/step) or when it happened (start/stop)


Fire = Callable[[int], None]
Post = Callable[[ClockEvent], None]


def queue_poster(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[ClockEvent]) -> Post:
    """A thread-safe `post` that hands events to the loop's queue."""
    def post(event: ClockEvent) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)
    return post


def _try_realtime(priority: int = 5) -> None:
    """Best effort: real-time scheduling for the clock thread (Linux; needs the privilege).

    On a loaded machine the kernel's time slices, not Python, make the late steps. Below
    JACK's own threads (jackd -P 10) so the spin never starves the server."""
    if not hasattr(os, "sched_setscheduler"):
        return
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))  # 0 = this thread
        log.info("clock thread runs with real-time priority %d", priority)
    except (PermissionError, OSError) as e:
        log.info("clock thread without real-time priority (%s)", e)


class InternalClock:
    """Steps at a set tempo from a dedicated thread; optional MIDI clock/start/stop out."""

    source = "internal"

    def __init__(self, bpm: float, fire: Fire, post: Post, *, lookahead_s: float = 0.015,
                 spin_s: float = 0.002, clock_out: Callable[[mido.Message], None] | None = None,
                 realtime: bool = False, now: Callable[[], float] = time.monotonic) -> None:
        self._bpm = bpm
        self.realtime = realtime
        self._fire, self._post, self._clock_out, self._now = fire, post, clock_out, now
        self.lookahead_s, self.spin_s = lookahead_s, spin_s
        self._lock = threading.Lock()
        self._anchor_t = 0.0  # the step `_anchor_step` sounds at `_anchor_t`
        self._anchor_step = 0.0
        self._stopped_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.late_steps = 0  # steps skipped (never played) after a stall

    @property
    def bpm(self) -> float:
        return self._bpm

    @property
    def running(self) -> bool:
        return self._thread is not None

    def ideal_time(self, step: int) -> float:
        with self._lock:
            return self._anchor_t + (step - self._anchor_step) * step_seconds(self._bpm)

    def position(self, now: float | None = None) -> float:
        """Transport position in steps (fractional) at `now`."""
        if not self.running:
            return self._stopped_at
        now = self._now() if now is None else now
        with self._lock:
            return self._anchor_step + (now - self._anchor_t) / step_seconds(self._bpm)

    def set_bpm(self, bpm: float) -> None:
        """Re-anchor at the present position so the tempo changes without a jump."""
        now = self._now()
        with self._lock:
            if self._thread is not None:
                self._anchor_step += (now - self._anchor_t) / step_seconds(self._bpm)
                self._anchor_t = now
            self._bpm = bpm

    def launch(self) -> None:
        """The daemon's start-up: the transport runs from step 0 (daemon/link_clock.py waits
        for the session instead when start/stop sync is on)."""
        self.start(0)

    def _sync(self) -> None:
        """Hook: called on the clock thread before each step's time is computed."""

    def start(self, step: int = 0) -> None:
        if self.running:
            return
        with self._lock:
            # Leave room for the first step's plan to be made before it sounds.
            self._anchor_t = self._now() + self.lookahead_s + 0.01
            self._anchor_step = float(step)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(step,), name="clock",
                                        daemon=True)
        self._post(ClockEvent("start", step, self._anchor_t))
        self._thread.start()

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopped_at = self.position()
        self._stop.set()
        thread.join()
        self._thread = None
        if self._clock_out is not None:
            self._clock_out(mido.Message("stop"))
        self._post(ClockEvent("stop", math.floor(self._stopped_at), self._now()))

    def _wait_until(self, deadline: float) -> bool:
        """Sleep until `spin_s` before the deadline, then spin; False when stopped."""
        while True:
            left = deadline - self._now()
            if left <= 0:
                return not self._stop.is_set()
            if left > self.spin_s:
                if self._stop.wait(left - self.spin_s):
                    return False
                continue
            while self._now() < deadline:  # spin: sleep() wakes up to ~1 ms late
                pass
            return not self._stop.is_set()

    def _run(self, step: int) -> None:
        if self.realtime:
            _try_realtime()
        first = True
        self._post(ClockEvent("plan", step, self.ideal_time(step)))
        while not self._stop.is_set():
            self._sync()  # a clock that follows another timeline (Link) re-anchors here
            ideal = self.ideal_time(step)
            dur = step_seconds(self._bpm)
            if self._now() > ideal + dur / 2:
                # Woken far too late (machine stalled): never play past steps late. Go on with
                # the first step whose plan can still be made the usual look-ahead before it.
                late = step
                step = math.floor(self.position() + self.lookahead_s / dur) + 1
                self.late_steps += step - late
                log.debug("clock: stalled, steps %d..%d skipped", late, step - 1)
                if self._clock_out is not None and not first:
                    # A follower counts ticks for its position: catch up at once, or it would
                    # stay behind by the skipped steps for good.
                    for _ in range((step - late) * TICKS_PER_STEP):
                        self._clock_out(mido.Message("clock"))
                self._post(ClockEvent("plan", step, self.ideal_time(step)))
                continue
            if not self._wait_until(ideal):
                return
            try:
                self._fire(step)
            except Exception:  # a failing send must not end the clock (and strand a note)
                log.exception("clock: sending step %d failed", step)
            if self._clock_out is not None:
                if first:
                    self._clock_out(mido.Message("start" if step == 0 else "continue"))
                self._clock_out(mido.Message("clock"))
            first = False
            self._post(ClockEvent("step", step, ideal))
            # The rest of this step: 5 more clock ticks and the next step's plan, in time order.
            todo: list[tuple[float, str]] = [(ideal + dur - self.lookahead_s, "plan")]
            if self._clock_out is not None:
                todo += [(ideal + j * dur / TICKS_PER_STEP, "tick")
                         for j in range(1, TICKS_PER_STEP)]
            for deadline, what in sorted(todo):
                if not self._wait_until(deadline):
                    return
                if what == "tick":
                    assert self._clock_out is not None
                    self._clock_out(mido.Message("clock"))
                else:
                    self._post(ClockEvent("plan", step + 1, ideal + dur))
            step += 1

    def close(self) -> None:
        self.stop()


class ExternalClock:
    """Follows MIDI clock, Start/Stop/Continue and Song Position Pointer fed from the input.

    `feed` runs on the loop. Tempo is an EMA over beats (24 ticks); `check_dropout` (called
    periodically) stops the transport when no tick came for `dropout_s`.
    """

    source = "external"

    def __init__(self, fire: Fire, post: Post, *, dropout_s: float = 0.5,
                 smoothing: float = 0.2, bpm: float = 120.0,
                 now: Callable[[], float] = time.monotonic) -> None:
        self._fire, self._post, self._now = fire, post, now
        self.dropout_s, self.smoothing = dropout_s, smoothing
        self._bpm = bpm
        self.running = False
        self.ticks = 0  # song position in ticks (6 per step)
        self._last_tick: float | None = None
        self._beat_start: float | None = None
        self._beat_ticks = 0
        self._tempo_known = False

    @property
    def bpm(self) -> float:
        return self._bpm

    def position(self, now: float | None = None) -> float:
        pos = self.ticks / TICKS_PER_STEP
        if self.running and self._last_tick is not None:
            now = self._now() if now is None else now
            # Between ticks, interpolate with the tempo (but never past the next tick).
            tick_s = step_seconds(self._bpm) / TICKS_PER_STEP
            pos += min(max(now - self._last_tick, 0.0) / tick_s, 1.0) / TICKS_PER_STEP
            pos -= 1 / TICKS_PER_STEP  # `ticks` already counts the last tick received
        return max(pos, 0.0)

    def feed(self, msg: mido.Message, t: float) -> None:
        kind = msg.type
        if kind == "clock":
            self._tick(t)
        elif kind == "start":
            self.ticks = 0
            if self.running:  # Start again without Stop: restart the song, like an SPP jump
                self._post(ClockEvent("start", 0, t))
                self._post(ClockEvent("plan", 0, t))
            self._run(t)
        elif kind == "continue":
            self._run(t)
        elif kind == "stop":
            self.stop(t, "Stop received")
        elif kind == "songpos":
            # SPP counts MIDI beats = sixteenth notes = our steps.
            self.ticks = msg.pos * TICKS_PER_STEP
            if self.running:  # a jump while playing: relocate like a fresh start
                self._post(ClockEvent("start", msg.pos, t))
                self._post(ClockEvent("plan", msg.pos, t))

    def _run(self, t: float) -> None:
        if self.running:
            return
        self.running = True
        self._last_tick = t  # the dropout timer starts now, not at an old tick
        step = -(-self.ticks // TICKS_PER_STEP)  # the next step boundary
        self.ticks = step * TICKS_PER_STEP
        self._post(ClockEvent("start", step, t))
        self._post(ClockEvent("plan", step, t))

    def stop(self, t: float, why: str) -> None:
        if not self.running:
            return
        self.running = False
        log.info("external clock: %s at step %.2f", why, self.ticks / TICKS_PER_STEP)
        self._post(ClockEvent("stop", self.ticks // TICKS_PER_STEP, t))

    def _tick(self, t: float) -> None:
        self._measure(t)
        self._last_tick = t
        if not self.running:
            return
        if self.ticks % TICKS_PER_STEP == 0:
            step = self.ticks // TICKS_PER_STEP
            self._fire(step)
            self._post(ClockEvent("step", step, t))
            self._post(ClockEvent("plan", step + 1, t + step_seconds(self._bpm)))
        self.ticks += 1

    def _measure(self, t: float) -> None:
        """Tempo from whole beats (24 ticks), also while stopped (many devices tick always)."""
        if self._last_tick is not None and t - self._last_tick > self.dropout_s:
            self._beat_start, self._beat_ticks = None, 0  # a gap is no tempo
        if self._beat_start is None:
            self._beat_start, self._beat_ticks = t, 0
            return
        self._beat_ticks += 1
        if self._beat_ticks < 24:
            return
        beat = t - self._beat_start
        self._beat_start, self._beat_ticks = t, 0
        if beat <= 0:
            return
        lo, hi = rules.BPM_RANGE  # the tempo a command may set is the tempo we may report
        bpm = min(max(60.0 / beat, lo), hi)
        w = self.smoothing if self._tempo_known else 1.0
        self._bpm = (1 - w) * self._bpm + w * bpm
        self._tempo_known = True

    def check_dropout(self, now: float | None = None) -> bool:
        """Stop if the clock went silent; True when it did."""
        now = self._now() if now is None else now
        if self.running and self._last_tick is not None and now - self._last_tick > self.dropout_s:
            self.stop(now, f"no clock for {self.dropout_s:g} s, transport stopped")
            return True
        return False

    def start(self, step: int = 0) -> None:
        log.warning("external clock: transport follows the clock source; start ignored")

    def set_bpm(self, bpm: float) -> None:
        log.warning("external clock: tempo follows the clock source; set_bpm ignored")

    def close(self) -> None:
        self.running = False
