"""OSC control (SPEC section 4): `/clsm/<command>` messages over UDP, the same commands as MIDI CC
and MQTT, validated by the same `daemon.control.parse_command`.

Off unless a port is given (`--osc-port`, `[osc] port`); bound to 127.0.0.1 unless `--osc-host`
says otherwise. Each message's positional arguments are named by `POSITIONAL` and handed to the
validator as a command dict; every message gets an answer sent back to its sender's address:
`/clsm/result <action> <json>`, `/clsm/error <address> <reason>` or, for `/clsm/state`,
`/clsm/state <json>`. Commands run one at a time in arrival order from a bounded queue (a flood
is answered "busy"). The server is a task of the daemon's TaskGroup; receiving never blocks
(the datagram callback only parses and queues) and replies that the socket cannot take are
dropped and counted, never buffered without bound. See docs/osc.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

from daemon.control import Command, CommandError, parse_command
from daemon.mqtt_wire import DaemonLike, dumps
from daemon.safelog import Throttle, clip, show

log = logging.getLogger(__name__)

PREFIX = "/clsm/"
# action -> the command fields its OSC arguments fill, in order (fewer is fine: optional
# fields stay out, missing required ones are the validator's error)
POSITIONAL: dict[str, tuple[str, ...]] = {
    "regenerate": ("first_bar", "bars", "seed"),
    "interpolate": ("alpha",),
    "step": ("direction",),
    "vary": ("delta", "seed"),
    "undo": (),
    "select": ("index",),
    "clear": ("first_bar", "bars"),
    "mode": ("value",),
    "record": ("value",),
    "tempo": ("bpm",),
    "transport": ("value",),
    "seed": ("value",),
    "temperature": ("value",),
    "panic": (),
    "target": ("first_bar", "bars"),
}
ADDRESSES = sorted([*(PREFIX + a for a in POSITIONAL), PREFIX + "state"])
TYPE_TAGS = "ihfdsTF"  # int32, int64, float32, float64, string, true, false
ON_OFF = {"on": True, "off": False, "true": True, "false": False}
MAX_REPLY_BUFFER = 256 * 1024  # bytes of replies waiting for the socket; beyond it they drop


@dataclass
class OscSettings:
    """The `[osc]` section of the config (configs/default.toml)."""

    port: int = 0  # 0 = off; the server itself treats 0 as "any free port" (tests)
    host: str = "127.0.0.1"
    max_datagram: int = 8192  # bytes; larger datagrams are answered with an error, unparsed
    command_queue: int = 32  # commands waiting for the daemon; more = "busy" error

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> OscSettings:
        names = {f.name for f in fields(cls)}
        unknown = set(section) - names
        if unknown:
            raise ValueError(f"[osc]: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**dict(section))


@dataclass
class OscStats:
    received: int = 0  # datagrams
    handled: int = 0  # commands that ran
    errors: int = 0  # error replies (bad input, busy, failed commands)
    busy: int = 0
    replies_dropped: int = 0  # the socket's send buffer was full

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class OscRequestError(CommandError):
    """A datagram that is no command; `address` is what the reply names ("" if unknown)."""

    def __init__(self, message: str, address: str = "") -> None:
        super().__init__(message)
        self.address = address


def _type_tags(data: bytes) -> str:
    """The message's type tag string (without the comma); "" when it has none."""
    end = data.find(b"\0")
    start = (end // 4 + 1) * 4
    if end < 0 or data[start:start + 1] != b",":
        return ""
    stop = data.find(b"\0", start)
    return data[start + 1:stop if stop >= 0 else len(data)].decode("latin-1")


def _decode(data: bytes, max_size: int) -> OscMessage:
    if len(data) > max_size:
        raise OscRequestError(f"datagram is {len(data)} bytes, over the {max_size}-byte limit")
    if data.startswith(b"#bundle"):
        raise OscRequestError("OSC bundles are not supported; send single messages")
    if not data.startswith(b"/"):
        raise OscRequestError(f"not an OSC message (it must start with '/'): {show(data, 40)}")
    address = clip(data[:data.find(b"\0")].decode("utf-8", "replace"), 60) if b"\0" in data else ""
    unsupported = sorted(set(_type_tags(data)) - set(TYPE_TAGS))
    if unsupported:
        raise OscRequestError(f"unsupported OSC argument type(s) {unsupported}; use int, float, "
                              "string, true or false", address)
    try:
        return OscMessage(data)
    except Exception as e:  # noqa: BLE001 - any parse failure of outside bytes is bad input
        raise OscRequestError(f"malformed OSC message: {show(str(e), 80)}", address) from None


def _arg(action: str, name: str, value: Any) -> Any:
    """OSC's vocabulary for on/off switches; every value is then checked by the validator."""
    if action == "record":
        if isinstance(value, str) and value.lower() in ON_OFF:
            return ON_OFF[value.lower()]
        if isinstance(value, int | float) and not isinstance(value, bool) and value in (0, 1):
            return bool(value)  # a toggle widget sends 0 / 1
    return value


def parse_datagram(data: bytes, max_size: int) -> Command | None:
    """One datagram -> a validated Command, or None for a `/clsm/state` request.

    Raises OscRequestError (not OSC, unknown address, wrong argument count or types) or the
    validator's CommandError (out-of-range values)."""
    message = _decode(data, max_size)
    address, params = message.address, list(message.params)
    action = address[len(PREFIX):] if address.startswith(PREFIX) else ""
    if action == "state":
        if params:
            raise OscRequestError("/clsm/state takes no arguments", address)
        return None
    if action not in POSITIONAL:
        raise OscRequestError(f"unknown address {show(address, 60)}; one of {ADDRESSES}",
                              clip(address, 60))
    names = POSITIONAL[action]
    if len(params) > len(names):
        wanted = " ".join(names) or "no arguments"
        raise OscRequestError(f"{address} takes at most {len(names)} argument(s) ({wanted}), "
                              f"got {len(params)}", address)
    obj: dict[str, Any] = {"action": action}
    for name, value in zip(names[:len(params)], params, strict=True):
        obj[name] = _arg(action, name, value)
    try:
        return parse_command(obj, source="osc")
    except CommandError as e:
        raise OscRequestError(str(e), address) from None


def build(address: str, *args: str) -> bytes:
    b = OscMessageBuilder(address)
    for a in args:
        b.add_arg(a, OscMessageBuilder.ARG_TYPE_STRING)
    return b.build().dgram


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: OscServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            self.server.on_datagram(data, addr)
        except Exception:  # noqa: BLE001 - a bug on one datagram must not end the endpoint
            log.exception("OSC handler failed on a datagram from %s", addr)

    def error_received(self, exc: Exception) -> None:
        # e.g. ICMP port unreachable: a sender went away before its reply arrived
        self.server.throttle.warning("OSC socket error: %s", exc)


@dataclass(eq=False)
class OscServer:
    """`await OscServer(settings, daemon).run()` as a task of the daemon's TaskGroup."""

    settings: OscSettings
    daemon: DaemonLike
    stats: OscStats = field(default_factory=OscStats)

    def __post_init__(self) -> None:
        self._commands: asyncio.Queue[tuple[Command, Any]] = asyncio.Queue(
            self.settings.command_queue)
        self._transport: asyncio.DatagramTransport | None = None
        self.address: tuple[str, int] | None = None  # where we listen, once bound
        self.bound = asyncio.Event()
        self.throttle = Throttle(log)  # bad input: one log line per interval, counted

    @contextlib.asynccontextmanager
    async def listening(self) -> AsyncIterator[asyncio.DatagramTransport]:
        s = self.settings
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(s.host, s.port))
        self._transport = transport
        self.address = transport.get_extra_info("sockname")[:2]
        try:
            yield transport
        finally:
            self._transport = None
            self.bound.clear()
            transport.close()

    async def run(self) -> None:
        """Serve until cancelled. A port that cannot be bound is logged; the daemon plays on."""
        s = self.settings
        try:
            async with self.listening():
                log.info("OSC: listening on udp %s:%d (%s...)", *self.address, PREFIX)
                self.bound.set()
                while True:
                    command, addr = await self._commands.get()
                    await self._execute(command, addr)
        except OSError as e:
            if self.address is not None:  # after binding: a bug, logged; the daemon plays on
                log.exception("OSC server failed; OSC is off for the rest of this run")
                return
            log.error("OSC: cannot listen on udp %s:%d (%s); OSC is off for this run: choose "
                      "another --osc-port / --osc-host", s.host, s.port, e)

    # ----- receiving (inside the datagram callback: parse and queue, nothing else) ------
    def on_datagram(self, data: bytes, addr: Any) -> None:
        self.stats.received += 1
        try:
            command = parse_datagram(data, self.settings.max_datagram)
        except OscRequestError as e:
            self.throttle.warning("OSC from %s refused: %s", show(addr, 60), e)
            self.error(e.address, str(e), addr)
            return
        if command is None:
            self.reply(build(PREFIX + "state", self.state_json()), addr)
            return
        try:
            self._commands.put_nowait((command, addr))
        except asyncio.QueueFull:
            self.stats.busy += 1
            self.error(PREFIX + command.action, f"busy: {self._commands.qsize()} commands "
                       "pending, try again later", addr)

    def state_json(self) -> str:
        return dumps({**self.daemon.snapshot(), "osc": self.stats.as_dict()}).decode()

    # ----- running ------------------------------------------------------------------------
    async def _execute(self, command: Command, addr: Any) -> None:
        address = PREFIX + command.action
        try:
            result = await self.daemon.handle(command)
        except Exception as exc:  # noqa: BLE001 - logged and answered; the daemon goes on
            log.exception("OSC command %s failed", command.action)
            self.error(address, f"internal error: {type(exc).__name__}: {exc}", addr)
            return
        emit = getattr(self.daemon, "emit", None)
        if emit is not None:  # MQTT's events show every command's outcome, OSC's too
            emit({"type": "result", "source": "osc", **result})
        if result.get("error"):
            self.error(address, str(result["error"]), addr)
            return
        self.stats.handled += 1
        self.reply(build(PREFIX + "result", command.action, dumps(result).decode()), addr)

    # ----- answering ------------------------------------------------------------------------
    def error(self, address: str, reason: str, addr: Any) -> None:
        self.stats.errors += 1
        self.reply(build(PREFIX + "error", address, reason), addr)

    def reply(self, dgram: bytes, addr: Any) -> None:
        t = self._transport
        if t is None or t.is_closing() or t.get_write_buffer_size() > MAX_REPLY_BUFFER:
            self.stats.replies_dropped += 1
            return
        t.sendto(dgram, addr)
