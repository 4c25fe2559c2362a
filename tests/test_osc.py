"""OSC control (daemon/osc.py): real UDP round trips on 127.0.0.1 with the daemon's app running
its TaskGroup (fake engine, fake MIDI ports), and the datagram parser on its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

from daemon.app import Daemon
from daemon.cli import build_parser, config_from_args, osc_tasks
from daemon.config import ConfigError, load_config
from daemon.control import ACTIONS
from daemon.osc import POSITIONAL, OscRequestError, OscServer, OscSettings, parse_datagram
from daemon.serve import make_cc_mapper, make_performance
from tests.fakes import FakeEngine
from tests.jack_server import jack_server  # noqa: F401
from tests.test_app import FakeOut, FakeWorker

ROOT = Path(__file__).resolve().parent.parent
VOLATILE = ("position", "bar", "latency_ms", "dropped_plans", "late_plans", "skipped_steps")


def msg(address: str, *args: Any) -> bytes:
    b = OscMessageBuilder(address)
    for a in args:
        b.add_arg(a)
    return b.build().dgram


def typed(address: str, *args: tuple[Any, str]) -> bytes:
    b = OscMessageBuilder(address)
    for value, tag in args:
        b.add_arg(value, tag)
    return b.build().dgram


class Idle:
    """A MIDI input that never receives anything."""

    async def receive(self) -> Any:
        await asyncio.Event().wait()


class Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[OscMessage] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.replies.put_nowait(OscMessage(data))


class Session:
    def __init__(self, daemon: Daemon, server: OscServer, transport: Any, client: Client) -> None:
        self.daemon, self.server, self.transport, self.client = daemon, server, transport, client

    async def ask(self, data: bytes) -> OscMessage:
        self.transport.sendto(data)
        return await asyncio.wait_for(self.client.replies.get(), 10)

    def state(self) -> dict:
        return {k: v for k, v in self.daemon.snapshot().items() if k not in VOLATILE}


@pytest.fixture
async def osc() -> AsyncIterator[Session]:
    config = load_config(None, {"daemon.engine": "fake", "daemon.prepare_ahead": False})
    daemon = Daemon(config, FakeWorker(FakeEngine()), FakeOut(), make_performance(config),
                    make_cc_mapper(config))
    server = OscServer(OscSettings(port=0, max_datagram=1024), daemon)

    async def serve_osc(d: Daemon) -> None:
        await server.run()

    daemon.extra_tasks.append(serve_osc)
    run = asyncio.create_task(daemon.run(Idle()))
    await asyncio.wait_for(server.bound.wait(), 10)
    assert server.address is not None and server.address[0] == "127.0.0.1"
    transport, client = await asyncio.get_running_loop().create_datagram_endpoint(
        Client, remote_addr=server.address)
    try:
        yield Session(daemon, server, transport, client)
    finally:
        transport.close()
        daemon.stopping.set()
        await asyncio.wait_for(run, 10)


async def test_a_good_command_is_run_and_answered(osc: Session) -> None:
    events: list[dict] = []
    osc.daemon.listeners.append(events.append)  # what MQTT's events would publish
    reply = await osc.ask(msg("/clsm/tempo", 100.0))
    assert {"type": "result", "source": "osc", "action": "tempo", "ok": True} in events
    assert reply.address == "/clsm/result" and reply.params[0] == "tempo"
    assert json.loads(reply.params[1])["ok"] is True
    assert osc.daemon.snapshot()["bpm"] == 100.0

    reply = await osc.ask(msg("/clsm/regenerate", 3, 2, 5))
    result = json.loads(reply.params[1])
    assert reply.address == "/clsm/result" and (result["first_bar"], result["last_bar"]) == (3, 4)
    assert result["tokens"] == osc.daemon.snapshot()["tokens"][32:64]


async def test_every_command_is_answered_with_a_result(osc: Session) -> None:
    script = [("/clsm/regenerate", 1, 1, 5), ("/clsm/regenerate", 1, 1, 6),
              ("/clsm/interpolate", 0.5), ("/clsm/step",), ("/clsm/vary", 0.3),
              ("/clsm/undo",), ("/clsm/clear", 1, 1), ("/clsm/target", 2, 2),
              ("/clsm/mode", "follow"), ("/clsm/mode", "loop"), ("/clsm/record", "off"),
              ("/clsm/record", True), ("/clsm/tempo", 90), ("/clsm/transport", "stop"),
              ("/clsm/transport", "start"), ("/clsm/seed", 7), ("/clsm/temperature", 0.5),
              ("/clsm/panic",)]
    for address, *args in script:
        reply = await osc.ask(msg(address, *args))
        assert reply.address == "/clsm/result", (address, reply.params)
        assert reply.params[0] == address.removeprefix("/clsm/")
    snap = osc.daemon.snapshot()
    assert (snap["mode"], snap["record"], snap["bpm"], snap["seed"], snap["temperature"]) == \
        ("loop", True, 90.0, 7, 0.5)
    assert osc.server.stats.handled == len(script)


BAD = {
    "unknown address": msg("/clsm/explode", 1),
    "outside /clsm": msg("/other/tempo", 100.0),
    "wrong type": msg("/clsm/interpolate", "half"),
    "wrong type for a choice": msg("/clsm/mode", 1),
    "missing argument": msg("/clsm/tempo"),
    "too many arguments": msg("/clsm/undo", 1),
    "out of range": msg("/clsm/tempo", 1e9),
    "past bar 8": msg("/clsm/regenerate", 7, 4),
    "huge int64": typed("/clsm/seed", (2**62, "h")),
    "nan": typed("/clsm/interpolate", (float("nan"), "f")),
    "infinity": typed("/clsm/temperature", (float("inf"), "d")),
    "record word": msg("/clsm/record", "maybe"),
    "blob argument": typed("/clsm/tempo", (b"\x01\x02", "b")),
    "state with arguments": msg("/clsm/state", 1),
    "bundle": OscBundleBuilder(IMMEDIATELY).build().dgram,
    "garbage": b"\xff\x00garbage\x13\x37",
    "truncated": b"/clsm/seed\x00\x00,i\x00\x00\x42",  # (a short float is padded: Reaktor)
    "not UTF-8": b"/clsm/\xff\xfe\x00\x00,\x00\x00\x00",
    "oversized": msg("/clsm/mode", "x" * 5000),
}


async def test_bad_input_is_answered_with_an_error_and_changes_nothing(osc: Session) -> None:
    await osc.ask(msg("/clsm/regenerate", 1, 2, 3))  # some state to keep
    before = osc.state()
    for case, data in BAD.items():
        reply = await osc.ask(data)
        assert reply.address == "/clsm/error", (case, reply.params)
        assert len(reply.params) == 2 and reply.params[1], case  # the reason
        assert osc.state() == before, case
    assert osc.server.stats.errors == len(BAD)
    reply = await osc.ask(msg("/clsm/undo"))  # and it still works
    assert reply.address == "/clsm/result"


async def test_an_empty_datagram_is_answered(osc: Session) -> None:
    # asyncio's sendto skips empty data: a plain socket sends it
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(b"", osc.server.address)
        reply = OscMessage(await asyncio.to_thread(sock.recv, 65536))
    assert reply.address == "/clsm/error" and "not an OSC message" in reply.params[1]


async def test_error_replies_name_the_problem(osc: Session) -> None:
    reply = await osc.ask(msg("/clsm/tempo", 1e9))
    assert reply.params[0] == "/clsm/tempo" and "20..300" in reply.params[1]
    reply = await osc.ask(b"\xff\x00garbage")
    assert reply.params[0] == "" and "not an OSC message" in reply.params[1]
    reply = await osc.ask(msg("/clsm/mode", "x" * 5000))
    assert "over the 1024-byte limit" in reply.params[1]


async def test_state_on_request(osc: Session) -> None:
    await osc.ask(msg("/clsm/tempo", 111.0))
    reply = await osc.ask(msg("/clsm/state"))
    assert reply.address == "/clsm/state"
    state = json.loads(reply.params[0])
    assert state["bpm"] == 111.0 and state["mode"] == "loop" and len(state["tokens"]) == 128
    assert state["osc"]["handled"] == 1


async def test_garbage_is_logged_rate_limited(osc: Session,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="daemon.osc")
    for _ in range(20):
        assert (await osc.ask(b"\x00junk")).address == "/clsm/error"
    lines = [r for r in caplog.records if "refused" in r.getMessage()]
    assert 1 <= len(lines) < 20


async def test_a_flood_gets_one_answer_per_datagram(osc: Session) -> None:
    n = 100
    for i in range(n):
        osc.transport.sendto(msg("/clsm/tempo", 60.0 + i))
    replies = [await asyncio.wait_for(osc.client.replies.get(), 10) for _ in range(n)]
    for r in replies:
        assert r.address == "/clsm/result" or "busy" in r.params[1]
    assert osc.server.stats.received == n


async def test_a_port_in_use_is_logged_and_the_daemon_plays_on(
        caplog: pytest.LogCaptureFixture) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    try:
        server = OscServer(OscSettings(port=taken.getsockname()[1]), daemon=None)  # type: ignore
        with caplog.at_level(logging.ERROR, logger="daemon.osc"):
            await asyncio.wait_for(server.run(), 10)  # returns instead of raising
    finally:
        taken.close()
    assert "cannot listen" in caplog.text and "--osc-port" in caplog.text


def test_every_command_has_an_address() -> None:
    assert set(POSITIONAL) == set(ACTIONS)
    for action, names in POSITIONAL.items():
        assert set(names) <= set(ACTIONS[action]), action


def test_parser_without_sockets() -> None:
    cmd = parse_datagram(msg("/clsm/regenerate", 5.0, 2), 8192)
    assert cmd is not None and cmd.source == "osc"
    assert (cmd.action, cmd.args) == ("regenerate", {"first_bar": 5, "bars": 2})
    assert parse_datagram(msg("/clsm/record", 0), 8192).args == {"value": False}
    assert parse_datagram(msg("/clsm/state"), 8192) is None
    with pytest.raises(OscRequestError, match="unknown address"):
        parse_datagram(msg("/clsm/*"), 8192)  # address patterns are not expanded
    with pytest.raises(OscRequestError, match="malformed"):
        parse_datagram(b"/clsm/tempo\x00,i\x00\x00" + struct.pack(">h", 1), 8192)


def test_osc_is_off_unless_a_port_is_given() -> None:
    assert osc_tasks(config_from_args(build_parser().parse_args([]))) == []
    assert osc_tasks(config_from_args(build_parser().parse_args(["--osc-host", "0.0.0.0"]))) == []
    args = build_parser().parse_args(["--osc-port", "9000"])
    assert len(osc_tasks(config_from_args(args))) == 1
    assert config_from_args(args)["osc"]["host"] == "127.0.0.1"
    with pytest.raises(ConfigError, match="osc.port must be 0..65535"):
        config_from_args(build_parser().parse_args(["--osc-port", "70000"]))
    with pytest.raises(ConfigError, match="osc.max_datagram"):
        load_config(None, {"osc.max_datagram": 10**6})


@pytest.mark.jack
def test_the_daemon_serves_osc_from_the_command_line(jack_server) -> None:  # noqa: F811
    """`run_daemon.py --osc-port P` (JACK, fake engine): /clsm/state and a command answered."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "run_daemon.py", "--midi-api", "jack", "--engine", "fake",
         "--port-name", f"osc{uuid.uuid4().hex[:5]}", "--osc-port", str(port)],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)
            state = None
            for _ in range(120):  # the daemon starts up: ask until it answers
                sock.sendto(msg("/clsm/state"), ("127.0.0.1", port))
                with contextlib.suppress(TimeoutError, ConnectionRefusedError):
                    state = OscMessage(sock.recv(65536))
                    break
            assert state is not None and state.address == "/clsm/state", "no answer over OSC"
            assert json.loads(state.params[0])["transport"] == "playing"
            sock.settimeout(10)
            sock.sendto(msg("/clsm/transport", "stop"), ("127.0.0.1", port))
            reply = OscMessage(sock.recv(65536))
            assert reply.address == "/clsm/result" and reply.params[0] == "transport"
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    assert f"OSC: listening on udp 127.0.0.1:{port}" in err
