"""MQTT steering and retained state (SPEC section 4).

Topics under ``<prefix>/<device_id>/``:
  ``cmd``     in:  one JSON command per message (daemon.control.parse_command validates it)
  ``events``  out: each command's result or error, echoing the command's ``id``
  ``state``   out, retained: the daemon's snapshot, rate-limited, at least once a bar while playing
  ``status``  out, retained: ``online`` after connecting, ``offline`` as last will and on shutdown

The bridge never blocks the daemon: ``notify_state_changed`` and ``publish_event`` only touch
bounded in-memory buffers (the oldest entry is dropped and counted when full), commands wait in a
bounded queue (a flood is answered with "busy" errors), and the broker connection lives in its own
task that reconnects with jittered exponential backoff (aiomqtt v2 does not reconnect by itself,
so we re-enter ``async with Client(...)`` and subscribe again on every connect).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import aiomqtt

from engine.tokens import STEPS_PER_BAR

log = logging.getLogger(__name__)

LOG_PAYLOAD_CHARS = 120  # payloads in logs are clipped: a 64 KiB command must not flood the log
_ID_RE = re.compile(rb'"id"\s*:\s*("(?:[^"\\]|\\.){0,200}"|-?\d{1,20})')


class DaemonLike(Protocol):
    """What the bridge needs from daemon.app.Daemon."""

    async def handle(self, command: Any) -> dict: ...  # a result; {"error": ...} or raise = failed

    def snapshot(self) -> dict: ...  # JSON-able: mode, transport, bpm, tokens (docs/mqtt.md)


Parser = Callable[[bytes], Any]  # payload -> control.Command; raises ValueError (CommandError)


@dataclass
class MqttSettings:
    """The ``[mqtt]`` section of the config (configs/default.toml), overridable from the CLI."""

    enabled: bool = False
    host: str = "localhost"
    port: int = 1883
    username: str = ""
    password: str = ""  # "" = take $CLSM_MQTT_PASSWORD if set (keeps it out of `ps`)
    tls: bool = False
    ca_file: str = ""  # "" = the system's CA store
    tls_insecure: bool = False  # skip host name verification (self-signed test brokers)
    client_id: str = ""  # "" = <prefix>-<device_id>
    prefix: str = "clsm"
    device_id: str = ""  # "" = the host name
    max_payload: int = 65536  # bytes; larger commands are refused with an error event
    state_min_interval_s: float = 0.1  # state is published at most this often
    qos: int = 1
    keepalive_s: int = 30
    timeout_s: float = 5.0  # per broker operation; bounds how long shutdown can wait
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    command_queue: int = 32  # commands waiting for the daemon; more = "busy" error
    event_queue: int = 256  # unsent events kept while the broker is slow or away
    incoming_queue: int = 256  # aiomqtt's incoming buffer; paho drops beyond it

    @classmethod
    def from_config(
        cls, section: Mapping[str, Any], args: argparse.Namespace | None = None
    ) -> MqttSettings:
        """Build from a config section (unknown keys are errors) and optional ``--mqtt-*`` args."""
        names = {f.name for f in fields(cls)}
        unknown = set(section) - names
        if unknown:
            raise ValueError(f"[mqtt]: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
        settings = cls(**dict(section))
        if args is not None:
            for name in names:
                value = getattr(args, f"mqtt_{name}", None)
                if value is not None:
                    setattr(settings, name, value)
            if getattr(args, "mqtt_host", None):
                settings.enabled = True  # giving a broker on the command line means "use it"
        return settings.resolved()

    def resolved(self) -> MqttSettings:
        """Fill the defaults that depend on the machine, and check values."""
        if not self.device_id:
            self.device_id = socket.gethostname() or "clsm"
        # MQTT wildcards or separators in the device id would change which topics we use
        self.device_id = re.sub(r"[+#/\s]", "_", self.device_id)
        if self.prefix.strip("/") != self.prefix or any(c in self.prefix for c in "+#"):
            raise ValueError(f"[mqtt] prefix {self.prefix!r}: no wildcards or edge slashes")
        if not self.client_id:
            self.client_id = f"{self.prefix.replace('/', '-')}-{self.device_id}"
        if not self.password:
            self.password = os.environ.get("CLSM_MQTT_PASSWORD", "")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"[mqtt] port {self.port} out of range 1..65535")
        if self.qos not in (0, 1, 2):
            raise ValueError(f"[mqtt] qos {self.qos} must be 0, 1 or 2")
        for name in ("max_payload", "command_queue", "event_queue", "incoming_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"[mqtt] {name} must be >= 1")
        return self

    def topic(self, leaf: str) -> str:
        return f"{self.prefix}/{self.device_id}/{leaf}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--mqtt-*`` options; ``MqttSettings.from_config(section, args)`` reads them."""
    g = parser.add_argument_group("MQTT (override [mqtt] of the config)")
    g.add_argument("--mqtt-host", help="broker host; giving it enables MQTT")
    g.add_argument("--mqtt-port", type=int)
    for name in ("username", "password", "ca-file", "client-id", "prefix", "device-id"):
        g.add_argument(f"--mqtt-{name}")  # password: prefer $CLSM_MQTT_PASSWORD
    for flag in ("tls", "tls-insecure"):
        g.add_argument(f"--mqtt-{flag}", action="store_true", default=None)


