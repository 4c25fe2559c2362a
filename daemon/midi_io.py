"""MIDI ports over python-rtmidi: virtual `<port_name>-in` / `<port_name>-out`, or existing ports.

rtmidi calls its input callback on a foreign thread, so the callback only hands the raw bytes
and their arrival time to the asyncio loop; parsing, filtering and logging happen there.
Output ports are sent to from the clock thread and the loop, hence a lock; they remember which
notes are on so `panic()` can end each one (some synths ignore CC 123).

JACK client churn (why tests and benchmarks never poll with jack_lsp while the daemon starts):
with the JACK backend each port is its own JACK client, so the daemon has two in one process.
libjack (jack2 1.9.x) keeps one table of the other clients' wake-up futexes per process, indexed
by the server's client number, and learns of a client leaving asynchronously. If another client
(a jack_lsp, a patchbay) closes just as we open our second one, the server hands us its freed
number while our table still holds the old futex ("Already connected"): our client's process
thread then waits on a dead futex forever and jackd logs `client = <x>-out was not finished,
state = Triggered` every cycle, for the whole run, for it and everything downstream of it.
RtMidi's JACK output then spins forever in `send_message` once its 16 KB ring is full (nothing
drains it), holding the GIL: the daemon freezes and ignores SIGTERM. Nothing in rtmidi's API can
see either state, so the rule is: nothing opens or closes JACK clients while the daemon opens
its ports (it logs "MIDI out: ..." when both are open).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType

import mido
import rtmidi

from daemon.safelog import Throttle

log = logging.getLogger(__name__)

_APIS = {"alsa": rtmidi.API_LINUX_ALSA, "jack": rtmidi.API_UNIX_JACK,
         "coremidi": rtmidi.API_MACOSX_CORE}

CHANNEL_TYPES = frozenset({"note_on", "note_off", "control_change", "polytouch",
                           "aftertouch", "pitchwheel", "program_change"})
REALTIME_TYPES = frozenset({"clock", "start", "stop", "continue", "songpos"})


class MidiBackendError(RuntimeError):
    """The MIDI API is missing or a port cannot be opened; the message says what to do."""


def resolve_api(name: str) -> tuple[str, int]:
    """`auto` -> coremidi on macOS; on Linux alsa, or jack where there is no ALSA sequencer
    (containers, CI); checks the API is compiled into rtmidi."""
    if name == "auto":
        if sys.platform == "darwin":
            name = "coremidi"
        else:
            name = "alsa" if os.path.exists("/dev/snd/seq") else "jack"
    if name not in _APIS:
        raise MidiBackendError(f"unknown MIDI API {name!r}; use one of {', '.join(_APIS)}")
    api = _APIS[name]
    if api not in rtmidi.get_compiled_api():
        have = [n for n, a in _APIS.items() if a in rtmidi.get_compiled_api()]
        raise MidiBackendError(f"python-rtmidi was built without {name}; available: {have}")
    return name, api


def _backend_hint(api_name: str, err: Exception) -> MidiBackendError:
    if api_name == "alsa":
        hint = ("no ALSA sequencer here (/dev/snd/seq); start JACK and run with --midi-api jack, "
                "or load the snd-seq kernel module")
    elif api_name == "jack":
        hint = ("no JACK server is running; start one (e.g. `jackd -d dummy`) or set "
                "JACK_DEFAULT_SERVER to its name, or use --midi-api alsa")
    else:
        hint = "check the MIDI system of this machine"
    return MidiBackendError(f"cannot open the {api_name} MIDI backend ({err}): {hint}")


def _find_port(available: list[str], wanted: str) -> int:
    """Exact name first, then a unique substring (ALSA appends client:port numbers)."""
    if wanted in available:
        return available.index(wanted)
    hits = [i for i, name in enumerate(available) if wanted in name]
    if len(hits) == 1:
        return hits[0]
    what = "matches several" if hits else "matches none"
    raise MidiBackendError(f"port {wanted!r} {what} of the available ports: {available}")


def _open(rt: rtmidi.MidiIn | rtmidi.MidiOut, name: str, connect: str) -> str:
    try:
        if connect:
            idx = _find_port(rt.get_ports(), connect)
            rt.open_port(idx, name)
            return rt.get_port_name(idx) or connect
        rt.open_virtual_port(name)
        return name
    except rtmidi.RtMidiError as e:
        raise MidiBackendError(f"cannot open MIDI port {connect or name!r}: {e}") from e


def list_ports(api: str = "auto") -> tuple[str, list[str], list[str]]:
    """(API name, ports we can read from, ports we can write to): the names `--connect-in` and
    `--connect-out` (config `[midi] connect_in` / `connect_out`) take."""
    name, api_id = resolve_api(api)
    try:
        rt_in = rtmidi.MidiIn(api_id, name="clsm-list")
    except rtmidi.RtMidiError as e:
        raise _backend_hint(name, e) from e
    try:
        rt_out = rtmidi.MidiOut(api_id, name="clsm-list")
        try:
            return name, list(rt_in.get_ports()), list(rt_out.get_ports())
        finally:
            rt_out.delete()
    except rtmidi.RtMidiError as e:
        raise _backend_hint(name, e) from e
    finally:
        rt_in.delete()


@dataclass(frozen=True)
class Received:
    msg: mido.Message
    time: float  # time.monotonic() at arrival, on the rtmidi thread


class MidiInput:
    """`async with MidiInput(...) as port`: then `await port.receive()` -> Received."""

    def __init__(self, port_name: str, api: str = "auto", connect: str = "",
                 maxsize: int = 4096) -> None:
        self.api_name, self._api = resolve_api(api)
        self.name = f"{port_name}-in"
        self._connect = connect
        self._rt: rtmidi.MidiIn | None = None
        self._queue: asyncio.Queue[tuple[list[int], float]] = asyncio.Queue(maxsize)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dropped = 0
        self.parse_errors = Throttle(log)  # .total: unparsable messages since the start

    def _callback(self, event: tuple[list[int], float], _data: object) -> None:
        # Foreign thread: hand over and return; nothing else may happen here.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._put, (event[0], time.monotonic()))

    def _put(self, item: tuple[list[int], float]) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1  # a flood must not grow memory without bound

    def open(self) -> MidiInput:
        self.create()
        self.open_port()
        log.info("MIDI in: %s (%s)", self.port, self.api_name)
        return self

    def create(self) -> None:
        """The backend client, no port yet (`open_ports` lists the others' ports in between)."""
        self._loop = asyncio.get_running_loop()
        try:
            self._rt = rtmidi.MidiIn(self._api, name=self.name)
        except rtmidi.RtMidiError as e:
            raise _backend_hint(self.api_name, e) from e

    def ports(self) -> list[str]:
        """The ports this client can read from (other clients' outputs)."""
        assert self._rt is not None
        return list(self._rt.get_ports())

    def open_port(self) -> None:
        assert self._rt is not None
        self.port = _open(self._rt, self.name, self._connect)
        # SysEx is let in only to be logged and dropped; clock must not be ignored (trap 3).
        self._rt.ignore_types(sysex=False, timing=False, active_sense=True)
        self._rt.set_callback(self._callback)

    def close(self) -> None:
        if self._rt is None:
            return
        # No callback may run into a closed port (trap 2); deleting frees a virtual port.
        self._rt.cancel_callback()
        self._rt.close_port()
        self._rt.delete()
        self._rt = None

    async def __aenter__(self) -> MidiInput:
        return self.open()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    async def receive(self) -> Received:
        """The next parsed message; SysEx and unparsable bytes are logged and skipped."""
        while True:
            data, t = await self._queue.get()
            msg = parse(data, self.parse_errors)
            if msg is not None:
                return Received(msg, t)


_UNPARSABLE = Throttle(log)  # for callers without their own counter
SYSEX = Throttle(log)  # a SysEx flood (a dump, a stuck sender) is one line per interval


def parse(data: list[int], errors: Throttle | None = None) -> mido.Message | None:
    """A channel or realtime message, or None (counted in `errors` if it did not parse).

    Parsing must never raise: mido raises IndexError on a truncated `E0` or `F2 10`,
    ValueError on unknown status bytes; a flood of either is one warning per interval."""
    try:
        msg = mido.Message.from_bytes(data)
    except Exception as e:  # noqa: BLE001 - any parse failure is bad input, never fatal
        (errors or _UNPARSABLE).warning("ignored unparsable MIDI bytes %s: %s: %s",
                                        " ".join(f"{b:02x}" for b in data[:16]) or "(none)",
                                        type(e).__name__, e)
        return None
    if msg.type == "sysex":
        SYSEX.log(logging.INFO, "ignored SysEx (%d bytes)", len(data))
        return None
    if msg.type not in CHANNEL_TYPES and msg.type not in REALTIME_TYPES:
        log.debug("ignored MIDI %s", msg.type)
        return None
    if msg.bytes() != list(data):  # mido lets some over-long messages through (E0 00 00 00)
        (errors or _UNPARSABLE).warning("ignored malformed MIDI bytes %s: %d bytes for a %s",
                                        " ".join(f"{b:02x}" for b in data[:16]), len(data), msg.type)
        return None
    return msg


def accepts(msg: mido.Message, input_channel: int) -> bool:
    """Input channel filter for notes (0 = omni); channels here are 1-based like the config."""
    return input_channel == 0 or msg.channel == input_channel - 1


class MidiOutput:
    """`async with MidiOutput(...) as port`: `send(msg)` from any thread; `panic()` on the way out."""

    def __init__(self, port_name: str, api: str = "auto", connect: str = "",
                 channel: int = 1) -> None:
        self.api_name, self._api = resolve_api(api)
        self.name = f"{port_name}-out"
        self._connect = connect
        self.channel = channel - 1  # mido channels are 0-based
        self._rt: rtmidi.MidiOut | None = None
        self._lock = threading.Lock()
        self._on: set[tuple[int, int]] = set()  # (channel, pitch) sounding
        self.flush_s = 0.05

    def open(self) -> MidiOutput:
        self.create()
        self.open_port()
        log.info("MIDI out: %s (%s)", self.port, self.api_name)
        return self

    def create(self) -> None:
        try:
            self._rt = rtmidi.MidiOut(self._api, name=self.name)
        except rtmidi.RtMidiError as e:
            raise _backend_hint(self.api_name, e) from e

    def ports(self) -> list[str]:
        """The ports this client can write to (other clients' inputs)."""
        assert self._rt is not None
        return list(self._rt.get_ports())

    def open_port(self) -> None:
        assert self._rt is not None
        self.port = _open(self._rt, self.name, self._connect)

    def send(self, msg: mido.Message) -> None:
        with self._lock:
            if self._rt is None:
                return
            if msg.type == "note_on" and msg.velocity > 0:
                self._on.add((msg.channel, msg.note))
            elif msg.type in ("note_on", "note_off"):
                self._on.discard((msg.channel, msg.note))
            self._rt.send_message(msg.bytes())

    def sounding(self) -> set[tuple[int, int]]:
        with self._lock:
            return set(self._on)

    def panic(self) -> None:
        """A note-off for every note this port started, then All Notes Off on the channel."""
        for ch, pitch in sorted(self.sounding()):
            self.send(mido.Message("note_off", channel=ch, note=pitch, velocity=0))
        self.send(mido.Message("control_change", channel=self.channel, control=123, value=0))

    def close(self) -> None:
        if self._rt is None:
            return
        self.panic()
        # rtmidi's JACK backend hands messages to the server's next cycle through a ring
        # buffer; closing at once would lose the note-offs just sent.
        time.sleep(self.flush_s)
        with self._lock:
            self._rt.close_port()
            self._rt.delete()
            self._rt = None

    async def __aenter__(self) -> MidiOutput:
        return self.open()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()


@contextlib.asynccontextmanager
async def open_ports(midi_in: MidiInput, midi_out: MidiOutput
                     ) -> AsyncIterator[tuple[MidiInput, MidiOutput]]:
    """Both ports, logged under the names the backend really gave them (issue 15, defect 11).

    JACK numbers a second client called `clsm-in` as `clsm-in-01`, so a second daemon's input
    is `clsm-in-01:clsm-in`; each client lists only the other direction's ports, so the input's
    real name is what the output client sees appear when it opens, and vice versa. No client
    opens or closes in between (the JACK churn rule at the top of this module)."""
    try:
        midi_in.create()
        midi_out.create()
        writable, readable = midi_out.ports(), midi_in.ports()
        midi_in.open_port()
        midi_out.open_port()
        for port, seen_by, before in ((midi_in, midi_out, writable), (midi_out, midi_in, readable)):
            if not port._connect:
                port.port = _real_name(port.name, seen_by.ports(), before)
        log.info("MIDI in: %s, out: %s (%s)", midi_in.port, midi_out.port, midi_in.api_name)
        yield midi_in, midi_out
    finally:
        midi_out.close()
        midi_in.close()


def _real_name(name: str, now: list[str], before: list[str]) -> str:
    """The port that appeared when we opened `name`; warns when another one has that name."""
    new = [p for p in now if p not in before and name in p]
    if len(new) != 1:
        return name  # the backend does not list it (or a third client opened at once)
    others = [p for p in before if name in p]
    if others:
        log.warning("another MIDI port is already called %r (%s): this daemon's is %r; connect "
                    "to that one, or give each daemon its own [midi] port_name",
                    name, ", ".join(others), new[0])
    return new[0]
