"""Configuration: configs/default.toml, merged with a user TOML, then CLI overrides.

Every section and key of a user config is optional (missing keys fall back to the
defaults); an unknown key, a value of the wrong type or out of its range (SCHEMA) is an error
that names the key and what it allows, so a typo never silently does nothing.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import rules
from daemon.safelog import show


def _default_path() -> Path:
    """configs/default.toml of a source checkout (make run, editable installs); an installed
    wheel has its copy as daemon/default.toml (a symlink to it in the checkout)."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "configs" / "default.toml"
    return checkout if checkout.is_file() else here / "default.toml"


DEFAULT_PATH = _default_path()

Config = dict[str, Any]


class ConfigError(ValueError):
    """A config file or override that does not fit configs/default.toml."""


def read_toml(path: str | Path) -> Config:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e


def _check_type(key: str, default: Any, value: Any) -> Any:
    # bool is a subclass of int: check it first so `bpm = true` is refused.
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be {type(default).__name__}, got {show(value, 60)}")
    if isinstance(default, float) and isinstance(value, int):
        return float(value)  # `bpm = 96` is as good as `bpm = 96.0`
    if isinstance(default, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"[{key}] must be a table, got {show(value, 60)}")
        return value
    if not isinstance(value, type(default)):
        raise ConfigError(f"{key} must be {type(default).__name__}, got {show(value, 60)}")
    return value


def merge(base: Config, user: Mapping[str, Any], prefix: str = "") -> Config:
    """A copy of `base` with `user` laid over it; keys must exist in `base`."""
    out = copy.deepcopy(base)
    for key, value in user.items():
        name = f"{prefix}{key}"
        if key not in out:
            known = ", ".join(sorted(out)) or "none"
            raise ConfigError(f"unknown config key {show(name, 60)} (known here: {known})")
        value = _check_type(name, out[key], value)
        if isinstance(out[key], dict):
            out[key] = merge(out[key], value, prefix=f"{name}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(config: Config, dotted: str, value: Any) -> None:
    """Set `section.key` in place (CLI overrides), with the same checks as a file."""
    *sections, key = dotted.split(".")
    table = config
    for s in sections:
        if not isinstance(table.get(s), dict):
            raise ConfigError(f"unknown config section {show(s, 60)} in {show(dotted, 60)}")
        table = table[s]
    if key not in table:
        raise ConfigError(f"unknown config key {show(dotted, 60)}")
    table[key] = _check_type(dotted, table[key], value)


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    default_path: str | Path = DEFAULT_PATH,
) -> Config:
    """defaults <- user file <- overrides ({"clock.bpm": 96.0, ...}; None values skipped)."""
    config = read_toml(default_path)
    if path is not None:
        config = merge(config, read_toml(path))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_dotted(config, dotted, value)
    validate(config)
    return config


@dataclass(frozen=True)
class Range:
    """Numbers from `lo` to `hi`; an open end excludes its bound."""

    lo: float
    hi: float
    lo_open: bool = False

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        return above and value <= self.hi and value == value  # NaN is in no range

    def __str__(self) -> str:
        fmt = "{:g}".format
        return f"in ({fmt(self.lo)}, {fmt(self.hi)}]" if self.lo_open \
            else f"{fmt(self.lo)}..{fmt(self.hi)}"


class Choices(tuple):
    def __str__(self) -> str:
        return "one of " + ", ".join(map(str, self))


class NonEmpty:
    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and value.strip() != ""

    def __str__(self) -> str:
        return "a non-empty string"


