"""Commands, the same over MIDI CC, MQTT and OSC (SPEC section 4), validated in one place.

`parse_command` checks a JSON-like dict (MQTT), `parse_payload` adds the size limit and JSON
decoding, and `CCMapper` turns control-channel CCs into the same Commands (built through
`parse_command`, so both paths share one validator). Knob CCs coalesce: a burst of 100 values
becomes one command with the last value, taken with `drain()` when the app is ready for it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon import rules
from daemon.rules import MAX_DELTA, MAX_TARGET_BARS, N_BARS
from daemon.safelog import show

log = logging.getLogger(__name__)

MAX_ID_LEN = 128
SOURCES = ("cc", "mqtt", "osc")


class CommandError(ValueError):
    """A command that cannot be run; the message names the problem."""


@dataclass(frozen=True)
class Command:
    action: str  # see ACTIONS
    args: dict[str, Any] = field(default_factory=dict)  # validated, typed values
    id: str | None = None  # echoed back in MQTT events
    source: str = "cc"  # "cc" | "mqtt" | "osc"

    def to_dict(self) -> dict[str, Any]:
        """The command as its JSON payload (for events and logs)."""
        out: dict[str, Any] = {"action": self.action, **self.args}
        if self.id is not None:
            out["id"] = self.id
        return out


# ----- field checks: (action, field, value) -> typed value, or CommandError -----------------
Check = Callable[[str, str, Any], Any]


def _field(rule: rules.Rule) -> Check:
    """A command field checked by its rule in `daemon.rules`, the error naming the action."""
    def check(action: str, name: str, value: Any) -> Any:
        try:
            return rule(name, value)
        except rules.RuleError as err:
            raise CommandError(f"{action}: {err}") from None

    return check


_BAR = _field(rules.FIRST_BAR)
_BARS = _field(rules.BARS)
_SEED = _field(rules.SEED)
_TEMPERATURE = _field(rules.TEMPERATURE)

# action -> field -> (check, required). Optional fields left out are left out of args.
ACTIONS: dict[str, dict[str, tuple[Check, bool]]] = {
    "regenerate": {"first_bar": (_BAR, False), "bars": (_BARS, False), "seed": (_SEED, False),
                   "temperature": (_TEMPERATURE, False)},
    "interpolate": {"alpha": (_field(rules.ALPHA), True)},
    "step": {"direction": (_field(rules.DIRECTION), False)},
    "vary": {"delta": (_field(rules.DELTA), True), "seed": (_SEED, False)},
    "undo": {},
    "select": {"index": (_field(rules.CANDIDATE), True)},  # candidate n of the target current
    "clear": {"first_bar": (_BAR, False), "bars": (_BARS, False)},
    "mode": {"value": (_field(rules.MODE), True)},
    "record": {"value": (_field(rules.ON_OFF), True)},
    "tempo": {"bpm": (_field(rules.BPM), True)},
    "transport": {"value": (_field(rules.TRANSPORT), True)},
    "seed": {"value": (_SEED, True)},
    "temperature": {"value": (_TEMPERATURE, True)},
    "panic": {},
    "target": {"first_bar": (_BAR, False), "bars": (_BARS, False)},
}
DEFAULTS: dict[str, dict[str, Any]] = {"step": {"direction": 1}}


def _cross_check(action: str, args: dict[str, Any]) -> None:
    first, bars = args.get("first_bar"), args.get("bars")
    if first is not None and bars is not None:
        try:
            rules.check_target(first, bars)
        except rules.RuleError as err:
            raise CommandError(f"{action}: {err}") from None
    if action == "clear" and bars is not None and first is None:
        raise CommandError("clear: 'bars' needs 'first_bar' (no fields = clear the target)")
    if action == "target" and first is None and bars is None:
        raise CommandError("target: give 'first_bar', 'bars' or both")


def parse_command(obj: Any, source: str = "mqtt") -> Command:
    """Validate a JSON-like command, e.g. {"action": "regenerate", "first_bar": 5, "bars": 2}."""
    if source not in SOURCES:
        raise CommandError(f"source must be one of {SOURCES}, got {source!r}")
    if not isinstance(obj, Mapping):
        raise CommandError(
            f'a command must be a JSON object like {{"action": "undo"}}, got {type(obj).__name__}'
        )
    if "action" not in obj:
        raise CommandError(f"missing 'action'; one of {sorted(ACTIONS)}")
    action = obj["action"]
    if not isinstance(action, str) or action not in ACTIONS:
        raise CommandError(f"unknown action {show(action)}; one of {sorted(ACTIONS)}")
    cid = obj.get("id")
    if cid is not None and (not isinstance(cid, str) or len(cid) > MAX_ID_LEN):
        raise CommandError(f"'id' must be a string of at most {MAX_ID_LEN} characters")
    spec = ACTIONS[action]
    extra = sorted(str(k) for k in obj if k not in spec and k not in ("action", "id"))
    if extra:
        allowed = sorted(spec) or "none"
        names = ", ".join(show(k, 40) for k in extra[:5]) + (", ..." if len(extra) > 5 else "")
        raise CommandError(f"{action}: unknown field(s) [{names}]; allowed: {allowed}")
    args = dict(DEFAULTS.get(action, {}))
    for name, (check, required) in spec.items():
        if name in obj:
            args[name] = check(action, name, obj[name])
        elif required:
            raise CommandError(f"{action}: missing '{name}'")
    _cross_check(action, args)
    return Command(action, args, cid, source)


def parse_payload(data: bytes | bytearray | str, max_size: int) -> Command:
    """MQTT payload -> Command: size limit, UTF-8, JSON, then parse_command."""
    if isinstance(data, str):
        data = data.encode()
    if not isinstance(data, bytes | bytearray):
        raise CommandError(f"payload must be bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise CommandError(f"payload is {len(data)} bytes, over the {max_size}-byte limit")
    if not data.strip():
        raise CommandError('empty payload; send a JSON object like {"action": "undo"}')
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as err:
        raise CommandError(f"payload is not UTF-8 text (byte {err.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise CommandError(
            f"malformed JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from None
    except RecursionError:
        raise CommandError("malformed JSON: nested too deeply") from None
    except ValueError as err:  # an integer past Python's 4300-digit conversion limit
        raise CommandError(f"malformed JSON: {show(str(err), 80)}") from None
    return parse_command(obj, "mqtt")


# ----- MIDI CC ----------------------------------------------------------------------------
BUTTONS = {  # CC name -> (action, args); value >= 64 triggers, a release (< 64) does nothing
    "regenerate": ("regenerate", {}),
    "interpolate_step": ("step", {"direction": 1}),
    "undo": ("undo", {}),
    "clear": ("clear", {}),
    "panic": ("panic", {}),
}
SWITCHES = {  # CC name -> (action, value below 64, value from 64)
    "mode": ("mode", "loop", "follow"),
    "record": ("record", False, True),
    "transport": ("transport", "stop", "start"),
}
KNOBS = ("target_bar", "target_length", "interpolate_alpha", "vary", "tempo", "seed",
         "temperature")
CC_NAMES = (*BUTTONS, *SWITCHES, *KNOBS)


class Coalescer:
    """Keeps only the latest pending command per action (target merges its two fields)."""

    def __init__(self) -> None:
        self._pending: dict[str, Command] = {}

    def put(self, cmd: Command) -> None:
        old = self._pending.get(cmd.action)
        if old is not None and cmd.action == "target":
            cmd = Command("target", {**old.args, **cmd.args}, cmd.id, cmd.source)
        self._pending[cmd.action] = cmd

    def drain(self) -> list[Command]:
        out, self._pending = list(self._pending.values()), {}
        return out

    def __len__(self) -> int:
        return len(self._pending)


class CCMapper:
    """configs/default.toml [control] -> Commands. Channel is 1..16 as in the config."""

    def __init__(self, channel: int, cc_map: Mapping[str, int], *, max_delta: float = 2.0) -> None:
        if isinstance(channel, bool) or not isinstance(channel, int) or not 1 <= channel <= 16:
            raise CommandError(f"control.channel must be 1..16, got {channel!r}")
        if not 0 < max_delta <= MAX_DELTA:
            raise CommandError(f"control.max_delta must be in (0, {MAX_DELTA:g}], got {max_delta}")
        unknown = sorted(set(cc_map) - set(CC_NAMES))
        if unknown:
            raise CommandError(f"control.cc: unknown command(s) {unknown}; known: {CC_NAMES}")
        by_cc: dict[int, str] = {}
        for name, cc in cc_map.items():
            if isinstance(cc, bool) or not isinstance(cc, int) or not 0 <= cc <= 127:
                raise CommandError(f"control.cc.{name} must be a CC number 0..127, got {cc!r}")
            if cc in by_cc:
                raise CommandError(f"control.cc: CC {cc} is used by both {by_cc[cc]} and {name}")
            by_cc[cc] = name
        self.channel = channel
        self.max_delta = float(max_delta)
        self._by_cc = by_cc
        self._switch_state: dict[str, bool] = {}
        self.coalescer = Coalescer()

    def feed(self, msg: Any) -> Command | None:
        """A button / switch command now; knobs go to the coalescer (None); others None."""
        if getattr(msg, "type", None) != "control_change" or msg.channel != self.channel - 1:
            return None
        name = self._by_cc.get(msg.control)
        if name is None:
            return None
        value = int(msg.value)
        on = value >= 64
        if name in BUTTONS:
            action, args = BUTTONS[name]
            return self._make(action, args) if on else None
        if name in SWITCHES:
            # Only a crossing of the middle counts, so a fader sweep is one command.
            if self._switch_state.get(name) == on:
                return None
            self._switch_state[name] = on
            action, low, high = SWITCHES[name]
            return self._make(action, {"value": high if on else low})
        self.coalescer.put(self._knob(name, value))
        return None

    def feed_all(self, msg: Any) -> list[Command]:
        """Like feed, but a button first releases pending knobs, so "turn the target knob,
        press regenerate" regenerates the new target."""
        cmd = self.feed(msg)
        return [*self.drain(), cmd] if cmd is not None else []

    def drain(self) -> list[Command]:
        return self.coalescer.drain()

    def _knob(self, name: str, value: int) -> Command:
        if name == "target_bar":
            return self._make("target", {"first_bar": 1 + value * N_BARS // 128})
        if name == "target_length":
            return self._make("target", {"bars": 1 + value * MAX_TARGET_BARS // 128})
        if name == "interpolate_alpha":
            return self._make("interpolate", {"alpha": value / 127})
        if name == "vary":
            return self._make("vary", {"delta": value / 127 * self.max_delta})
        if name == "tempo":
            return self._make("tempo", {"bpm": 40.0 + value})
        if name == "seed":
            return self._make("seed", {"value": value})
        return self._make("temperature", {"value": 0.0 if value == 0 else value / 64})

    @staticmethod
    def _make(action: str, args: dict[str, Any]) -> Command:
        return parse_command({"action": action, **args}, source="cc")
