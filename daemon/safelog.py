"""Text from outside (MQTT payloads, MIDI bytes, command values) made safe for logs and errors.

`show` escapes control characters (a payload with a newline must not forge a log line) and clips
long values (a 60 kB bad value must not make a 60 kB log line or error event). `Throttle` turns a
warning that a flood could repeat thousands of times into at most one line per interval that
counts what it left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

MAX_CHARS = 120  # the longest outside value a log line or an error text shows
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
_ESCAPES.update({c: f"\\u{c:04x}" for c in (*range(0x80, 0xA0), 0x2028, 0x2029)})


def escape(text: str) -> str:
    """Control characters (C0, DEL, C1, line separators) as visible escapes."""
    return text.translate(_ESCAPES)


def clip(text: str, n: int = MAX_CHARS) -> str:
    """Escaped and at most about `n` characters, saying how long the whole was."""
    if len(text) > n:
        return f"{escape(text[:n])}... ({len(text)} chars)"
    return escape(text)


def show(value: Any, n: int = MAX_CHARS) -> str:
    """A value from outside for a log line or an error text: repr'd (str'd for bytes' text),
    escaped and clipped. Huge integers are described, never converted to 100k digits."""
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, int) and value.bit_length() > 4 * n:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, bytes | bytearray):
        text = bytes(value[: n + 1]).decode("utf-8", "replace")
        return clip(text, n) if len(value) <= n else f"{escape(text[:n])}... ({len(value)} bytes)"
    if isinstance(value, str):
        if len(value) <= n:
            return escape(repr(value))
        return f"{escape(repr(value[:n]))}... ({len(value)} chars)"
    if isinstance(value, list | dict | tuple) and len(value) > n:
        return f"a {type(value).__name__} of {len(value)} items"
    try:
        return clip(repr(value), n)
    except (ValueError, RecursionError):  # int repr limits, self-nesting
        return f"a {type(value).__name__}"


class Throttle:
    """Log one message at most every `every_s` seconds; the ones in between are only counted.

    `total` counts every call; the next line that is logged says how many were left out."""

    def __init__(self, logger: logging.Logger, every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.every_s, self.clock = logger, every_s, clock
        self.total = 0
        self.suppressed = 0
        self._last: float | None = None

    def log(self, level: int, msg: str, *args: Any) -> bool:
        """True if this one was logged."""
        self.total += 1
        now = self.clock()
        if self._last is not None and now - self._last < self.every_s:
            self.suppressed += 1
            return False
        if self.suppressed:
            msg = f"{msg} (and {self.suppressed} more like it in the last {now - self._last:.0f} s)"
        self.logger.log(level, msg, *args)
        self._last, self.suppressed = now, 0
        return True

    def warning(self, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, msg, *args)
