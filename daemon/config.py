"""Configuration: configs/default.toml, merged with a user TOML, then CLI overrides.

Every section and key of a user config is optional (missing keys fall back to the
defaults); an unknown key or a value of the wrong type is an error that names the key,
so a typo never silently does nothing.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "configs" / "default.toml"

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
        raise ConfigError(f"{key} must be {type(default).__name__}, got {value!r}")
    if isinstance(default, float) and isinstance(value, int):
        return float(value)  # `bpm = 96` is as good as `bpm = 96.0`
    if isinstance(default, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"[{key}] must be a table, got {value!r}")
        return value
    if not isinstance(value, type(default)):
        raise ConfigError(f"{key} must be {type(default).__name__}, got {value!r}")
    return value


def merge(base: Config, user: Mapping[str, Any], prefix: str = "") -> Config:
    """A copy of `base` with `user` laid over it; keys must exist in `base`."""
    out = copy.deepcopy(base)
    for key, value in user.items():
        name = f"{prefix}{key}"
        if key not in out:
            known = ", ".join(sorted(out)) or "none"
            raise ConfigError(f"unknown config key {name!r} (known here: {known})")
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
            raise ConfigError(f"unknown config section {s!r} in {dotted!r}")
        table = table[s]
    if key not in table:
        raise ConfigError(f"unknown config key {dotted!r}")
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


_CHOICES = {
    ("midi", "api"): ("auto", "alsa", "jack", "coremidi"),
    ("midi", "polyphony"): ("highest", "latest"),
    ("clock", "source"): ("internal", "external"),
    ("daemon", "mode"): ("loop", "follow"),
    ("daemon", "engine"): ("real", "fake"),
    ("daemon", "engine_worker"): ("thread", "process"),
}


def validate(config: Config) -> None:
    """Range checks the type checks above cannot express."""
    for (section, key), choices in _CHOICES.items():
        value = config.get(section, {}).get(key)
        if value is not None and value not in choices:
            raise ConfigError(f"{section}.{key} must be one of {', '.join(choices)}, got {value!r}")
    midi, clock = config["midi"], config["clock"]
    if not 0 <= midi["input_channel"] <= 16:
        raise ConfigError(f"midi.input_channel must be 0 (omni) or 1..16, got {midi['input_channel']}")
    if not 1 <= midi["output_channel"] <= 16:
        raise ConfigError(f"midi.output_channel must be 1..16, got {midi['output_channel']}")
    if not midi["port_name"]:
        raise ConfigError("midi.port_name must not be empty")
    if not 20.0 <= clock["bpm"] <= 300.0:
        raise ConfigError(f"clock.bpm must be 20..300, got {clock['bpm']}")
    if clock["dropout_s"] <= 0:
        raise ConfigError(f"clock.dropout_s must be > 0, got {clock['dropout_s']}")
    if not 0.0 < clock["smoothing"] <= 1.0:
        raise ConfigError(f"clock.smoothing must be in (0, 1], got {clock['smoothing']}")
    if not 0.0 < clock.get("lookahead_ms", 15.0) <= 40.0:
        raise ConfigError(f"clock.lookahead_ms must be in (0, 40], got {clock['lookahead_ms']}")
