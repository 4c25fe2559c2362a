"""daemon/config.py: defaults <- user TOML <- CLI overrides, and the errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.cli import build_parser, config_from_args, main
from daemon.config import ConfigError, load_config, merge, read_toml


def user(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "user.toml"
    path.write_text(text)
    return path


def test_user_file_is_merged_over_the_defaults(tmp_path: Path) -> None:
    defaults = load_config()
    config = load_config(user(tmp_path, "[clock]\nbpm = 96\n\n[control.cc]\nundo = 40\n"))
    assert config["clock"]["bpm"] == 96.0 and isinstance(config["clock"]["bpm"], float)
    assert config["control"]["cc"]["undo"] == 40
    # Everything not in the user file keeps its default, also in the nested table.
    assert config["control"]["cc"]["regenerate"] == defaults["control"]["cc"]["regenerate"]
    assert config["clock"]["source"] == defaults["clock"]["source"]
    assert config["model"] == defaults["model"]


def test_merge_does_not_touch_its_inputs() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}}
    out = merge(base, {"a": {"x": 2}})
    out["a"]["y"].append(3)
    assert base == {"a": {"x": 1, "y": [1, 2]}} and out["a"]["x"] == 2


@pytest.mark.parametrize(("text", "key"), [
    ("[clock]\nbmp = 96\n", "clock.bmp"),
    ("[clok]\nbpm = 96\n", "clok"),
    ("[control.cc]\nredo = 3\n", "control.cc.redo"),
])
def test_unknown_key_is_an_error_that_names_it(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(user(tmp_path, text))


@pytest.mark.parametrize(("text", "key"), [
    ('[clock]\nbpm = "fast"\n', "clock.bpm"),
    ("[daemon]\nvelocity = true\n", "daemon.velocity"),  # a bool is not an int here
    ("[clock]\nsend_clock = 1\n", "clock.send_clock"),
    ("[control]\ncc = 5\n", "control.cc"),
])
def test_wrong_type_is_an_error_that_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(user(tmp_path, text))


@pytest.mark.parametrize(("text", "match"), [
    ("[clock]\nbpm = 500\n", "clock.bpm must be 20..300"),
    ('[midi]\napi = "winmm"\n', "midi.api must be one of"),
    ("[midi]\noutput_channel = 0\n", "midi.output_channel"),
])
def test_values_out_of_range_are_refused(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(user(tmp_path, text))


def test_missing_or_broken_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_toml(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(user(tmp_path, "[clock\nbpm = 1\n"))


def test_overrides_win_over_the_file_and_none_is_skipped(tmp_path: Path) -> None:
    path = user(tmp_path, "[clock]\nbpm = 96\n[daemon]\nmode = \"follow\"\n")
    config = load_config(path, {"clock.bpm": 150.0, "daemon.mode": None})
    assert config["clock"]["bpm"] == 150.0
    assert config["daemon"]["mode"] == "follow"
    with pytest.raises(ConfigError, match="unknown config key 'clock.tempo'"):
        load_config(None, {"clock.tempo": 1.0})
    with pytest.raises(ConfigError, match="clock.bpm must be 20..300"):
        load_config(None, {"clock.bpm": 10.0})


def test_cli_options_become_overrides(tmp_path: Path) -> None:
    path = user(tmp_path, "[clock]\nbpm = 96\n")
    args = build_parser().parse_args(["--config", str(path), "--bpm", "100", "--mode", "follow",
                                      "--engine", "fake", "--port-name", "jam"])
    config = config_from_args(args)
    assert config["clock"]["bpm"] == 100.0
    assert (config["daemon"]["mode"], config["daemon"]["engine"]) == ("follow", "fake")
    assert config["midi"]["port_name"] == "jam"
    assert config["daemon"]["engine_worker"] == "thread"  # untouched default
    assert config["clock"]["send_clock"] is False  # untouched default


def test_send_clock_on_the_command_line(tmp_path: Path) -> None:
    path = user(tmp_path, "[clock]\nsend_clock = true\n")
    on = config_from_args(build_parser().parse_args(["--send-clock"]))
    off = config_from_args(build_parser().parse_args(["--config", str(path), "--no-send-clock"]))
    kept = config_from_args(build_parser().parse_args(["--config", str(path)]))
    assert (on["clock"]["send_clock"], off["clock"]["send_clock"]) == (True, False)
    assert kept["clock"]["send_clock"] is True


def test_cli_exits_2_with_a_message_on_a_bad_config(tmp_path: Path, capsys) -> None:
    path = user(tmp_path, "[clock]\nbmp = 96\n")
    assert main(["--config", str(path), "--engine", "fake"]) == 2
    assert "clock.bmp" in capsys.readouterr().err


# ----- issue 15: one schema, every value range-checked -----------------------------------------
@pytest.mark.parametrize(("text", "match"), [
    ("[daemon]\nvelocity = 200\n", r"daemon\.velocity must be 1\.\.127, got 200"),  # defect 2
    ("[daemon]\nvelocity = 0\n", r"daemon\.velocity must be 1\.\.127"),
    ("[daemon]\nstatus_every_bars = 0\n", r"daemon\.status_every_bars must be 1\.\.64"),
    ("[engine]\nthreads = 0\n", r"engine\.threads must be 1\.\.64"),
    ("[mqtt]\nkeepalive_s = -5\n", r"mqtt\.keepalive_s must be 1\.\.65535"),
    ("[mqtt]\nreconnect_min_s = 0\n", r"mqtt\.reconnect_min_s must be 0\.05\.\.60"),
    ("[mqtt]\nreconnect_max_s = 0.1\nreconnect_min_s = 1.0\n", r"mqtt\.reconnect_max_s must be >="),
    ("[daemon]\ninterp_steps = 0\n", r"daemon\.interp_steps must be 1\.\.64"),
    ("[clock]\nspin_ms = -1.0\n", r"clock\.spin_ms must be 0\.\.10"),
    ("[clock]\nspin_ms = 5.0\nlookahead_ms = 4.0\n", r"clock\.spin_ms must be below"),
    ("[clock]\nbpm = nan\n", r"clock\.bpm must be 20\.\.300, got nan"),
    ("[clock]\ndropout_s = inf\n", r"clock\.dropout_s must be in \(0, 10\]"),
    ("[control.cc]\nundo = 128\n", r"control\.cc\.undo must be 0\.\.127"),
    ("[daemon]\nmax_hold_bars = 9\n", r"daemon\.max_hold_bars must be 1\.\.7"),
    ('[engine]\ndecoding = "beam"\n', r"engine\.decoding must be one of argmax, sample"),
    ("[mqtt]\nmax_packet = 4096\n", r"mqtt\.max_packet must be at least"),
    ("[daemon]\nretries = 3\n", r"unknown config key 'daemon\.retries'"),  # never read: removed
])
def test_every_value_is_range_checked_naming_key_and_range(tmp_path: Path, text: str,
                                                           match: str) -> None:
    """Issue 15 defects 2 and 7."""
    with pytest.raises(ConfigError, match=match):
        load_config(user(tmp_path, text))


def test_every_daemon_number_has_a_rule() -> None:
    """No number the daemon reads goes unchecked ([model] and [train] belong to training)."""
    from daemon.config import _walk, rule

    for key, value in _walk(load_config()):
        if key.split(".")[0] in ("model", "train") or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            assert rule(key) is not None, key


def test_long_or_hostile_values_are_clipped_in_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"midi.port_name": 5})
    assert "midi.port_name" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(user(tmp_path, '[daemon]\nmode = "' + "x\\n" * 5000 + '"\n'))
    assert len(str(info.value)) < 300 and "\n" not in str(info.value)


def test_mqtt_settings_from_the_cli_get_the_same_rules() -> None:
    from daemon.mqtt_settings import MqttSettings

    with pytest.raises(ValueError, match=r"mqtt\.keepalive_s must be 1\.\.65535"):
        MqttSettings(keepalive_s=-5).resolved()
    a, b = MqttSettings(device_id="x").resolved(), MqttSettings(device_id="x").resolved()
    assert a.client_id != b.client_id and a.client_id.startswith("clsm-x-")  # defect 11


def test_engine_decoding_reaches_the_engine(tmp_path):
    from daemon.serve import engine_spec

    default = engine_spec(load_config(None)).options  # the measured default: sampling
    shipped = load_config(None)["engine"]
    assert (default["temperature"], default["top_p"]) == (shipped["temperature"], shipped["top_p"])
    user = tmp_path / "sample.toml"
    user.write_text('[engine]\ndecoding = "sample"\ntemperature = 0.9\ntop_p = 0.95\n')
    options = engine_spec(load_config(user)).options
    assert (options["temperature"], options["top_p"]) == (0.9, 0.95)
    user.write_text('[engine]\ndecoding = "argmax"\n')
    assert engine_spec(load_config(user)).options["temperature"] == 0.0
    user.write_text('[engine]\ntop_p = 0\n')
    with pytest.raises(ConfigError, match="top_p"):
        load_config(user)
