"""End to end through JACK: `run_daemon.py --midi-api jack --engine fake` as a subprocess.

A test client plays into `<port>-in`, steers with CCs and records `<port>-out`. Steps of the
output are read off the MIDI clock itself (the daemon's clock out, or the test's own ticks),
so "on the grid" is checked by order, not by wall-clock times (the external-clock test falls back
to its ticks' send times when the recorder lost ticks to a JACK xrun).
"""

from __future__ import annotations

import ast
import bisect
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import mido
import pytest

from engine.tokens import HOLD, PITCH_MIN, is_pitch
from tests.jack_server import Recorder, jack_server, sounding_after  # noqa: F401

pytestmark = pytest.mark.jack
ROOT = Path(__file__).resolve().parent.parent
CTRL = 15  # control channel 16, 0-based


def cc(control: int, value: int) -> mido.Message:
    return mido.Message("control_change", channel=CTRL, control=control, value=value)


class Daemon:
    """The daemon as a subprocess, with a recorder connected to its ports.

    The recorder's clients open before the daemon starts and the connections are made once
    both daemon ports exist: no JACK client opens or closes while the daemon opens its two
    (see daemon/midi_io.py on JACK client churn)."""

    def __init__(self, tmp: Path, *args: str, config: str = "") -> None:
        self.port = f"e2e{uuid.uuid4().hex[:5]}"
        cfg = tmp / "user.toml"
        cfg.write_text(config)
        self.log: list[str] = []
        self.rec = Recorder(f"{self.port}peer")
        self.proc = subprocess.Popen(
            [sys.executable, "run_daemon.py", "--midi-api", "jack", "--engine", "fake",
             "--port-name", self.port, "--config", str(cfg), "--log-level", "DEBUG", *args],
            cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.rec.connect(self.port)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def wait_log(self, text: str, timeout: float = 15.0, count: int = 1) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if sum(text in line for line in list(self.log)) >= count:
                return
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not logged; log:\n{''.join(self.log[-30:])}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        # The next test's clients must not open while the server still removes these.
        self.rec.wait_gone(f"{self.port}-")
        self.rec.close()
        return rc


def out_notes(msgs: list[tuple[float, mido.Message]]) -> list[tuple[int, mido.Message]]:
    """(ticks received before it, message) for the daemon's notes, counted from Start."""
    seen, ticks, out = False, 0, []
    for _, m in msgs:
        if m.type == "start":
            seen, ticks = True, 0
        elif m.type == "clock" and seen:
            ticks += 1
        elif m.type in ("note_on", "note_off") and seen and m.channel == 0:
            out.append((ticks, m))
    return out


def play(rec: Recorder, notes: list[int], gap: float) -> None:
    for pitch in notes:
        rec.send(mido.Message("note_on", channel=0, note=pitch, velocity=90))
        time.sleep(gap)
        rec.send(mido.Message("note_off", channel=0, note=pitch))


def ticks_seen(rec: Recorder) -> int:
    n = 0
    for _, m in rec.messages("start", "clock"):
        n = 0 if m.type == "start" else n + 1
    return n


def wait_ticks(rec: Recorder, n: int, timeout: float = 20.0) -> None:
    ok = rec.wait_for(lambda _: ticks_seen(rec) >= n, timeout)
    lsp = subprocess.run(["jack_lsp", "-c"], capture_output=True, text=True).stdout
    assert ok, f"clock never reached {n}: {len(rec.messages())} messages\n{lsp}"


def test_internal_clock_regenerated_bar_plays_on_the_grid(jack_server, tmp_path) -> None:  # noqa: F811
    d = Daemon(tmp_path, "--bpm", "240", "--engine-worker", "thread",
               config="[clock]\nsend_clock = true\n")
    try:
        d.wait_log("ready:")
        d.rec.send(cc(31, 0))  # transport stop, then start: the recorder sees Start
        d.wait_log("all notes off (stop)")
        d.rec.send(cc(31, 127))
        wait_ticks(d.rec, 6 * 16)  # bar 2: the player's melody goes in bars 2-3
        play(d.rec, [60, 64, 67, 72, 71, 67], gap=0.12)
        d.rec.send(cc(20, 64))  # target bar 5
        d.rec.send(cc(21, 0))  # 1 bar
        d.rec.send(cc(22, 127))  # regenerate
        d.wait_log("'action': 'regenerate'")
        wait_ticks(d.rec, 6 * 16 * 6 + 6)  # into bar 7
        d.rec.send(cc(31, 0))  # stop
        d.wait_log("all notes off (stop)", count=2)
        time.sleep(0.2)
    finally:
        rc = d.stop()
    assert rc == 0
    notes = out_notes(d.rec.messages())
    ons = [(t, m) for t, m in notes if m.type == "note_on" and m.velocity > 0]
    assert ons, f"no notes from the co-performer; log:\n{''.join(d.log[-20:])}"
    for ticks, m in ons:
        assert ticks % 6 == 0, f"{m} not on a step: {ticks} ticks"
        assert ticks // 6 // 16 == 4, f"{m} at step {ticks // 6}, outside bar 5"
    assert sounding_after(d.rec.messages()) == set()


def test_external_clock_and_song_position(jack_server, tmp_path) -> None:  # noqa: F811
    d = Daemon(tmp_path, "--clock", "external", "--engine-worker", "thread")
    # The recorder hears our own ticks too: one stream, in JACK's order, of the ticks and the
    # daemon's replies, so "on a step" is read off that order, not off wall-clock times.
    d.rec.loopback()
    try:
        d.wait_log("ready:")
        d.rec.send(cc(20, 64))  # target bar 5, 1 bar, regenerate (transport stopped)
        d.rec.send(cc(21, 0))
        d.rec.send(cc(22, 127))
        d.wait_log("'action': 'regenerate'")
        d.rec.send(mido.Message("songpos", pos=64))  # bar 5
        d.rec.send(mido.Message("continue"))
        # 60 bpm: 42 ms between ticks, so a reply (two JACK periods plus the daemon's reaction)
        # lands before the next tick even on a loaded machine.
        tick = 60.0 / 60 / 24
        t0 = time.monotonic()
        sent_at: list[float] = []
        for i in range(6 * 16 + 12):  # bar 5 and a little of bar 6
            while time.monotonic() < t0 + i * tick:
                time.sleep(0.001)
            sent_at.append(time.monotonic())
            d.rec.send(mido.Message("clock"))
        # No Stop: the clock just goes away; the daemon must notice and end the notes.
        d.wait_log("no clock for 0.5 s")
        time.sleep(0.2)
    finally:
        rc = d.stop()
    assert rc == 0
    ticks, ons, fetched = -1, [], []
    for t, m in d.rec.messages():
        if m.type == "continue":
            ticks = -1
        elif m.type == "clock":
            ticks += 1
        elif m.type == "note_on" and m.velocity > 0 and m.channel == 0:
            ons.append((ticks, m))  # index of the last tick before it
            fetched.append(t)
    assert ons, f"no notes; log:\n{''.join(d.log[-20:])}"
    if ticks + 1 < len(sent_at):
        # The recorder missed JACK cycles (xruns on a loaded machine lose a client's MIDI for
        # that cycle), so its tick count runs behind: place each note by the tick last sent
        # before the recorder fetched it instead.
        print(f"recorder heard {ticks + 1} of {len(sent_at)} ticks: notes placed by send times")
        ons = [(bisect.bisect_right(sent_at, t) - 1, m)
               for t, (_, m) in zip(fetched, ons, strict=True)]
    for index, m in ons:
        assert index % 6 == 0, f"{m} arrived {index % 6} ticks after a step"
        assert 64 <= 64 + index // 6 < 80, f"{m} at step {64 + index // 6}, outside bar 5"
    assert sounding_after(d.rec.messages()) == set()


def test_sigterm_in_the_middle_of_a_note_ends_it(jack_server, tmp_path) -> None:  # noqa: F811
    d = Daemon(tmp_path, "--bpm", "120", "--engine-worker", "process")
    try:
        d.wait_log("ready:")
        d.rec.send(cc(20, 0))  # bars 1-4
        d.rec.send(cc(21, 127))
        d.rec.send(cc(22, 127))
        sounding = d.rec.wait_for(lambda ms: bool(sounding_after(
            [(t, m) for t, m in ms if getattr(m, "channel", -1) == 0])), timeout=20)
        assert sounding, f"no note ever sounded; log:\n{''.join(d.log[-20:])}"
        d.proc.send_signal(signal.SIGTERM)
    finally:
        rc = d.stop()
    assert rc == 0
    assert sounding_after(d.rec.messages()) == set()
    assert any("shutting down" in line for line in d.log)


def test_sighup_ends_every_note_like_sigterm(jack_server, tmp_path) -> None:  # noqa: F811
    """Issue 15 defect 6: SIGHUP had no handler and the process died with notes sounding."""
    d = Daemon(tmp_path, "--bpm", "120")
    try:
        d.wait_log("ready:")
        d.rec.send(cc(20, 0))  # bars 1-4
        d.rec.send(cc(21, 127))
        d.rec.send(cc(22, 127))
        sounding = d.rec.wait_for(lambda ms: bool(sounding_after(
            [(t, m) for t, m in ms if getattr(m, "channel", -1) == 0])), timeout=20)
        assert sounding, f"no note ever sounded; log:\n{''.join(d.log[-20:])}"
        d.proc.send_signal(signal.SIGHUP)
        rc = d.proc.wait(15)
    finally:
        d.stop()
    assert rc == 0
    assert sounding_after(d.rec.messages()) == set()
    assert any("shutting down" in line for line in d.log)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with random weights, exported like the shipped one (about 5 s)."""
    out = tmp_path_factory.mktemp("model") / "clsm-rand"
    subprocess.run([sys.executable, "-m", "engine.export", "--random", "--config",
                    "configs/default.toml", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return out


def test_real_engine_regenerates_and_plays_its_tokens(jack_server, random_model,  # noqa: F811
                                                      tmp_path) -> None:
    d = Daemon(tmp_path, "--engine", "real", "--model", str(random_model), "--bpm", "240",
               "--engine-worker", "thread")
    try:
        d.wait_log("ready:", timeout=60)
        # Under heavy machine load the first CCs can reach the port before the recorder's
        # connection to it settles; press again (a new candidate each time) rather than fail.
        for attempt in range(3):
            d.rec.send(cc(20, 0))  # bars 1-2
            d.rec.send(cc(21, 40))
            d.rec.send(cc(22, 127))
            d.rec.send(cc(22, 0))
            try:
                d.wait_log("'action': 'regenerate'", timeout=30)
                break
            except AssertionError:
                if attempt == 2:
                    raise
        line = next(x for x in d.log if "'action': 'regenerate'" in x)
        result = ast.literal_eval(line[line.index("{"):])
        assert result["ok"] and (result["first_bar"], result["last_bar"]) == (1, 2), line
        tokens = result["tokens"]
        assert len(tokens) == 32 and all(0 <= t <= HOLD for t in tokens)
        pitches = {t + PITCH_MIN for t in tokens if is_pitch(t)}
        if pitches:  # random weights may well decode to rests only
            assert d.rec.wait_for(lambda ms: any(
                m.type == "note_on" and m.channel == 0 and m.velocity > 0 for _, m in ms), 10)
            played = {m.note for _, m in d.rec.messages("note_on") if m.channel == 0}
            assert played <= pitches, f"played {played}, candidate has {pitches}"
    finally:
        rc = d.stop()
    assert rc == 0
    assert any("engine clsm-rand ready" in line for line in d.log)
    assert sounding_after(d.rec.messages()) == set()
