"""Two Link peers in one session: the daemon (`--clock link`) and this test, through JACK.

Runs ONLY inside the private network namespace that tests/test_link.py makes (`unshare -n`,
loopback only, multicast routed to lo): Link's discovery multicasts on every interface it
finds, so it must never see the machine's real ones. The name does not start with `test_` so
the normal run does not collect it; tests/test_link.py runs it with `pytest tests/link_session.py`.

What is measured, on the peer's own Link timeline (no clock conversion in the measurement):
each MIDI message of the daemon's output is stamped in the JACK process callback of a client
of this process with the peer's Link beat at that instant. A bar line (every 96th clock tick
from Start) should arrive at phase 0 of the peer's quantum; the error is that phase, wrapped to
+-2 beats, in ms. The JACK server runs with 32-frame periods (0.67 ms at 48 kHz): delivery to a
peer waits for the next period, which is part of the measured error.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mido
import pytest

from daemon.jackd import JackdError, start_jack, stop_jack

ROOT = Path(__file__).resolve().parent.parent
PERIOD = 32  # frames at 48 kHz: 0.67 ms
QUANTUM = 4.0
TICKS_PER_BAR = 96
BARS = int(os.environ.get("CLSM_LINK_BARS", "4"))  # bars measured at the start (figures: more)
CTRL = 15  # control channel 16


def interfaces() -> list[str]:
    """Interfaces of this process's network namespace (netlink: namespace-aware, unlike /sys)."""
    return sorted(name for _, name in socket.if_nameindex())


if os.environ.get("CLSM_LINK_NETNS") != "1" or interfaces() != ["lo"]:
    pytest.skip("runs only inside the private network namespace of tests/test_link.py "
                f"(interfaces here: {interfaces()})", allow_module_level=True)

aalink = pytest.importorskip("aalink")
rtmidi = pytest.importorskip("rtmidi")


class Peer:
    """A Link peer on its own asyncio loop thread, with a JACK MIDI recorder and player."""

    def __init__(self, bpm: float, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="peer-loop", daemon=True).start()
        self.link: Any = self.call(lambda: aalink.Link(bpm))
        self.link.quantum = QUANTUM
        self.link.start_stop_sync_enabled = True
        self.link.enabled = True
        self.received: list[tuple[float, float, float, mido.Message]] = []  # t, beat, bpm, msg
        self.lock = threading.Lock()
        self.midi_in = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name=f"{name}-rec",
                                     queue_size_limit=8192)
        self.midi_in.ignore_types(sysex=True, timing=False, active_sense=True)
        self.midi_in.set_callback(self._on_midi)
        self.midi_in.open_virtual_port("in")
        self.midi_out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=f"{name}-play")
        self.midi_out.open_virtual_port("out")
        self.name = name

    def call(self, f):
        """Run `f` on the peer's loop (aalink binds its callbacks to the loop it was made on)."""
        async def run():
            return f()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def _on_midi(self, event: tuple[list[int], float], _data: Any) -> None:
        # JACK's process thread, in the cycle the message is delivered to us: stamp it now.
        t = time.monotonic()
        beat, bpm = self.link.beat, self.link.tempo
        with self.lock:
            self.received.append((t, beat, bpm, mido.Message.from_bytes(event[0])))

    def messages(self) -> list[tuple[float, float, float, mido.Message]]:
        with self.lock:
            return list(self.received)

    def send(self, msg: mido.Message) -> None:
        self.midi_out.send_message(msg.bytes())

    def close(self) -> None:
        self.midi_in.cancel_callback()
        self.midi_in.close_port()
        self.midi_in.delete()
        self.midi_out.close_port()
        self.midi_out.delete()
        self.call(lambda: setattr(self.link, "enabled", False))
        self.link = None
        self.loop.call_soon_threadsafe(self.loop.stop)


