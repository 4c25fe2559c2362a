"""LinkClock against a fake Link session (no network): anchor, bar lines, tempo, start/stop.

The two-peer tests over a real Link session (in a private network namespace) are in
tests/test_link.py.
"""

from __future__ import annotations

import threading
import time

import pytest

from daemon.clock import ClockEvent, step_seconds
from daemon.link_clock import LinkClock


class FakeLink:
    """A Link session: beat = beat0 + (now - t0) * tempo / 60, continuous at tempo changes."""

    def __init__(self, now, tempo: float = 120.0, beat0: float = 0.0) -> None:
        self._now = now
        self._t0, self._beat0, self._tempo = now(), beat0, tempo
        self.quantum = 1.0
        self.enabled = False
        self.start_stop_sync_enabled = False
        self.playing = False
        self.num_peers = 0
        self.callbacks: dict[str, list] = {"tempo": [], "peers": [], "play": []}

    @property
    def beat(self) -> float:
        return self._beat0 + (self._now() - self._t0) * self._tempo / 60

    @property
    def tempo(self) -> float:
        return self._tempo

    @tempo.setter
    def tempo(self, bpm: float) -> None:  # Link: the beat stays continuous at the change
        self._beat0, self._t0, self._tempo = self.beat, self._now(), bpm

    def jump(self, beats: float) -> None:
        self._beat0 += beats

    def add_tempo_callback(self, f) -> None:
        self.callbacks["tempo"].append(f)

    def remove_tempo_callback(self, f) -> None:
        self.callbacks["tempo"].remove(f)

    def add_num_peers_callback(self, f) -> None:
        self.callbacks["peers"].append(f)

    def remove_num_peers_callback(self, f) -> None:
        self.callbacks["peers"].remove(f)

    def add_start_stop_callback(self, f) -> None:
        self.callbacks["play"].append(f)

    def remove_start_stop_callback(self, f) -> None:
        self.callbacks["play"].remove(f)


class Events:
    def __init__(self) -> None:
        self.fired: list[tuple[int, float]] = []
        self.events: list[ClockEvent] = []
        self.lock = threading.Lock()

    def fire(self, step: int) -> None:
        with self.lock:
            self.fired.append((step, time.monotonic()))

    def post(self, ev: ClockEvent) -> None:
        with self.lock:
            self.events.append(ev)

    def kinds(self, kind: str) -> list[int]:
        with self.lock:
            return [e.step for e in self.events if e.kind == kind]


class ManualTime:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(now=time.monotonic, **kw):
    link = FakeLink(now, **{k: kw.pop(k) for k in ("tempo", "beat0") if k in kw})
    ev = Events()
    clock = LinkClock(120.0, ev.fire, ev.post, link=link, now=now, **kw)
    return clock, link, ev


def test_joins_the_session_with_quantum_and_tempo() -> None:
    clock, link, _ = make(tempo=97.0)
    assert link.enabled and link.quantum == 4.0 and link.start_stop_sync_enabled
    assert clock.bpm == 97.0 and clock.source == "link"
    clock.close()
    assert not link.enabled and all(not cbs for cbs in link.callbacks.values())


def test_step_zero_is_the_sessions_next_bar_line() -> None:
    now = ManualTime()
    clock, link, _ = make(now, tempo=120.0, beat0=5.3, start_stop_sync=False)
    clock._set_origin(0)  # what start(0) does before its thread waits for the bar line
    # beat 5.3 now: the next bar line (quantum 4) is beat 8, 2.7 beats = 1.35 s away.
    assert clock.ideal_time(0) == pytest.approx(now.t + 1.35)
    assert clock.ideal_time(16) == pytest.approx(now.t + 1.35 + 2.0)  # bar 2 on beat 12


def test_too_close_a_bar_line_waits_for_the_next_one() -> None:
    now = ManualTime()
    clock, link, _ = make(now, tempo=120.0, beat0=3.99, start_stop_sync=False)
    clock._set_origin(0)
    assert clock.ideal_time(0) == pytest.approx(now.t + (8 - 3.99) * 0.5)


