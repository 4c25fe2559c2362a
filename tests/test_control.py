"""Commands over MQTT and CC: validation of every bad input class, CC mapping, coalescing."""

import json
import tomllib
from pathlib import Path

import mido
import pytest

from daemon.control import (
    ACTIONS,
    CCMapper,
    Coalescer,
    Command,
    CommandError,
    parse_command,
    parse_payload,
)

CONFIG = tomllib.loads((Path(__file__).parents[1] / "configs" / "default.toml").read_text())
CC = CONFIG["control"]["cc"]
CH = CONFIG["control"]["channel"]


def cc(name: str, value: int, channel: int = CH) -> mido.Message:
    return mido.Message("control_change", channel=channel - 1, control=CC[name], value=value)


# ----- the documented payloads parse ------------------------------------------------------
@pytest.mark.parametrize(
    "payload, args",
    [
        ({"action": "regenerate", "first_bar": 5, "bars": 2, "seed": 7, "id": "x"},
         {"first_bar": 5, "bars": 2, "seed": 7}),
        ({"action": "regenerate"}, {}),
        ({"action": "interpolate", "alpha": 0.25}, {"alpha": 0.25}),
        ({"action": "step", "direction": -1}, {"direction": -1}),
        ({"action": "step"}, {"direction": 1}),
        ({"action": "vary", "delta": 0.5}, {"delta": 0.5}),
        ({"action": "undo"}, {}),
        ({"action": "clear", "first_bar": 5, "bars": 2}, {"first_bar": 5, "bars": 2}),
        ({"action": "clear"}, {}),
        ({"action": "mode", "value": "follow"}, {"value": "follow"}),
        ({"action": "record", "value": True}, {"value": True}),
        ({"action": "tempo", "bpm": 96}, {"bpm": 96.0}),
        ({"action": "transport", "value": "start"}, {"value": "start"}),
        ({"action": "seed", "value": 42}, {"value": 42}),
        ({"action": "seed", "value": None}, {"value": None}),
        ({"action": "temperature", "value": 0}, {"value": 0.0}),
        ({"action": "panic"}, {}),
        ({"action": "target", "first_bar": 5, "bars": 2}, {"first_bar": 5, "bars": 2}),
        ({"action": "target", "bars": 3}, {"bars": 3}),
    ],
)
def test_documented_payloads_parse(payload, args):
    cmd = parse_command(payload)
    assert cmd == Command(payload["action"], args, payload.get("id"), "mqtt")
    assert parse_payload(json.dumps(payload).encode(), 65536) == cmd


def test_every_action_has_a_documented_example():
    doc = (Path(__file__).parents[1] / "docs" / "controls.md").read_text()
    for action in ACTIONS:
        assert f'"action": "{action}"' in doc, action


# ----- every bad input class gets a CommandError naming the problem ------------------------
@pytest.mark.parametrize(
    "obj, words",
    [
        ({"action": "dance"}, "unknown action"),
        ({"action": 3}, "unknown action"),
        ({}, "missing 'action'"),
        ([1, 2], "JSON object"),
        ("undo", "JSON object"),
        ({"action": "interpolate"}, "missing 'alpha'"),
        ({"action": "tempo"}, "missing 'bpm'"),
        ({"action": "mode"}, "missing 'value'"),
        ({"action": "interpolate", "alpha": "0.5"}, "'alpha' must be a number"),
        ({"action": "interpolate", "alpha": True}, "'alpha' must be a number"),
        ({"action": "regenerate", "first_bar": 2.5}, "'first_bar' must be an integer"),
        ({"action": "regenerate", "seed": "7"}, "'seed' must be an integer"),
        ({"action": "record", "value": 1}, "true or false"),
        ({"action": "mode", "value": "jam"}, "one of ['loop', 'follow']"),
        ({"action": "step", "direction": True}, "'direction' must be one of"),
        ({"action": "interpolate", "alpha": 1.01}, "0..1"),
        ({"action": "interpolate", "alpha": float("nan")}, "0..1"),
        ({"action": "tempo", "bpm": 19}, "20..300"),
        ({"action": "tempo", "bpm": 301}, "20..300"),
        ({"action": "regenerate", "first_bar": 9}, "1..8"),
        ({"action": "regenerate", "bars": 5}, "1..4"),
        ({"action": "regenerate", "first_bar": 7, "bars": 3}, "past bar 8"),
        ({"action": "vary", "delta": -0.1}, "'delta' must be 0..4"),
        ({"action": "seed", "value": -1}, "0..2147483647"),
        ({"action": "temperature", "value": 11}, "0..10"),
        ({"action": "undo", "bars": 2}, "unknown field(s) ['bars']"),
        ({"action": "regenerate", "alpha": 0.5}, "unknown field(s) ['alpha']"),
        ({"action": "clear", "bars": 2}, "'bars' needs 'first_bar'"),
        ({"action": "target"}, "give 'first_bar', 'bars'"),
        ({"action": "undo", "id": 5}, "'id' must be a string"),
        ({"action": "undo", "id": "x" * 129}, "'id' must be a string"),
    ],
)
def test_bad_commands_name_the_problem(obj, words):
    with pytest.raises(CommandError) as err:
        parse_command(obj)
    assert words in str(err.value)


