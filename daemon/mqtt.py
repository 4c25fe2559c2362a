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

Hostile input (issue 15): MQTT 5 so that the broker drops packets over ``max_packet`` before they
reach Python, and flags commands published retained (retain-as-published); retained commands are
refused with an error event, never run; a foreign status on our topic is answered with
``online``; a full incoming queue answers "busy" instead of discarding; counters in ``state``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from daemon.mqtt_client import make_client
from daemon.mqtt_settings import MqttSettings, add_arguments
from daemon.mqtt_wire import (
    EVENTS_IN_FLIGHT,
    BridgeStats,
    DaemonLike,
    Parser,
    TakeoverWatch,
    bar_seconds,
    clip,
    disconnect_reason,
    dumps,
    id_and_action,
)
from daemon.safelog import Throttle
from engine.tokens import STEPS_PER_BAR

log = logging.getLogger(__name__)

__all__ = ["MqttBridge", "MqttSettings", "add_arguments", "BridgeStats", "DaemonLike"]


async def _cancel_until_done(tasks: list[asyncio.Task], every_s: float = 0.2) -> None:
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every_s)


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
        self._stopping = False
        # bad input is answered one by one on `events`, but logged one line per interval: a
        # flood of bad or retained commands must not flood the log (issue 15, defect 9)
        self._rejected_log, self._retained_log = Throttle(log), Throttle(log)

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
        """Serve until cancelled. Broker trouble is logged and retried, never raised.

        The stop is level-triggered (cancelled again until they end): on Python 3.11 a cancel
        that lands while a session's TaskGroup is already aborting (the broker dropped us at
        that moment) is swallowed by it, and the connection loop would reconnect for ever."""
        tasks = [asyncio.create_task(self._command_loop(), name="mqtt-commands"),
                 asyncio.create_task(self._state_loop(), name="mqtt-state"),
                 asyncio.create_task(self._connection_loop(), name="mqtt-connection")]
        try:
            await asyncio.gather(*tasks)
        finally:
            self._stopping = True  # no reconnect once the stop has begun, even if a cancel is lost
            await _cancel_until_done(tasks)

    def _client(self) -> aiomqtt.Client:
        return make_client(self.settings, self.status_topic, self._overflow)

    def _overflow(self, message: aiomqtt.Message) -> None:
        try:
            if not message.topic.matches(self.cmd_topic):
                return
            payload = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) \
                else str(message.payload).encode()
            self.stats.commands_received += 1
            self.stats.busy += 1
            self._error("busy: the daemon is reading a flood of commands, try again later",
                        *id_and_action(payload, self.settings.max_payload))
            self.notify_state_changed()
        except Exception:  # noqa: BLE001 - runs inside paho's callback: never raise there
            self.stats.handler_crashes += 1
            log.exception("MQTT overflow handler failed")

    async def _connection_loop(self) -> None:
        attempt = 0
        watch = TakeoverWatch(self.settings.client_id)
        while not self._stopping:
            lost: list[BaseException] = []
            self._session_start: float | None = None
            cancelled = False
            try:
                async with self._client() as client:
                    attempt = 0
                    try:
                        await self._session(client)
                    except asyncio.CancelledError:
                        cancelled = True
                        raise
            except* aiomqtt.MqttError as group:
                lost = list(group.exceptions)
                self.stats.connect_failures += 1
                log.warning("MQTT %s:%d: %s", self.settings.host, self.settings.port,
                            "; ".join(str(e) for e in group.exceptions))
            except* Exception:  # a bug must not end MQTT for the rest of the gig
                self.stats.connect_failures += 1
                log.exception("MQTT session failed")
            finally:
                self.connected.clear()
            if cancelled or self._stopping:
                # cancelled, but leaving aiomqtt's `async with` raised an MqttError (a drop) that
                # replaced the CancelledError: a reconnect would hang the shutdown. (Not
                # task.cancelling(): a 3.11 TaskGroup whose child fails in its exit leaves it up.)
                raise asyncio.CancelledError
            lasted = None if self._session_start is None else time.monotonic() - self._session_start
            if lost and watch.session_ended(lasted, disconnect_reason(lost), self.stats):
                attempt = max(attempt, 30)  # the slowest backoff: let the other one have it
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
        await client.subscribe(self.cmd_topic, options=SubscribeOptions(
            qos=self.settings.qos, retainAsPublished=True))
        # someone else's status on our topic (a spoofed or stale `offline`) is answered; our
        # own publishes (noLocal) and what was retained before we came (we overwrite it) not
        await client.subscribe(self.status_topic, options=SubscribeOptions(
            qos=1, noLocal=True, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND))
        await client.publish(self.status_topic, b"online", qos=1, retain=True)
        self.stats.connects += 1
        self._session_start = time.monotonic()
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
                if message.topic.matches(self.status_topic):
                    await self._on_status(client, message.payload)
                elif message.retain:
                    self._refuse_retained(message.payload)
                else:
                    self._on_message(message.payload)
            except aiomqtt.MqttError:
                raise  # the connection is gone: reconnect
            except Exception:  # noqa: BLE001 - one bad message must not drop the connection
                self.stats.handler_crashes += 1
                log.exception("MQTT handler failed on %s", clip(message.payload))
                with contextlib.suppress(Exception):  # still an answer, never silence
                    payload = message.payload if isinstance(message.payload, bytes) else b""
                    self._error("internal error on this command; it was not run",
                                *id_and_action(payload, self.settings.max_payload))

    async def _on_status(self, client: aiomqtt.Client, payload: Any) -> None:
        if payload == b"online":
            return  # another bridge with our device id; nothing is wrong with what it says
        self.stats.status_reasserted += 1
        log.warning("foreign status %s on %s: publishing online again", clip(payload),
                    self.status_topic)
        await client.publish(self.status_topic, b"online", qos=1, retain=True)

    def _refuse_retained(self, payload: Any) -> None:
        """A retained command would run again at every start and reconnect: never run it."""
        data = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
        if not data:
            return  # someone clearing a retained command: not a command itself
        self.stats.commands_received += 1
        self.stats.retained_refused += 1
        self._retained_log.warning("MQTT retained command refused: %s", clip(data))
        self._error("retained commands are never run; publish commands without the retain flag "
                    "(and clear the retained one: publish an empty retained message to "
                    f"{self.cmd_topic})", *id_and_action(bytes(data), self.settings.max_payload))

    def _on_message(self, payload: Any) -> None:
        """Validate one ``cmd`` payload and queue it, or answer with an error event."""
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode()
        self.stats.commands_received += 1
        try:  # size, UTF-8, JSON, fields: daemon.control validates, in one place for CC and MQTT
            command = self.parse(bytes(payload))  # type: ignore[misc]
        except ValueError as exc:  # CommandError: the message names the problem
            self._rejected_log.log(logging.INFO, "MQTT cmd rejected (%s): %s", exc, clip(payload))
            self._error(str(exc), *id_and_action(bytes(payload), self.settings.max_payload))
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
        self._bar_s = bar_seconds(snap)
        snap = {**snap, "mqtt": self.stats.for_state()}
        payload = dumps(snap)
        if payload == self._state and not heartbeat:
            return  # nothing that matters changed
        if self._state_unsent:
            self.stats.state_dropped += 1  # the writer never got to the previous one
        self._state, self._state_unsent = payload, True
        self._wake_writer.set()

    async def _writer(self, client: aiomqtt.Client) -> None:
        qos = self.settings.qos
        # events go out pipelined (in order, up to EVENTS_IN_FLIGHT awaiting their PUBACK): one
        # round trip per event would answer a flood slower than it arrives
        in_flight = asyncio.Semaphore(EVENTS_IN_FLIGHT)
        async with asyncio.TaskGroup() as tg:
            while True:
                await self._wake_writer.wait()
                self._wake_writer.clear()
                while self._state_unsent or self._events:
                    if self._state_unsent and self._state is not None:
                        # taken now: a snapshot arriving during the publish is a new one, not a
                        # drop (a failed publish is redone by the next session, which resends it)
                        self._state_unsent = False
                        await client.publish(self.state_topic, self._state, qos=qos, retain=True)
                        self.stats.state_published += 1
                    if self._events:
                        await in_flight.acquire()
                        if not self._events:  # dropped while we waited
                            in_flight.release()
                            continue
                        event = self._events.popleft()
                        tg.create_task(self._send_event(client, event, in_flight))

    async def _send_event(self, client: aiomqtt.Client, event: bytes,
                          in_flight: asyncio.Semaphore) -> None:
        try:
            await client.publish(self.events_topic, event, qos=self.settings.qos)
        except BaseException:
            # the session is ending: the event goes out with the next one
            self._events.appendleft(event)
            raise
        finally:
            in_flight.release()