def test_a_peers_tempo_change_re_anchors_without_a_jump() -> None:
    now = ManualTime()
    clock, link, _ = make(now, tempo=120.0, beat0=0.0, start_stop_sync=False)
    clock._set_origin(0)
    clock._armed, clock._thread = True, threading.current_thread()  # as if step 0 sounded
    now.t += 2.5  # beat 5 = step 4 after step 0 at beat 4
    assert clock.position() == pytest.approx(4.0)
    link.tempo = 90.0
    for f in link.callbacks["tempo"]:
        f(90.0)
    assert clock.bpm == 90.0
    assert clock.position() == pytest.approx(4.0)
    assert clock.ideal_time(8) == pytest.approx(now.t + 4 * step_seconds(90.0))


def test_our_tempo_goes_to_the_session() -> None:
    clock, link, _ = make(start_stop_sync=False)
    clock.set_bpm(133.0)
    assert link.tempo == 133.0 and clock.bpm == 133.0
    clock.close()


def test_losing_every_peer_keeps_the_tempo() -> None:
    clock, link, _ = make(tempo=101.0)
    for f in link.callbacks["peers"]:
        f(1)
    assert clock.peers == 1
    for f in link.callbacks["peers"]:
        f(0)
    assert clock.peers == 0 and clock.bpm == 101.0
    clock.close()


def test_a_whole_bar_jump_keeps_our_bar_count_a_phase_jump_follows() -> None:
    now = ManualTime()
    clock, link, _ = make(now, tempo=120.0, beat0=0.0, start_stop_sync=False)
    clock._set_origin(0)
    clock._armed, clock._thread = True, threading.current_thread()
    now.t += 4.0  # beat 8: step 16
    clock._sync()
    assert clock.position() == pytest.approx(16.0)
    link.jump(8.0)  # two bars of renumbering: same bar lines
    clock._sync()
    assert clock.position() == pytest.approx(16.0) and clock.jumps == 1
    link.jump(0.5)  # a phase correction: follow it
    clock._sync()
    assert clock.position() == pytest.approx(18.0)


def test_plays_steps_on_the_session_grid() -> None:
    clock, link, ev = make(tempo=480.0, beat0=1.0, start_stop_sync=False)  # a bar = 0.5 s
    clock.start(0)
    time.sleep(0.9)
    clock.stop()
    steps = [s for s, _ in ev.fired]
    assert steps[:8] == list(range(8))
    assert ev.kinds("start") == [0] and ev.kinds("stop")
    # Step s sounds when the session's beat is 4 + s / 4: check against the fake's timeline.
    for s, t in ev.fired:
        beat = link._beat0 + (t - link._t0) * 480.0 / 60
        assert abs(beat - (4 + s / 4)) * 60 / 480 < 0.004, (s, beat)


def test_start_stop_sync_waits_for_the_session_and_follows_it() -> None:
    clock, link, ev = make(tempo=480.0)
    clock.launch()
    assert clock._thread is None  # the session is not playing: no start at launch
    link.playing = True
    for f in link.callbacks["play"]:
        f(True)
    time.sleep(0.7)
    assert clock.running and ev.fired
    link.playing = False
    for f in link.callbacks["play"]:
        f(False)
    assert not clock.running and ev.kinds("stop")
    clock.start(0)  # our start is committed to the session
    assert link.playing
    clock.stop()
    assert not link.playing
    clock.close()


def test_without_start_stop_sync_play_state_is_neither_followed_nor_sent() -> None:
    clock, link, _ = make(start_stop_sync=False)
    link.playing = True
    for f in link.callbacks["play"]:
        f(True)
    assert clock._thread is None
    clock.start(0)
    clock.stop()
    assert link.playing  # untouched by us
    clock.close()
