"""A real JACK server (dummy backend) for MIDI tests, and a recorder/player client on it.

Import the fixture explicitly: `from tests.jack_server import jack_server  # noqa: F401`.
Same-thread virtual loopback is unreliable (ENGINEERING trap 5), so peers are separate rtmidi
clients on a real server.

Rule that keeps these tests reliable (see the note in daemon/midi_io.py): no short-lived JACK
client (jack_lsp, jack_connect) may open or close while a process is still opening its
clients. So the recorder opens first, looks for the daemon's ports through its own long-lived
clients, and connects with jack_connect only once all of the daemon's ports exist.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import mido
import pytest
import rtmidi

from daemon.jackd import JackdError, JackServer, start_jack, stop_jack

# 5.3 ms at 48 kHz: small enough that a reply to a MIDI clock tick comes back well within
# one tick (the external-clock test checks order), big enough for a loaded 2-core machine.
TEST_PERIOD = 256

Messages = list[tuple[float, mido.Message]]


@pytest.fixture(scope="module")
def jack_server() -> Iterator[JackServer]:
    try:
        server = start_jack("clsm-test", TEST_PERIOD)
    except JackdError as e:
        pytest.skip(str(e))
    saved = {k: os.environ.get(k) for k in ("JACK_DEFAULT_SERVER", "JACK_NO_START_SERVER")}
    os.environ.update(JACK_DEFAULT_SERVER=server.name, JACK_NO_START_SERVER="1")
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop_jack(server)


def jack_connect(src: str, dst: str) -> None:
    subprocess.run(["jack_connect", src, dst], check=True, timeout=10, capture_output=True)


class Recorder:
    """Two long-lived rtmidi JACK clients: `<name>-rec:in` records, `<name>-play:out` sends.

    Received messages are fetched by a polling thread, not an rtmidi callback: a callback
    runs on JACK's process thread and would make it wait for the GIL of this busy process.
    Times are time.monotonic() when fetched (order is exact, times are approximate).
    """

    def __init__(self, name: str = "recorder") -> None:
        self.name = name
        self.received: Messages = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._in = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name=f"{name}-rec", queue_size_limit=8192)
        self._in.ignore_types(sysex=False, timing=False, active_sense=True)
        self._in.open_virtual_port("in")
        self._out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=f"{name}-play")
        self._out.open_virtual_port("out")
        self._thread = threading.Thread(target=self._poll, name=f"{name}-poll", daemon=True)
        self._thread.start()

    @property
    def port_in(self) -> str:
        return f"{self.name}-rec:in"

    @property
    def port_out(self) -> str:
        return f"{self.name}-play:out"

    def _poll(self) -> None:
        while not self._stop.is_set():
            event = self._in.get_message()
            if event is None:
                time.sleep(0.001)
                continue
            msg = mido.Message.from_bytes(event[0])
            with self._lock:
                self.received.append((time.monotonic(), msg))

    def ports(self) -> list[str]:
        """Every MIDI port on the server, listed through our own clients (no new client)."""
        return list(self._in.get_ports()) + list(self._out.get_ports())

    def wait_for_port(self, suffix: str, timeout: float = 20.0) -> str:
        """The full JACK name of the first port ending with `suffix` once it exists."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            hits = [p for p in self.ports() if p.endswith(suffix)]
            if hits:
                return hits[0]
            time.sleep(0.05)
        raise TimeoutError(f"JACK port *{suffix} did not appear; have {self.ports()}")

    def wait_gone(self, prefix: str, timeout: float = 10.0) -> None:
        """Until no port of client `prefix*` is left (the server removes a dead one's)."""
        end = time.monotonic() + timeout
        while any(p.startswith(prefix) for p in self.ports()):
            if time.monotonic() > end:
                raise TimeoutError(f"ports {prefix}* still there: {self.ports()}")
            time.sleep(0.05)

    def connect(self, daemon_port_name: str = "clsm", timeout: float = 60.0) -> None:
        """Our out -> <name>-in, <name>-out -> our in, once both daemon ports exist.

        The daemon opens -in then -out; with both present its clients are all open, and the
        short-lived jack_connect clients can no longer race with them."""
        # The daemon loads its engine before it opens any port: a real model takes seconds.
        dst = self.wait_for_port(f"{daemon_port_name}-in", timeout)
        src = self.wait_for_port(f"{daemon_port_name}-out", timeout)
        jack_connect(src, self.port_in)
        jack_connect(self.port_out, dst)

    def loopback(self) -> None:
        """Also record what we send: one stream, in JACK's order, of our ticks and the replies."""
        jack_connect(self.port_out, self.port_in)

    def send(self, msg: mido.Message) -> None:
        self._out.send_message(msg.bytes())

    def messages(self, *types: str) -> Messages:
        with self._lock:
            return [(t, m) for t, m in self.received if not types or m.type in types]

    def messages_from(self, index: int) -> Messages:
        """Messages received from position `index` on (cheap incremental reads)."""
        with self._lock:
            return self.received[index:]

    def wait_for(self, predicate: Callable[[Messages], bool], timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self.messages()):
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._in.close_port()
        self._in.delete()
        self._out.close_port()
        self._out.delete()


def sounding_after(messages: Messages) -> set[tuple[int, int]]:
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
