"""MIDI ports through a real JACK server (marker `jack`), and backend errors."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid

import mido
import pytest

from daemon.midi_io import (
    MidiBackendError,
    MidiInput,
    MidiOutput,
    accepts,
    open_ports,
    parse,
    resolve_api,
)
from daemon.safelog import Throttle
from tests.jack_server import Recorder, jack_server, sounding_after  # noqa: F401


def test_parse_drops_sysex_and_garbage(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    from daemon import midi_io

    caplog.set_level(logging.INFO, logger="daemon.midi_io")
    # a fresh throttle: a SysEx parsed by an earlier test must not hide this one's line
    monkeypatch.setattr(midi_io, "SYSEX", Throttle(logging.getLogger("daemon.midi_io")),
                        raising=False)
    assert parse([0xF0, 0x7E, 0x01, 0xF7]) is None
    assert parse([0x90, 200, 1]) is None
    assert "SysEx" in caplog.text and "unparsable" in caplog.text
    assert parse([0x90, 60, 100]) == mido.Message("note_on", note=60, velocity=100)
    assert parse([0xF8]).type == "clock"


def test_channel_filter() -> None:
    msg = mido.Message("note_on", channel=2, note=60)
    assert accepts(msg, 0) and accepts(msg, 3) and not accepts(msg, 1)


def test_unknown_api_is_a_clear_error() -> None:
    with pytest.raises(MidiBackendError, match="unknown MIDI API"):
        resolve_api("winmm")


def test_missing_alsa_sequencer_suggests_jack() -> None:
    if os.path.exists("/dev/snd/seq"):
        pytest.skip("this machine has an ALSA sequencer")

    async def open_it() -> None:
        async with MidiInput("clsm", "alsa"):
            pass

    with pytest.raises(MidiBackendError, match="--midi-api jack"):
        asyncio.run(open_it())


def test_no_jack_server_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JACK_DEFAULT_SERVER", f"absent-{uuid.uuid4().hex[:6]}")
    monkeypatch.setenv("JACK_NO_START_SERVER", "1")

    async def open_it() -> None:
        async with MidiOutput("clsm", "jack"):
            pass

    with pytest.raises(MidiBackendError, match="no JACK server"):
        asyncio.run(open_it())


@pytest.mark.jack
async def test_virtual_ports_receive_send_and_panic(jack_server) -> None:  # noqa: F811
    name = f"io{uuid.uuid4().hex[:4]}"
    rec = Recorder(f"{name}peer")
    try:
        async with MidiInput(name, "jack") as inp, MidiOutput(name, "jack", channel=5) as out:
            await asyncio.to_thread(rec.connect, name)
            rec.send(mido.Message("sysex", data=[1, 2, 3]))  # logged and skipped
            rec.send(mido.Message("clock"))  # timing must not be filtered out
            rec.send(mido.Message("note_on", channel=1, note=64, velocity=80))
            first = await asyncio.wait_for(inp.receive(), 5)
            second = await asyncio.wait_for(inp.receive(), 5)
            assert first.msg.type == "clock"
            assert second.msg == mido.Message("note_on", channel=1, note=64, velocity=80)
            assert second.time >= first.time

            out.send(mido.Message("note_on", channel=4, note=70, velocity=100))
            out.send(mido.Message("note_on", channel=4, note=72, velocity=100))
            out.send(mido.Message("note_off", channel=4, note=70))
            assert out.sounding() == {(4, 72)}
            out.send(mido.Message("note_on", channel=4, note=74, velocity=100))
        # Closing the output port panics: every note it started is ended.
        assert rec.wait_for(lambda ms: any(m.type == "control_change" for _, m in ms))
        notes = rec.messages("note_on", "note_off", "control_change")
        assert sounding_after(notes) == set()
        offs = {m.note for _, m in notes if m.type == "note_off"}
        assert offs >= {70, 72, 74}
    finally:
        rec.close()


@pytest.mark.jack
async def test_connect_to_an_existing_port_by_name(jack_server) -> None:  # noqa: F811
    rec = Recorder(f"peer{uuid.uuid4().hex[:4]}")
    try:
        async with MidiOutput("conn", "jack", connect=f"{rec.name}-rec:in") as out:
            out.send(mido.Message("note_on", note=61, velocity=1))
            assert rec.wait_for(lambda ms: any(m.type == "note_on" for _, m in ms))
        with pytest.raises(MidiBackendError, match="matches none"):
            async with MidiInput("conn", "jack", connect="no-such-port"):
                pass
    finally:
        rec.close()


TRUNCATED = [[0xE0], [0xE5, 0x10], [0xF1], [0xF2], [0xF2, 0x10], [], [0x90, 60], [0x40], [0xF4]]


def test_truncated_and_unknown_bytes_are_counted_not_raised() -> None:
    """Issue 15 defect 1: mido raises IndexError on `E0`; any parse error is skipped."""
    t = [0.0]
    errors = Throttle(logging.getLogger("daemon.midi_io"), every_s=5.0, clock=lambda: t[0])
    for data in TRUNCATED:
        assert parse(data, errors) is None
    assert errors.total == len(TRUNCATED)


def test_unparsable_midi_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 15 defect 9: one warning per interval, counting the rest, not one per message."""
    caplog.set_level(logging.WARNING, logger="daemon.midi_io")
    t = [0.0]
    errors = Throttle(logging.getLogger("daemon.midi_io"), every_s=5.0, clock=lambda: t[0])
    for _ in range(3000):
        parse([0xE0], errors)
    assert len(caplog.records) == 1
    t[0] = 6.0
    parse([0xF2], errors)
    assert len(caplog.records) == 2 and "2999 more" in caplog.records[1].getMessage()
    assert errors.total == 3001