@pytest.mark.parametrize(
    "data, words",
    [
        (b'{"action": "undo"' + b" " * 100, "over the 64-byte limit"),
        (b"", "empty payload"),
        (b"   ", "empty payload"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"action": "undo",}', "malformed JSON at line 1"),
        (b"{action: undo}", "malformed JSON"),
        (b"[" * 60, "malformed JSON"),
        (b"42", "JSON object"),
        (b'{"action": "tempo", "bpm": NaN}', "20..300"),
        (b'{"action": "nope"}', "unknown action"),
    ],
)
def test_bad_payloads_name_the_problem(data, words):
    with pytest.raises(CommandError) as err:
        parse_payload(data, 64)
    assert words in str(err.value)


def test_deeply_nested_payload_is_refused_cleanly():
    with pytest.raises(CommandError, match="nested too deeply|malformed JSON"):
        parse_payload(b"[" * 100_000 + b"]" * 100_000, 1_000_000)


def test_command_error_is_a_value_error_and_to_dict_round_trips():
    assert issubclass(CommandError, ValueError)
    cmd = parse_command({"action": "clear", "first_bar": 2, "bars": 1, "id": "a"})
    assert parse_command(cmd.to_dict()) == cmd


# ----- CC mapping -------------------------------------------------------------------------
def test_buttons_trigger_immediately_on_press_only():
    m = CCMapper(CH, CC)
    assert m.feed(cc("regenerate", 127)) == Command("regenerate", {}, None, "cc")
    assert m.feed(cc("regenerate", 0)) is None
    assert m.feed(cc("undo", 64)).action == "undo"
    assert m.feed(cc("interpolate_step", 100)) == Command("step", {"direction": 1}, None, "cc")
    assert m.feed(cc("clear", 127)).args == {}
    assert m.feed(cc("panic", 127)).action == "panic"


def test_switches_fire_on_crossing_the_middle():
    m = CCMapper(CH, CC)
    assert m.feed(cc("mode", 100)).args == {"value": "follow"}
    assert m.feed(cc("mode", 110)) is None  # same side: a fader sweep is one command
    assert m.feed(cc("mode", 10)).args == {"value": "loop"}
    assert m.feed(cc("record", 0)).args == {"value": False}
    assert m.feed(cc("transport", 127)).args == {"value": "start"}


@pytest.mark.parametrize(
    "name, value, action, args",
    [
        ("target_bar", 0, "target", {"first_bar": 1}),
        ("target_bar", 127, "target", {"first_bar": 8}),
        ("target_bar", 64, "target", {"first_bar": 5}),
        ("target_length", 0, "target", {"bars": 1}),
        ("target_length", 127, "target", {"bars": 4}),
        ("interpolate_alpha", 127, "interpolate", {"alpha": 1.0}),
        ("interpolate_alpha", 0, "interpolate", {"alpha": 0.0}),
        ("vary", 127, "vary", {"delta": 2.0}),
        ("tempo", 80, "tempo", {"bpm": 120.0}),
        ("seed", 42, "seed", {"value": 42}),
        ("temperature", 0, "temperature", {"value": 0.0}),
        ("temperature", 64, "temperature", {"value": 1.0}),
    ],
)
def test_knob_values_map_as_documented(name, value, action, args):
    m = CCMapper(CH, CC)
    assert m.feed(cc(name, value)) is None
    assert m.drain() == [Command(action, args, None, "cc")]
    assert m.drain() == []