@dataclass
class BridgeStats:
    """Counters for logs, health checks and the soak test."""

    connects: int = 0
    connect_failures: int = 0
    commands_received: int = 0
    commands_handled: int = 0
    errors_sent: int = 0  # error events queued (bad input, busy, failed commands)
    busy: int = 0  # commands refused because the command queue was full
    events_dropped: int = 0  # oldest unsent events dropped because the buffer was full
    state_published: int = 0
    state_dropped: int = 0  # state snapshots replaced by a newer one before being sent
    state_coalesced: int = 0  # change notifications folded into a later snapshot
    handler_crashes: int = 0


def clip(payload: bytes | str, n: int = LOG_PAYLOAD_CHARS) -> str:
    """A payload for a log line: decoded leniently and clipped."""
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} chars)"


def _json_default(obj: Any) -> Any:
    # numpy arrays / scalars in snapshots; anything else becomes its string
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=_json_default).encode()


def _id_and_action(payload: bytes, limit: int) -> tuple[Any, str | None]:
    """Best effort: the id (and action) of a command that failed validation, to echo back."""
    obj: Any = None
    if len(payload) <= limit:
        with contextlib.suppress(ValueError, RecursionError):
            obj = json.loads(payload)
    if not isinstance(obj, dict):  # oversized or not JSON: look near the start
        m = _ID_RE.search(payload[:1024])
        obj = {}
        with contextlib.suppress(ValueError):
            obj = {"id": json.loads(m.group(1))} if m else {}
    cid, action = obj.get("id"), obj.get("action")
    if isinstance(cid, str):
        cid = cid[:200]
    elif not isinstance(cid, int | float) or isinstance(cid, bool):
        cid = None  # objects or lists are not echoed
    return cid, action if isinstance(action, str) else None


