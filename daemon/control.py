"""Commands, the same over MIDI CC, MQTT and OSC (SPEC section 4), validated in one place.

`parse_command` checks a JSON-like dict (MQTT), `parse_payload` adds the size limit and JSON
decoding, and `CCMapper` turns control-channel CCs into the same Commands (built through
`parse_command`, so both paths share one validator). Knob CCs coalesce: a burst of 100 values
becomes one command with the last value, taken with `drain()` when the app is ready for it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon.safelog import show

log = logging.getLogger(__name__)

N_BARS = 8
MAX_TARGET_BARS = 4
MAX_SEED = 2**31 - 1
MAX_DELTA = 4.0  # variation distance in prior standard deviations; beyond this it is noise
MAX_TEMPERATURE = 10.0
BPM_RANGE = (20.0, 300.0)
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


# ----- field validators: (action, field, value) -> typed value, or CommandError ------------
Check = Callable[[str, str, Any], Any]


def _int(lo: int, hi: int, *, none_ok: bool = False) -> Check:
    def check(action: str, name: str, value: Any) -> Any:
        if value is None and none_ok:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 5.0 from a JSON library that writes floats is still bar 5
        if isinstance(value, bool) or not isinstance(value, int):
            raise CommandError(f"{action}: '{name}' must be an integer, got {show(value)}")
        if not lo <= value <= hi:
            raise CommandError(f"{action}: '{name}' must be {lo}..{hi}, got {show(value)}")
        return value

    return check


def _num(lo: float, hi: float) -> Check:
    def check(action: str, name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CommandError(f"{action}: '{name}' must be a number, got {show(value)}")
        # an int is compared as an int: float(10**400) and math.isfinite(10**400) overflow
        if (isinstance(value, float) and not math.isfinite(value)) or not lo <= value <= hi:
            raise CommandError(f"{action}: '{name}' must be {lo:g}..{hi:g}, got {show(value)}")
        return float(value)

    return check


def _choice(*choices: Any) -> Check:
    def check(action: str, name: str, value: Any) -> Any:
        # `True in (1, -1)` is true in Python: refuse bools unless they are the choices.
        if (isinstance(value, bool) and bool not in map(type, choices)) or value not in choices:
            raise CommandError(
                f"{action}: '{name}' must be one of {list(choices)}, got {show(value)}")
        return value

    return check


def _bool(action: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise CommandError(f"{action}: '{name}' must be true or false, got {show(value)}")
    return value


_BAR = _int(1, N_BARS)
_BARS = _int(1, MAX_TARGET_BARS)
_SEED = _int(0, MAX_SEED, none_ok=True)

# action -> field -> (check, required). Optional fields left out are left out of args.
ACTIONS: dict[str, dict[str, tuple[Check, bool]]] = {
    "regenerate": {"first_bar": (_BAR, False), "bars": (_BARS, False), "seed": (_SEED, False),
                   "temperature": (_num(0.0, MAX_TEMPERATURE), False)},
    "interpolate": {"alpha": (_num(0.0, 1.0), True)},
    "step": {"direction": (_choice(1, -1), False)},
    "vary": {"delta": (_num(0.0, MAX_DELTA), True), "seed": (_SEED, False)},
    "undo": {},
    "clear": {"first_bar": (_BAR, False), "bars": (_BARS, False)},
    "mode": {"value": (_choice("loop", "follow"), True)},
    "record": {"value": (_bool, True)},
    "tempo": {"bpm": (_num(*BPM_RANGE), True)},
    "transport": {"value": (_choice("start", "stop"), True)},
    "seed": {"value": (_SEED, True)},
    "temperature": {"value": (_num(0.0, MAX_TEMPERATURE), True)},
    "panic": {},
    "target": {"first_bar": (_BAR, False), "bars": (_BARS, False)},
}
DEFAULTS: dict[str, dict[str, Any]] = {"step": {"direction": 1}}


def _cross_check(action: str, args: dict[str, Any]) -> None:
    first, bars = args.get("first_bar"), args.get("bars")
    if first is not None and bars is not None and first + bars - 1 > N_BARS:
        raise CommandError(
            f"{action}: bars {first}..{first + bars - 1} go past bar {N_BARS}"
        )
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