class DaemonProcess:
    def __init__(self, tmp: Path, port: str, osc_port: int) -> None:
        cfg = tmp / "link.toml"
        # realtime: the clock thread asks for SCHED_FIFO (root here), as a live rig would; on
        # this shared 2-core machine a normal-priority thread is sometimes descheduled for ms.
        cfg.write_text("[clock]\nsend_clock = true\nrealtime = true\n")
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "run_daemon.py", "--midi-api", "jack", "--engine", "fake",
             "--clock", "link", "--bpm", "150", "--port-name", port, "--config", str(cfg),
             "--osc-port", str(osc_port), "--log-level", "DEBUG"],
            cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def wait_log(self, text: str, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(text in line for line in list(self.log)):
                return
            assert self.proc.poll() is None, "daemon exited:\n" + "".join(self.log[-30:])
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not logged; log:\n{''.join(self.log[-30:])}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


class Osc:
    """Asks the daemon for its state over OSC (loopback of the namespace)."""

    def __init__(self, port: int) -> None:
        from pythonosc.osc_message_builder import OscMessageBuilder
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(1.0)
        self.port = port
        self.request = OscMessageBuilder("/clsm/state").build().dgram

    def state(self) -> dict | None:
        from pythonosc.osc_message import OscMessage
        self.sock.sendto(self.request, ("127.0.0.1", self.port))
        try:
            data, _ = self.sock.recvfrom(65536)
        except TimeoutError:
            return None
        message = OscMessage(data)
        return json.loads(message.params[0]) if message.address == "/clsm/state" else None


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ports(peer: Peer, suffixes: tuple[str, ...], timeout: float = 60.0) -> list[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ports = list(peer.midi_in.get_ports()) + list(peer.midi_out.get_ports())
        found = [next((p for p in ports if p.endswith(s)), None) for s in suffixes]
        if all(found):
            return [p for p in found if p]
        time.sleep(0.05)
    raise TimeoutError(f"ports {suffixes} did not appear")


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Iterator[tuple[Peer, DaemonProcess, Osc]]:
    try:
        server = start_jack("clsm-link", PERIOD)
    except JackdError as e:
        pytest.skip(str(e))
    os.environ.update(JACK_DEFAULT_SERVER=server.name, JACK_NO_START_SERVER="1")
    # The stamping callback needs the GIL: never let the test's polling hold it for 5 ms.
    sys.setswitchinterval(0.0002)
    port = f"link{uuid.uuid4().hex[:5]}"
    peer = Peer(150.0, f"{port}peer")
    osc_port = free_udp_port()
    daemon = DaemonProcess(tmp_path_factory.mktemp("link"), port, osc_port)
    try:
        src, dst = wait_ports(peer, (f"{port}-out", f"{port}-in"))
        subprocess.run(["jack_connect", src, f"{port}peer-rec:in"], check=True, timeout=10)
        subprocess.run(["jack_connect", f"{port}peer-play:out", dst], check=True, timeout=10)
        daemon.wait_log("link: 1 peer(s) in the session")
        yield peer, daemon, Osc(osc_port)
    finally:
        rc = daemon.stop()
        peer.close()
        stop_jack(server)
    assert rc == 0, "".join(daemon.log[-20:])


def bar_errors_ms(msgs: list[tuple[float, float, float, mido.Message]],
                  since: int = 0) -> tuple[list, list]:
    """(bar-line errors, step errors) in ms of the messages from index `since` on; ticks are
    counted from the last Start before them."""
    bars, steps, count = [], [], None
    for i, (_, beat, bpm, m) in enumerate(msgs):
        if m.type == "start":
            count = 0
        elif m.type == "stop":
            count = None
        if m.type != "clock" or count is None:
            continue
        if count % 6 == 0 and i >= since:  # a step (a 16th): the peer's beat should be a multiple of 1/4
            err = ((beat * 4 + 0.5) % 1.0 - 0.5) / 4 * 60000 / bpm
            steps.append(err)
            if count % TICKS_PER_BAR == 0:
                bars.append(((beat + QUANTUM / 2) % QUANTUM - QUANTUM / 2) * 60000 / bpm)
        count += 1
    return bars, steps


def summary(name: str, errs: list[float]) -> str:
    a = sorted(abs(e) for e in errs)
    p99 = a[min(len(a) - 1, int(0.99 * len(a)))]
    return (f"{name}: n={len(a)} mean {statistics.mean(errs):+.3f} ms, |err| p50 "
            f"{statistics.median(a):.3f} p99 {p99:.3f} max {a[-1]:.3f} ms, "
            f"{sum(e > 2.0 for e in a)} over 2 ms")


def assert_on_the_bar_lines(bars: list[float]) -> None:
    """Every bar line within 2 ms of the peer's quantum boundary, save one late one at most.

    A clock or sync error would move every bar line; a single late message is this shared
    machine descheduling a thread of the daemon or of JACK (steps show the same rare stalls with
    the internal clock, see NOTES.md), so one is tolerated and reported in the summary."""
    late = [e for e in bars if abs(e) > 2.0]
    assert len(late) <= 1 and statistics.median(abs(e) for e in bars) <= 2.0, bars


def wait_for(predicate, timeout: float, every: float = 0.005) -> float | None:
    """Seconds until `predicate()` held, or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(every)
    return None


def test_the_daemon_starts_with_the_session_on_its_bar_line(session) -> None:
    peer, daemon, _ = session
    # Start/stop sync: the daemon waited for the session; the peer presses play.
    n0 = len(peer.messages())
    peer.call(lambda: setattr(peer.link, "playing", True))
    assert wait_for(lambda: any(m.type == "start" for *_, m in peer.messages()[n0:]), 5.0), \
        "no MIDI Start from the daemon after the session started"
    time.sleep(BARS * 1.6 + 0.3)  # at 150 bpm
    bars, steps = bar_errors_ms(peer.messages(), n0)
    print("\n" + summary("bar lines vs the peer's quantum, 150 bpm", bars))
    print(summary("steps vs the peer's 16th grid, 150 bpm", steps))
    assert len(bars) >= BARS
    assert_on_the_bar_lines(bars)


def test_the_daemons_tempo_follows_a_peer_within_a_second(session) -> None:
    peer, daemon, osc = session
    assert osc.state()["bpm"] == 150.0
    n0 = len(peer.messages())
    peer.call(lambda: setattr(peer.link, "tempo", 100.0))
    took = wait_for(lambda: (osc.state() or {}).get("bpm") == 100.0, 1.0)
    assert took is not None, f"daemon state: {osc.state()}"
    print(f"\ndaemon's /clsm/state shows the peer's 100 bpm after {took * 1000:.1f} ms")
    # 3 bars at 100 bpm: the one late bar line that assert_on_the_bar_lines forgives must not
    # decide the median (2 bars measured, one 4.3 ms late, failed a run)
    time.sleep(3 * 2.4 + 0.3)
    bars, steps = bar_errors_ms(peer.messages(), n0)
    print(summary("bar lines across the change to 100 bpm", bars))
    print(summary("steps across the change to 100 bpm", steps))
    assert len(bars) >= 3
    assert_on_the_bar_lines(bars)


def test_a_tempo_change_from_us_reaches_the_peer(session) -> None:
    peer, daemon, osc = session
    t0 = time.monotonic()
    peer.send(mido.Message("control_change", channel=CTRL, control=30, value=80))  # 120 bpm
    took = wait_for(lambda: abs(peer.link.tempo - 120.0) < 1e-6, 2.0)
    assert took is not None, f"peer tempo {peer.link.tempo}"
    print(f"\nCC 30 -> 120 bpm: the peer's session tempo after {took * 1000:.1f} ms "
          "(includes the daemon's knob coalescing, up to 50 ms)")
    assert took <= 1.0
    assert wait_for(lambda: (osc.state() or {}).get("bpm") == 120.0, 1.0) is not None
    n0 = len(peer.messages())
    time.sleep(3 * 2.0 + 0.2)  # 3 bars at 120 bpm (see the test above)
    bars, _ = bar_errors_ms(peer.messages(), n0)
    print(summary("bar lines after our change to 120 bpm", bars))
    assert len(bars) >= 3
    assert_on_the_bar_lines(bars)
    assert time.monotonic() - t0 < 10


def test_the_session_stop_stops_the_daemon_and_lost_peers_keep_the_tempo(session) -> None:
    peer, daemon, osc = session
    n0 = len(peer.messages())
    peer.call(lambda: setattr(peer.link, "playing", False))
    assert wait_for(lambda: any(m.type == "stop" for *_, m in peer.messages()[n0:]), 2.0), \
        "no MIDI Stop from the daemon after the session stopped"
    assert osc.state()["transport"] == "stopped"
    peer.call(lambda: setattr(peer.link, "enabled", False))  # the last peer leaves
    assert wait_for(lambda: (osc.state() or {}).get("link_peers") == 0, 5.0) is not None
    state = osc.state()
    assert state["bpm"] == 120.0, state
    peer.call(lambda: setattr(peer.link, "enabled", True))  # back for a clean shutdown
