"""Ableton Link as the transport: tempo and bar lines follow the session (`--clock link`).

The steps still come from InternalClock's thread on time.monotonic; only the anchor that maps
steps to times comes from Link. Before each step (and on every session change) the clock reads
the session's beat between two time.monotonic() reads (a fraction of a microsecond apart), so
Link's own clock never has to be converted: step s sounds when the session's beat reaches
`origin + s / 4`, where `origin` is a bar line of the session (a multiple of the quantum).

- Tempo: a peer's change re-anchors at once (Link's tempo callback) and at the next step at the
  latest; our own changes (CC 30, MQTT/OSC `tempo`) are committed to the session, so every peer
  follows. Losing all peers changes nothing: Link keeps the session's last tempo and phase.
- Start: bar 1 (step 0) waits for the session's next bar line, like a launch in a Link-enabled
  DAW. With start/stop sync on (`[link] start_stop_sync`), our transport is the session's: a
  peer's play/stop starts/stops us, our start/stop is committed so synced peers follow, and the
  daemon waits for the session to play instead of starting at launch. Peers without start/stop
  sync neither start nor stop us (Link only shares play state between peers that enable it).
- A jump of the session's beat (a peer with another timeline joined) keeps our bar count when
  it is a whole number of bars, and follows the session's phase otherwise.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import mido

from daemon.clock import STEPS_PER_BEAT, ClockEvent, Fire, InternalClock, Post

log = logging.getLogger(__name__)

RESYNC_S = 0.02  # while waiting for the first bar line, re-read the session this often


class LinkUnavailable(ValueError):
    """aalink is missing: the message says how to get it."""


def make_link(bpm: float) -> Any:
    """An aalink.Link bound to the running asyncio loop (its callbacks arrive on the loop)."""
    try:
        import aalink
    except ImportError as e:
        raise LinkUnavailable(
            "--clock link needs the aalink package (Ableton Link): pip install 'aalink>=0.2' "
            "(or choose --clock internal / external)") from e
    return aalink.Link(bpm)


class LinkClock(InternalClock):
    """InternalClock whose anchor (time <-> step) and tempo come from a Link session.

    `link` is an aalink.Link or anything with the same attributes (tests use a fake)."""

    source = "link"

    def __init__(self, bpm: float, fire: Fire, post: Post, *, quantum: float = 4.0,
                 start_stop_sync: bool = True, link: Any | None = None,
                 lookahead_s: float = 0.015, spin_s: float = 0.002,
                 clock_out: Callable[[mido.Message], None] | None = None,
                 realtime: bool = False, now: Callable[[], float] = time.monotonic) -> None:
        super().__init__(bpm, fire, post, lookahead_s=lookahead_s, spin_s=spin_s,
                         clock_out=clock_out, realtime=realtime, now=now)
        self.quantum = float(quantum)
        self.start_stop_sync = start_stop_sync
        self.link = make_link(bpm) if link is None else link
        self.link.quantum = self.quantum
        self.link.start_stop_sync_enabled = start_stop_sync
        self.peers = 0
        self.jumps = 0  # session beat jumps seen while playing
        self._origin = 0.0  # the session beat of our step 0 (a bar line of the session)
        self._armed = False  # False while the thread waits for the first bar line
        self._closed = False
        self._callbacks = [(self.link.add_tempo_callback, self.link.remove_tempo_callback,
                            self._on_tempo),
                           (self.link.add_num_peers_callback,
                            self.link.remove_num_peers_callback, self._on_peers),
                           (self.link.add_start_stop_callback,
                            self.link.remove_start_stop_callback, self._on_start_stop)]
        for add, _, callback in self._callbacks:
            add(callback)
        self.link.enabled = True
        self._sync()
        log.info("link: joined with %.2f bpm, quantum %g, start/stop sync %s", self._bpm,
                 self.quantum, "on" if start_stop_sync else "off")

    # ----- the anchor ------------------------------------------------------------------
    def _sample(self) -> tuple[float, float, float]:
        """(monotonic time, session beat at that time, tempo): the beat read between two
        monotonic reads, so no conversion between Link's clock and ours is needed."""
        t0 = self._now()
        beat = float(self.link.beat)
        t1 = self._now()
        return (t0 + t1) / 2, beat, float(self.link.tempo)

    def _sync(self) -> None:
        """Re-anchor on the session (clock thread before each step, loop on each change)."""
        t, beat, tempo = self._sample()
        with self._lock:
            if self._armed:
                predicted = self._origin + (self._anchor_step + (t - self._anchor_t)
                                            * self._bpm / 60 * STEPS_PER_BEAT) / STEPS_PER_BEAT
                jump = beat - predicted
                if abs(jump) >= self.quantum / 2:
                    # Whole bars: renumbering, keep our bar count. The rest is phase: follow.
                    self._origin += round(jump / self.quantum) * self.quantum
                    self.jumps += 1
                    log.warning("link: the session's beat jumped by %.2f beats (a peer with "
                                "another timeline joined?); following its bar lines", jump)
            self._anchor_t = t
            self._anchor_step = (beat - self._origin) * STEPS_PER_BEAT
            self._bpm = tempo

    @property
    def running(self) -> bool:
        return self._thread is not None and self._armed

    def set_bpm(self, bpm: float) -> None:
        """Our tempo change goes to the session (every peer follows), then re-anchors."""
        self.link.tempo = float(bpm)
        self._sync()
        log.info("link: tempo %.2f bpm sent to the session (%d peers)", bpm, self.peers)

    # ----- transport -------------------------------------------------------------------
    def launch(self) -> None:
        if self.start_stop_sync and not self.link.playing:
            log.info("link: start/stop sync on: waiting for the session to play (or a "
                     "transport start: CC 31, MQTT/OSC transport)")
            return
        self._start(0, commit=False)

    def start(self, step: int = 0) -> None:
        self._start(step, commit=True)

    def _start(self, step: int, *, commit: bool) -> None:
        if self._thread is not None or self._closed:
            return
        if commit and self.start_stop_sync and not self.link.playing:
            self.link.playing = True  # synced peers start too
        self._set_origin(step)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run_link, args=(step,), name="clock",
                                        daemon=True)
        self._thread.start()

    def _set_origin(self, step: int) -> None:
        """`step` will sound on the session's next bar line that its plan can still make."""
        t, beat, tempo = self._sample()
        lead = (self.lookahead_s + 0.01) * tempo / 60  # beats the first plan needs
        with self._lock:
            self._origin = math.ceil((beat + lead) / self.quantum) * self.quantum \
                - step / STEPS_PER_BEAT
            self._anchor_t, self._anchor_step = t, (beat - self._origin) * STEPS_PER_BEAT
            self._bpm = tempo
            self._armed = False

    def _run_link(self, step: int) -> None:
        """Wait (re-reading the session) until a look-ahead before the bar line, then step."""
        while True:
            self._sync()
            deadline = self.ideal_time(step) - self.lookahead_s - 0.005
            left = deadline - self._now()
            if left <= 0:
                break
            if self._stop.wait(min(left, RESYNC_S)):
                return
        with self._lock:
            self._armed = True
        log.info("link: transport starts at step %d on the session's bar line (beat %g)",
                 step, self._origin + step / STEPS_PER_BEAT)
        self._post(ClockEvent("start", step, self.ideal_time(step)))
        self._run(step)

    def stop(self) -> None:
        self._stop_local(commit=True)

    def _stop_local(self, *, commit: bool) -> None:
        if commit and self.start_stop_sync and self.link.playing and not self._closed:
            self.link.playing = False  # synced peers stop too
        thread = self._thread
        if thread is None:
            return
        if self._armed:
            super().stop()  # posts "stop", sends MIDI Stop
        else:  # still waiting for the first bar line: nothing has sounded
            self._stop.set()
            thread.join()
            self._thread = None
        self._armed = False

    # ----- session callbacks (on the asyncio loop) ---------------------------------------
    def _on_tempo(self, tempo: float) -> None:
        if abs(tempo - self._bpm) > 1e-6:
            log.info("link: session tempo %.2f bpm", tempo)
        self._sync()

    def _on_peers(self, peers: int) -> None:
        self.peers = int(peers)
        if self.peers == 0:
            log.info("link: no peers left; keeping %.2f bpm and the phase", self._bpm)
        else:
            log.info("link: %d peer(s) in the session", self.peers)
        self._sync()

    def _on_start_stop(self, playing: bool) -> None:
        """A peer's play/stop (also our own, echoed: both calls below are idempotent)."""
        if not self.start_stop_sync or self._closed or playing != bool(self.link.playing):
            return  # off, closed, or stale (an echo of a state already changed again)
        if playing and self._thread is None:
            log.info("link: the session plays: starting at its next bar line")
            self._start(0, commit=False)
        elif not playing and self._thread is not None:
            log.info("link: the session stopped")
            self._stop_local(commit=False)

    def close(self) -> None:
        if self._closed:
            return
        self._stop_local(commit=False)  # leaving is not a stop for the others
        self._closed = True
        for _, remove, callback in self._callbacks:
            remove(callback)
        self.link.enabled = False