# One schema for every value the daemon reads (types come from configs/default.toml; a key
# not there is unknown). "section.*" applies to every key of a table. [model] and [train] are
# the training's; the daemon takes its model's config from the model folder.
SCHEMA: dict[str, Range | Choices | NonEmpty] = {
    "engine.backend": Choices(("fast", "fast-bf16", "torchscript", "eager")),
    "engine.device": Choices(("auto", "cpu", "cuda")),  # engine/device.py
    "engine.threads": Range(1, 64),
    "engine.decoding": Choices(("argmax", "sample")),
    "engine.temperature": Range(0.0, rules.MAX_TEMPERATURE, lo_open=True),
    "engine.top_p": Range(0.0, 1.0, lo_open=True),
    "engine.max_batch": Range(1, 64),
    "midi.api": Choices(("auto", "alsa", "jack", "coremidi")),
    "midi.port_name": NonEmpty(),
    "midi.input_channel": Range(0, 16),
    "midi.output_channel": Range(1, 16),
    "midi.polyphony": Choices(("highest", "latest")),
    "clock.source": Choices(("internal", "external", "link")),
    "clock.bpm": Range(*rules.BPM_RANGE),
    "clock.dropout_s": Range(0.0, 10.0, lo_open=True),
    "clock.smoothing": Range(0.0, 1.0, lo_open=True),
    "clock.lookahead_ms": Range(0.0, 40.0, lo_open=True),
    "clock.spin_ms": Range(0.0, 10.0),
    "link.quantum": Choices((4, 8, 16, 32)),
    "daemon.mode": Choices(rules.MODE.choices),
    "daemon.model": NonEmpty(),
    "daemon.regen_bars": Range(1, rules.MAX_TARGET_BARS),
    "daemon.interp_steps": Range(1, 64),
    "daemon.max_hold_bars": Range(1, 7),
    "daemon.velocity": Range(1, 127),
    "daemon.status_every_bars": Range(1, 64),
    "daemon.engine": Choices(("real", "fake")),
    "daemon.engine_worker": Choices(("thread", "process")),
    "control.channel": Range(1, 16),
    "control.max_delta": Range(0.0, rules.MAX_DELTA, lo_open=True),
    "control.cc.*": Range(0, 127),
    "mqtt.port": Range(1, 65535),
    "mqtt.prefix": NonEmpty(),
    "mqtt.max_payload": Range(64, 16 << 20),
    "mqtt.max_packet": Range(2048, 256 << 20),
    "mqtt.state_min_interval_s": Range(0.0, 60.0),
    "mqtt.qos": Choices((0, 1, 2)),
    "mqtt.keepalive_s": Range(1, 65535),
    "mqtt.timeout_s": Range(0.0, 300.0, lo_open=True),
    "mqtt.reconnect_min_s": Range(0.05, 60.0),
    "mqtt.reconnect_max_s": Range(0.05, 3600.0),
    "mqtt.command_queue": Range(1, 10_000),
    "mqtt.event_queue": Range(1, 100_000),
    "mqtt.incoming_queue": Range(1, 100_000),
    "osc.port": Range(0, 65535),
    "osc.host": NonEmpty(),
    "osc.max_datagram": Range(64, 65507),
    "osc.command_queue": Range(1, 10_000),
    "http.port": Range(0, 65535),
    "http.host": NonEmpty(),
    "http.max_message": Range(64, 16 << 20),
    "http.max_frame": Range(1024, 64 << 20),
    "http.max_clients": Range(1, 1000),
    "http.client_queue": Range(1, 10_000),
    "http.command_queue": Range(1, 10_000),
    "http.state_interval_s": Range(0.05, 10.0),
    "http.send_timeout_s": Range(0.1, 300.0),
}


def rule(key: str) -> Range | Choices | NonEmpty | None:
    section = key.rpartition(".")[0]
    return SCHEMA.get(key) or SCHEMA.get(f"{section}.*")


def check_value(key: str, value: Any) -> None:
    """ConfigError naming `key` and what it allows, if `value` is outside its rule."""
    allowed = rule(key)
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{key} must be {allowed}, got {show(value, 60)}")


def _walk(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            out += _walk(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def validate(config: Config) -> None:
    """Every value against SCHEMA, then the checks that involve two keys."""
    for key, value in _walk(config):
        check_value(key, value)
    clock, mqtt = config["clock"], config.get("mqtt", {})
    if clock["spin_ms"] >= clock["lookahead_ms"]:
        raise ConfigError(f"clock.spin_ms must be below clock.lookahead_ms "
                          f"({clock['lookahead_ms']:g}), got {clock['spin_ms']:g}")
    if mqtt and mqtt["reconnect_max_s"] < mqtt["reconnect_min_s"]:
        raise ConfigError(f"mqtt.reconnect_max_s must be >= mqtt.reconnect_min_s "
                          f"({mqtt['reconnect_min_s']:g}), got {mqtt['reconnect_max_s']:g}")
    if mqtt and mqtt["max_packet"] < mqtt["max_payload"] + 1024:
        raise ConfigError(f"mqtt.max_packet must be at least mqtt.max_payload + 1024 "
                          f"({mqtt['max_payload'] + 1024}), got {mqtt['max_packet']}")