def test_a_burst_of_100_knob_values_is_one_command_with_the_last():
    m = CCMapper(CH, CC)
    for i in range(100):
        assert m.feed(cc("interpolate_alpha", i)) is None
        m.feed(cc("tempo", 127 - i))
    cmds = m.drain()
    assert [c.action for c in cmds] == ["interpolate", "tempo"]
    assert cmds[0].args == {"alpha": 99 / 127} and cmds[1].args == {"bpm": 40.0 + 28}


def test_target_knobs_merge_and_a_button_releases_pending_knobs_first():
    m = CCMapper(CH, CC)
    m.feed(cc("target_bar", 64))
    m.feed(cc("target_length", 127))
    cmds = m.feed_all(cc("regenerate", 127))
    assert [c.action for c in cmds] == ["target", "regenerate"]
    assert cmds[0].args == {"first_bar": 5, "bars": 4}
    assert m.feed_all(cc("tempo", 3)) == [] and len(m.coalescer) == 1


def test_other_messages_are_ignored():
    m = CCMapper(CH, CC)
    assert m.feed(cc("regenerate", 127, channel=1)) is None  # other channel
    assert m.feed(mido.Message("note_on", channel=CH - 1, note=60, velocity=90)) is None
    assert m.feed(mido.Message("sysex", data=[1, 2, 3])) is None
    assert m.feed(mido.Message("control_change", channel=CH - 1, control=1, value=5)) is None
    assert m.drain() == []


def test_remapped_ccs_follow_the_config():
    m = CCMapper(1, {"undo": 7})
    assert m.feed(mido.Message("control_change", channel=0, control=7, value=127)).action == "undo"
    assert m.feed(cc("undo", 127)) is None


@pytest.mark.parametrize(
    "channel, cc_map, words",
    [
        (0, {}, "1..16"),
        (17, {}, "1..16"),
        (1, {"sing": 3}, "unknown command"),
        (1, {"undo": 128}, "0..127"),
        (1, {"undo": 5, "clear": 5}, "used by both"),
    ],
)
def test_bad_cc_config_is_refused(channel, cc_map, words):
    with pytest.raises(CommandError, match=words.replace("(", r"\(").replace(".", r"\.")):
        CCMapper(channel, cc_map)


def test_coalescer_keeps_latest_per_action():
    c = Coalescer()
    c.put(parse_command({"action": "vary", "delta": 0.1}))
    c.put(parse_command({"action": "vary", "delta": 0.9}))
    assert [x.args for x in c.drain()] == [{"delta": 0.9}]


# ----- issue 15: huge integers, huge and hostile values -------------------------------------
HUGE = "1" + "0" * 400


@pytest.mark.parametrize("field_json", [
    f'"action": "tempo", "bpm": {HUGE}',
    f'"action": "interpolate", "alpha": {HUGE}',
    f'"action": "vary", "delta": -{HUGE}',
    f'"action": "temperature", "value": {HUGE}',
    f'"action": "regenerate", "temperature": {HUGE}',
    f'"action": "regenerate", "first_bar": {HUGE}',
    f'"action": "seed", "value": {"9" * 5000}',  # past Python's 4300-digit str() limit
])
def test_huge_integers_are_a_command_error(field_json: str) -> None:
    """Defect 3: OverflowError (math.isfinite) or the int-digits ValueError, never a crash."""
    with pytest.raises(CommandError) as info:
        parse_payload(("{" + field_json + "}").encode(), 65536)
    assert len(str(info.value)) < 300  # the value is described, not printed in full


def test_error_texts_clip_long_values_and_escape_control_characters() -> None:
    """Defect 9: a 60 kB bad value makes a short error; a newline in it forges nothing."""
    with pytest.raises(CommandError) as info:
        parse_command({"action": "mode", "value": "x" * 60000})
    assert len(str(info.value)) < 400 and "60000 chars" in str(info.value)
    with pytest.raises(CommandError) as info:
        parse_command({"action": "fly\nINFO daemon: forged"})
    assert "\n" not in str(info.value)
    with pytest.raises(CommandError) as info:
        parse_command({"action": "undo", "x" * 5000: 1, "b\n": 2})
    assert len(str(info.value)) < 400 and "\n" not in str(info.value)
