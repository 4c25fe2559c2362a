"""Helpers of the MQTT bridge (daemon/mqtt.py): counters, payload clipping for logs, JSON,
the best-effort id of a refused command, the state heartbeat's bar length."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from daemon import safelog

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

    def for_state(self) -> dict[str, int]:
        """The counters a client of ``state`` can act on (drops and refusals included)."""
        return {"received": self.commands_received, "handled": self.commands_handled,
                "errors": self.errors_sent, "busy": self.busy,
                "retained_refused": self.retained_refused,
                "events_dropped": self.events_dropped, "reconnects": max(0, self.connects - 1)}


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
