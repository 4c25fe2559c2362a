"""The rules for command values (SPEC section 4), owned here and nowhere else.

Every way a value gets into the daemon uses these: `daemon.control` (CC, MQTT, OSC, the web
page) checks each command field with them, `daemon.targets` checks the same names on its
request API, and `daemon.config` takes its bounds for the same quantities (default tempo,
temperature, CC delta range) from here. The engine keeps only its own contract checks (an
alpha outside 0..1 or a negative temperature is meaningless to the model at any bound the
daemon picks), so changing a rule here changes it for every source at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from daemon.safelog import show
from engine.tokens import MAX_TARGET_BARS, N_BARS

MAX_SEED = 2**31 - 1
MAX_DELTA = 4.0  # variation distance in prior standard deviations; beyond this it is noise
MAX_TEMPERATURE = 10.0  # softmax at T=10 is near uniform: a higher value adds nothing
BPM_RANGE = (20.0, 300.0)


class RuleError(ValueError):
    """A value outside its rule; the message names the value and what is allowed."""


@dataclass(frozen=True)
class IntRule:
    lo: int
    hi: int
    none_ok: bool = False

    def __call__(self, name: str, value: Any) -> int | None:
        if value is None and self.none_ok:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 5.0 from a JSON library that writes floats is still bar 5
        if isinstance(value, bool) or not isinstance(value, int):
            raise RuleError(f"'{name}' must be an integer, got {show(value)}")
        if not self.lo <= value <= self.hi:
            raise RuleError(f"'{name}' must be {self.lo}..{self.hi}, got {show(value)}")
        return value


@dataclass(frozen=True)
class NumberRule:
    lo: float
    hi: float

    def __call__(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RuleError(f"'{name}' must be a number, got {show(value)}")
        # an int is compared as an int: float(10**400) and math.isfinite(10**400) overflow
        if (isinstance(value, float) and not math.isfinite(value)) or not self.lo <= value <= self.hi:
            raise RuleError(f"'{name}' must be {self.lo:g}..{self.hi:g}, got {show(value)}")
        return float(value)


@dataclass(frozen=True)
class ChoiceRule:
    choices: tuple[Any, ...]

    def __call__(self, name: str, value: Any) -> Any:
        # `True in (1, -1)` is true in Python: refuse bools unless they are the choices.
        if (isinstance(value, bool) and bool not in map(type, self.choices)) \
                or value not in self.choices:
            raise RuleError(f"'{name}' must be one of {list(self.choices)}, got {show(value)}")
        return value


@dataclass(frozen=True)
class BoolRule:
    def __call__(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise RuleError(f"'{name}' must be true or false, got {show(value)}")
        return value


Rule = IntRule | NumberRule | ChoiceRule | BoolRule

FIRST_BAR = IntRule(1, N_BARS)
BARS = IntRule(1, MAX_TARGET_BARS)
SEED = IntRule(0, MAX_SEED, none_ok=True)
TEMPERATURE = NumberRule(0.0, MAX_TEMPERATURE)
ALPHA = NumberRule(0.0, 1.0)
DELTA = NumberRule(0.0, MAX_DELTA)
BPM = NumberRule(*BPM_RANGE)
MODE = ChoiceRule(("loop", "follow"))
DIRECTION = ChoiceRule((1, -1))
TRANSPORT = ChoiceRule(("start", "stop"))
ON_OFF = BoolRule()
MAX_CANDIDATE = 100_000  # select: candidate numbers; the history's length is checked when it runs
CANDIDATE = IntRule(0, MAX_CANDIDATE)  # 0 = the bars before the first candidate


def check_target(first_bar: Any, bars: Any) -> tuple[int, int]:
    """A target of `bars` bars from `first_bar`, inside the buffer."""
    first, length = FIRST_BAR("first_bar", first_bar), BARS("bars", bars)
    if first + length - 1 > N_BARS:
        raise RuleError(f"bars {first}..{first + length - 1} go past bar {N_BARS}")
    return first, length
