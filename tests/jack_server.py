"""A real JACK server (dummy backend) for MIDI tests, and a recorder/player client on it.

Import the fixture explicitly: `from tests.jack_server import jack_server  # noqa: F401`.
Same-thread virtual loopback is unreliable (ENGINEERING trap 5), so peers are separate rtmidi
clients on a real server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import mido
import pytest
import rtmidi

JACKD = shutil.which("jackd") or "/usr/bin/jackd"


def _ports() -> list[str]:
    out = subprocess.run(["jack_lsp"], capture_output=True, text=True, timeout=5)
    return out.stdout.split()


def wait_for_port(suffix: str, timeout: float = 10.0) -> str:
    """The full JACK name of the first port ending with `suffix` once it exists."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hits = [p for p in _ports() if p.endswith(suffix)]
        if hits:
            return hits[0]
        time.sleep(0.05)
    raise TimeoutError(f"JACK port *{suffix} did not appear; have {_ports()}")


@dataclass
class JackServer:
    name: str
    process: subprocess.Popen


def start_jack(period: int = 128) -> JackServer:
    if not os.path.exists(JACKD):
        pytest.skip("jackd not installed (apt-get install --no-install-recommends jackd2)")
    name = f"clsm-test-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, JACK_NO_AUDIO_RESERVATION="1")
    proc = subprocess.Popen([JACKD, "-n", name, "-d", "dummy", "-r", "48000", "-p", str(period)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    os.environ["JACK_DEFAULT_SERVER"] = name
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.skip(f"jackd did not start: {proc.stderr.read()[-500:] if proc.stderr else ''}")
        if subprocess.run(["jack_lsp"], capture_output=True, timeout=5).returncode == 0:
            return JackServer(name, proc)
        time.sleep(0.1)
    proc.kill()
    pytest.skip("jackd did not answer within 10 s")


def stop_jack(server: JackServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(5)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(5)
    os.environ.pop("JACK_DEFAULT_SERVER", None)


@pytest.fixture(scope="module")
def jack_server() -> Iterator[JackServer]:
    server = start_jack()
    yield server
    stop_jack(server)


@dataclass
class Recorder:
    """An rtmidi JACK client: records what arrives (with time.monotonic) and sends."""

    name: str = "recorder"
    received: list[tuple[float, mido.Message]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._in = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name=f"{self.name}-rec")
        self._in.ignore_types(sysex=False, timing=False, active_sense=True)
        self._in.open_virtual_port("in")
        self._in.set_callback(self._on_message)
        self._out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=f"{self.name}-play")
        self._out.open_virtual_port("out")

    def _on_message(self, event: tuple[list[int], float], _data: object) -> None:
        t = time.monotonic()
        with self._lock:
            self.received.append((t, mido.Message.from_bytes(event[0])))

    def connect(self, daemon_port_name: str = "clsm") -> None:
        """Our out -> <name>-in, <name>-out -> our in."""
        src = wait_for_port(f"{daemon_port_name}-out")
        dst = wait_for_port(f"{daemon_port_name}-in")
        subprocess.run(["jack_connect", src, f"{self.name}-rec:in"], check=True, timeout=5)
        subprocess.run(["jack_connect", f"{self.name}-play:out", dst], check=True, timeout=5)

    def send(self, msg: mido.Message) -> None:
        self._out.send_message(msg.bytes())

    def messages(self, *types: str) -> list[tuple[float, mido.Message]]:
        with self._lock:
            return [(t, m) for t, m in self.received if not types or m.type in types]

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self.messages()):
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._in.cancel_callback()
        self._in.close_port()
        self._in.delete()
        self._out.close_port()
        self._out.delete()


def sounding_after(messages: list[tuple[float, mido.Message]]) -> set[tuple[int, int]]:
    """Notes left on at the end of a recording (note-off or CC 123 ends them)."""
    on: set[tuple[int, int]] = set()
    for _, m in messages:
        if m.type == "note_on" and m.velocity > 0:
            on.add((m.channel, m.note))
        elif m.type in ("note_on", "note_off"):
            on.discard((m.channel, m.note))
        elif m.type == "control_change" and m.control == 123:
            on = {n for n in on if n[0] != m.channel}
    return on