@dataclass(eq=False)
class MqttBridge:
    """Connects the daemon to a broker. Run ``run()`` as a task in the daemon's TaskGroup."""

    settings: MqttSettings
    daemon: DaemonLike
    parse: Parser | None = None  # default: daemon.control.parse_payload
    stats: BridgeStats = field(default_factory=BridgeStats)

    def __post_init__(self) -> None:
        if self.parse is None:
            from daemon.control import parse_payload  # late: this module imports on its own

            limit = self.settings.max_payload
            self.parse = lambda data: parse_payload(data, limit)
        s = self.settings
        self.cmd_topic, self.state_topic = s.topic("cmd"), s.topic("state")
        self.status_topic, self.events_topic = s.topic("status"), s.topic("events")
        self._commands: asyncio.Queue[tuple[Any, float]] = asyncio.Queue(s.command_queue)
        self._events: collections.deque[bytes] = collections.deque()
        self._state: bytes | None = None  # latest snapshot, sent or not
        self._state_unsent = False
        self._state_dirty = asyncio.Event()
        self._wake_writer = asyncio.Event()
        self._last_state_t = -1e9
        self._bar_s: float | None = None  # bar length while playing: the state heartbeat
        self.connected = asyncio.Event()  # set while a session is up (tests and health)
        self._state_dirty.set()  # the first snapshot goes out as soon as we run
        self._notifies = 0

    # ----- non-blocking API for the daemon -----
    def notify_state_changed(self) -> None:
        """Something that matters changed; a snapshot is published within the min interval."""
        self._state_dirty.set()
        self._notifies += 1

    def publish_event(self, event: dict) -> None:
        """Queue a message on ``events``; never blocks. Drops the oldest if the buffer is full."""
        if len(self._events) >= self.settings.event_queue:
            self._events.popleft()
            self.stats.events_dropped += 1
        self._events.append(dumps(event))
        self._wake_writer.set()

    def _error(self, message: str, cid: Any = None, action: str | None = None) -> None:
        self.stats.errors_sent += 1
        event: dict[str, Any] = {"type": "error", "ok": False, "error": message}
        if cid is not None:
            event["id"] = cid
        if action is not None:
            event["action"] = action
        self.publish_event(event)

    # ----- the task -----
    async def run(self) -> None:
        """Serve until cancelled. Broker trouble is logged and retried, never raised."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._command_loop(), name="mqtt-commands")
            tg.create_task(self._state_loop(), name="mqtt-state")
            tg.create_task(self._connection_loop(), name="mqtt-connection")

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        tls = aiomqtt.TLSParameters(ca_certs=s.ca_file or None) if s.tls else None
        return aiomqtt.Client(
            s.host, s.port, username=s.username or None, password=s.password or None,
            identifier=s.client_id, keepalive=s.keepalive_s, timeout=s.timeout_s,
            will=aiomqtt.Will(self.status_topic, b"offline", qos=1, retain=True),
            tls_params=tls, tls_insecure=s.tls_insecure if s.tls else None,
            max_queued_incoming_messages=s.incoming_queue,
            # small packets must not wait for the broker's delayed ACK (Nagle): tens of ms
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )

    async def _connection_loop(self) -> None:
        attempt = 0
        while True:
            try:
                async with self._client() as client:
                    attempt = 0
                    await self._session(client)
            except* aiomqtt.MqttError as group:
                self.stats.connect_failures += 1
                log.warning("MQTT %s:%d: %s", self.settings.host, self.settings.port,
                            "; ".join(str(e) for e in group.exceptions))
            except* Exception:  # a bug must not end MQTT for the rest of the gig
                self.stats.connect_failures += 1
                log.exception("MQTT session failed")
            finally:
                self.connected.clear()
            delay = self._backoff(attempt)
            attempt += 1
            log.info("MQTT reconnecting in %.2f s", delay)
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        ceiling = min(s.reconnect_max_s, s.reconnect_min_s * 2**min(attempt, 30))
        return random.uniform(ceiling / 2, ceiling)  # jitter: many daemons must not stampede

    async def _session(self, client: aiomqtt.Client) -> None:
        # subscribe first so that a retained "online" means "ready for commands"
        await client.subscribe(self.cmd_topic, qos=self.settings.qos)
        await client.publish(self.status_topic, b"online", qos=1, retain=True)
        self.stats.connects += 1
        self.connected.set()
        log.info("MQTT connected to %s:%d as %s, commands on %s", self.settings.host,
                 self.settings.port, self.settings.client_id, self.cmd_topic)
        # the broker may have restarted without persistence: the retained state goes out again
        self._state_unsent = self._state is not None
        self._wake_writer.set()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._reader(client), name="mqtt-reader")
                tg.create_task(self._writer(client), name="mqtt-writer")
        except asyncio.CancelledError:
            # clean shutdown: the will only fires on an unclean one, so say it ourselves
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(self.settings.timeout_s):
                    await client.publish(self.status_topic, b"offline", qos=1, retain=True)
            raise

    async def _reader(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                self._on_message(message.payload)
            except Exception:  # noqa: BLE001 - one bad message must not drop the connection
                self.stats.handler_crashes += 1
                log.exception("MQTT handler failed on %s", clip(message.payload))

    def _on_message(self, payload: Any) -> None:
        """Validate one ``cmd`` payload and queue it, or answer with an error event."""
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode()
        self.stats.commands_received += 1
        try:  # size, UTF-8, JSON, fields: daemon.control validates, in one place for CC and MQTT
            command = self.parse(bytes(payload))  # type: ignore[misc]
        except ValueError as exc:  # CommandError: the message names the problem
            log.info("MQTT cmd rejected (%s): %s", exc, clip(payload))
            self._error(str(exc), *_id_and_action(bytes(payload), self.settings.max_payload))
            return
        cid, action = command.id, command.action
        try:
            self._commands.put_nowait((command, time.perf_counter()))
        except asyncio.QueueFull:
            self.stats.busy += 1
            self._error(f"busy: {self._commands.qsize()} commands pending, try again later",
                        cid, action)

    async def _command_loop(self) -> None:
        # one at a time, in arrival order: "regenerate" then "undo" must mean just that
        while True:
            command, received = await self._commands.get()
            await self._execute(command, received)

    async def _execute(self, command: Any, received: float) -> None:
        cid, action = command.id, command.action
        try:
            result = await self.daemon.handle(command)
        except ValueError as exc:  # CommandError / EngineError-like: a clear answer
            self._error(str(exc), cid, action)
            return
        except Exception as exc:  # noqa: BLE001 - logged; the daemon goes on
            log.exception("command %s failed", action)
            self._error(f"internal error: {type(exc).__name__}: {exc}", cid, action)
            return
        finally:
            self.notify_state_changed()
        result = result if isinstance(result, dict) else {"result": result}
        if result.get("error"):
            self._error(str(result["error"]), cid, action)
            return
        self.stats.commands_handled += 1
        event = {"type": "result", **result, "ok": True, "action": action,
                 "handled_ms": round((time.perf_counter() - received) * 1000, 3)}
        if cid is not None:
            event["id"] = cid
        if "tokens" not in event and isinstance(event.get("first_bar"), int):
            self._add_tokens(event)
        self.publish_event(event)

    def _add_tokens(self, event: dict) -> None:
        """The generated bars' tokens, from the state, when the result only names the bars."""
        first, last = event["first_bar"], event.get("last_bar", event["first_bar"])
        try:
            tokens = self.daemon.snapshot().get("tokens")
        except Exception:  # noqa: BLE001 - the result goes out without tokens
            log.exception("daemon snapshot failed")
            return
        if isinstance(tokens, list | tuple) and isinstance(last, int):
            event["tokens"] = list(tokens[(first - 1) * STEPS_PER_BAR:last * STEPS_PER_BAR])

    def on_daemon_event(self, event: dict) -> None:
        """A ``Daemon.listeners`` callback: state changes, CC results, transport, errors."""
        if event.get("type") != "state":
            self.publish_event(event)  # results of MQTT commands are published by _execute
        self.notify_state_changed()

    async def _state_loop(self) -> None:
        interval = self.settings.state_min_interval_s
        while True:
            heartbeat = False
            try:
                async with asyncio.timeout(self._bar_s):  # None = wait for a change
                    await self._state_dirty.wait()
            except TimeoutError:
                heartbeat = True  # playing: at least once a bar even if nothing was notified
            wait = self._last_state_t + interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # rate limit: later notifications ride along
            self._state_dirty.clear()
            self.stats.state_coalesced += max(0, self._notifies - 1)
            self._notifies = 0
            self._last_state_t = time.monotonic()
            try:
                self._take_snapshot(heartbeat)
            except Exception:  # noqa: BLE001 - a broken snapshot must not stop the loop
                log.exception("daemon snapshot failed")

    def _take_snapshot(self, heartbeat: bool) -> None:
        snap = self.daemon.snapshot()
        self._bar_s = _bar_seconds(snap)
        payload = dumps(snap)
        if payload == self._state and not heartbeat:
            return  # nothing that matters changed
        if self._state_unsent:
            self.stats.state_dropped += 1  # the writer never got to the previous one
        self._state, self._state_unsent = payload, True
        self._wake_writer.set()

    async def _writer(self, client: aiomqtt.Client) -> None:
        qos = self.settings.qos
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._state_unsent or self._events:
                if self._state_unsent and self._state is not None:
                    # taken now: a snapshot arriving during the publish is a new one, not a drop
                    # (a failed publish is redone by the next session, which resends the state)
                    self._state_unsent = False
                    await client.publish(self.state_topic, self._state, qos=qos, retain=True)
                    self.stats.state_published += 1
                if self._events:
                    # peek, publish, then pop: an event survives a publish that fails
                    event = self._events[0]
                    await client.publish(self.events_topic, event, qos=qos)
                    if self._events and self._events[0] is event:  # not dropped meanwhile
                        self._events.popleft()


def _bar_seconds(snap: Mapping[str, Any]) -> float | None:
    """Bar length in seconds while the transport plays (4/4), else None (no heartbeat)."""
    transport = snap.get("transport")
    playing = transport in ("playing", "running", "start", "started") or transport is True
    bpm = snap.get("bpm")
    if not playing or not isinstance(bpm, int | float) or bpm <= 0:
        return None
    return 4 * 60.0 / float(bpm)