@pytest.mark.jack
async def test_truncated_messages_through_jack_are_skipped(jack_server) -> None:  # noqa: F811
    """Issue 15 defect 1 through a real port: `E0`, `F2 10` ... then a note still arrives."""
    name = f"tr{uuid.uuid4().hex[:4]}"
    rec = Recorder(f"{name}peer")
    try:
        async with MidiInput(name, "jack") as inp, MidiOutput(name, "jack"):
            await asyncio.to_thread(rec.connect, name)
            for data in ([0xE0], [0xE5, 0x10], [0xF1], [0xF2], [0xF2, 0x10]):
                rec._out.send_message(data)
            rec.send(mido.Message("note_on", note=65, velocity=70))
            got = await asyncio.wait_for(inp.receive(), 5)
            assert got.msg == mido.Message("note_on", note=65, velocity=70)
            assert inp.parse_errors.total >= 1  # what JACK let through was counted
    finally:
        rec.close()


def test_over_long_channel_message_is_refused_not_truncated():
    """Found by hypothesis: mido parses E0 00 00 00 as a 3-byte pitchwheel, dropping a byte."""
    from daemon.midi_io import parse

    assert parse([0xE0, 0x00, 0x00, 0x00]) is None
    assert parse([0x90, 60, 100, 7]) is None
    assert parse([0xE0, 0x00, 0x40]).bytes() == [0xE0, 0x00, 0x40]


@pytest.mark.jack
async def test_a_second_daemons_ports_are_logged_under_their_real_names(
        jack_server, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """Issue 15, defect 11: JACK named the second daemon's input `<name>-in-01` while its log
    said `<name>-in`."""
    caplog.set_level(logging.INFO, logger="daemon.midi_io")
    name = f"dup{uuid.uuid4().hex[:4]}"
    async with open_ports(MidiInput(name, "jack"), MidiOutput(name, "jack")) as (in1, out1):
        assert (in1.port, out1.port) == (f"{name}-in:{name}-in", f"{name}-out:{name}-out")
        assert "already called" not in caplog.text
        async with open_ports(MidiInput(name, "jack"), MidiOutput(name, "jack")) as (in2, out2):
            assert (in2.port, out2.port) == (f"{name}-in-01:{name}-in", f"{name}-out-01:{name}-out")
            assert f"MIDI in: {in2.port}, out: {out2.port}" in caplog.text
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(f"{name}-in-01:{name}-in" in w and "port_name" in w for w in warnings)
            assert any(f"{name}-out-01:{name}-out" in w for w in warnings)


def test_a_sysex_flood_is_one_log_line_per_interval(monkeypatch, caplog) -> None:
    """Issue 15 defect 9: each ignored SysEx message was its own INFO line."""
    from daemon import midi_io

    caplog.set_level(logging.INFO, logger="daemon.midi_io")
    t = [0.0]
    monkeypatch.setattr(midi_io, "SYSEX", Throttle(logging.getLogger("daemon.midi_io"),
                                                   every_s=5.0, clock=lambda: t[0]), raising=False)
    dump = [0xF0, *([0x11] * 1000), 0xF7]
    for _ in range(3000):
        assert parse(dump) is None
    assert [r.getMessage() for r in caplog.records] == ["ignored SysEx (1002 bytes)"]
    t[0] = 6.0
    assert parse([0xF0, 0x7E, 0xF7]) is None
    assert "2999 more" in caplog.records[-1].getMessage() and len(caplog.records) == 2
    assert midi_io.SYSEX.total == 3001
