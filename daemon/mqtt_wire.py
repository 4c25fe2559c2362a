"""Helpers of the MQTT bridge (daemon/mqtt.py): counters, payload clipping for logs, JSON,
the best-effort id of a refused command, the state heartbeat's bar length."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from daemon import safelog

log = logging.getLogger("daemon.mqtt")

EVENTS_IN_FLIGHT = 8  # events published before the first PUBACK is back (aiomqtt warns past 10)
LOG_PAYLOAD_CHARS = 120  # payloads in logs are clipped: a 64 KiB command must not flood the log
_ID_RE = re.compile(rb'"id"\s*:\s*("(?:[^"\\]|\\.){0,200}"|-?\d{1,20})')


class DaemonLike(Protocol):
    """What the bridge needs from daemon.app.Daemon."""

    async def handle(self, command: Any) -> dict: ...  # a result; {"error": ...} or raise = failed

    def snapshot(self) -> dict: ...  # JSON-able: mode, transport, bpm, tokens (docs/mqtt.md)


Parser = Callable[[bytes], Any]  # payload -> control.Command; raises ValueError (CommandError)


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
    retained_refused: int = 0  # retained commands answered with an error, never run
    status_reasserted: int = 0  # foreign statuses on our topic answered with `online`
    takeovers: int = 0  # sessions lost at once after set-up (client id taken over?)

    def for_state(self) -> dict[str, int]:
        """The counters a client of ``state`` can act on (drops and refusals included)."""
        return {"received": self.commands_received, "handled": self.commands_handled,
                "errors": self.errors_sent, "busy": self.busy,
                "retained_refused": self.retained_refused,
                "events_dropped": self.events_dropped, "reconnects": max(0, self.connects - 1),
                "takeovers": self.takeovers}


def clip(payload: bytes | bytearray | str, n: int = LOG_PAYLOAD_CHARS) -> str:
    """A payload for a log line: decoded leniently, control characters escaped, clipped."""
    if isinstance(payload, bytes | bytearray):
        text = bytes(payload[: n + 1]).decode("utf-8", "replace")
        more = f" ({len(payload)} bytes)" if len(payload) > n else ""
        return safelog.escape(text[:n]) + ("..." if more else "") + more
    return safelog.clip(str(payload), n)


def _json_default(obj: Any) -> Any:
    # numpy arrays / scalars in snapshots; anything else becomes its string
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=_json_default).encode()


def id_and_action(payload: bytes, limit: int) -> tuple[Any, str | None]:
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


def bar_seconds(snap: Mapping[str, Any]) -> float | None:
    """Bar length in seconds while the transport plays (4/4), else None (no heartbeat)."""
    transport = snap.get("transport")
    playing = transport in ("playing", "running", "start", "started") or transport is True
    bpm = snap.get("bpm")
    if not playing or not isinstance(bpm, int | float) or bpm <= 0:
        return None
    return 4 * 60.0 / float(bpm)


SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason: another client connected with our id


def disconnect_reason(errors: Iterable[BaseException]) -> int | None:
    """The reason code of the broker's DISCONNECT behind a lost session, if one is known.

    aiomqtt raises "Disconnected during message iteration" from the MqttCodeError that
    carries the broker's code: follow the cause chain to it."""
    for err in errors:
        if isinstance(err, BaseExceptionGroup):  # from the session's own task group
            found = disconnect_reason(err.exceptions)
            if found is not None:
                return found
            continue
        seen: BaseException | None = err
        while seen is not None:
            rc = getattr(seen, "rc", None)
            value = getattr(rc, "value", rc)
            if isinstance(value, int):
                return value
            seen = seen.__cause__
    return None


class TakeoverWatch:
    """Two clients with one client id kick each other off for ever (issue 15, defect 11: 44
    times in 30 s). The broker's reason is not always told (mosquitto may just close the
    socket: paho then reports 128, unspecified), so a session the broker ends within
    `short_s` of setting it up counts too. From `loop_count` of those within `window_s`, say
    so clearly (one ERROR per window) and ask the bridge to reconnect slowly."""

    def __init__(self, client_id: str, loop_count: int = 3, window_s: float = 30.0,
                 short_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.client_id, self.loop_count, self.window_s = client_id, loop_count, window_s
        self.short_s, self._clock = short_s, clock
        self._times: collections.deque[float] = collections.deque()
        self._last_error = -1e18

    def session_ended(self, lasted_s: float | None, reason: int | None,
                      stats: BridgeStats) -> bool:
        """Note a lost session (`lasted_s` None: it never came up); True while looping."""
        now = self._clock()
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        taken = reason == SESSION_TAKEN_OVER
        if not taken and (lasted_s is None or lasted_s > self.short_s):
            return False
        stats.takeovers += 1
        self._times.append(now)
        looping = len(self._times) >= self.loop_count
        if looping and now - self._last_error >= self.window_s:
            self._last_error = now
            cause = "handed our session to another client" if taken else \
                "ended our session right after it was set up"
            log.error("MQTT: the broker %s %d times in %.0f s: most likely another daemon or "
                      "client uses the same client id %s and the two kick each other off. Give "
                      "each its own [mqtt] client_id (or leave it unset for a unique one). "
                      "Reconnecting slowly until this stops.",
                      cause, len(self._times), self.window_s, safelog.show(self.client_id))
        return looping
