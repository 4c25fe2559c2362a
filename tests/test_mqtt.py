"""MQTT bridge against a real mosquitto, driven by the real mosquitto_pub / mosquitto_sub."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.mqtt import MqttBridge, MqttSettings, add_arguments
from tests.mqtt_broker import (
    HOST,
    Broker,
    StubDaemon,
    Subscriber,
    broker_fixture,  # noqa: F401 - provides the `broker` fixture
    publish,
    unique_device,
)

pytestmark = pytest.mark.mqtt
ROOT = Path(__file__).resolve().parents[1]


def make_settings(b: Broker, **kw: object) -> MqttSettings:
    # fast backoff and short timeouts keep the tests short
    base: dict = dict(enabled=True, host=HOST, port=b.port, device_id=unique_device(),
                      reconnect_min_s=0.05, reconnect_max_s=0.3, state_min_interval_s=0.02,
                      timeout_s=2.0, keepalive_s=5)
    base.update(kw)
    return MqttSettings(**base).resolved()


@contextlib.asynccontextmanager
async def running(bridge: MqttBridge, wait: bool = True) -> AsyncIterator[asyncio.Task]:
    task = asyncio.create_task(bridge.run())
    try:
        if wait:
            await asyncio.wait_for(bridge.connected.wait(), 5)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def online(b: Broker, s: MqttSettings) -> Subscriber:
    """A subscriber on the device's topics that has seen the bridge online (so it is live)."""
    sub = await Subscriber(b, s.topic("#")).__aenter__()
    await sub.wait_for(lambda m: m.topic == s.topic("status") and m.payload == "online")
    return sub


def is_state(pred):  # noqa: ANN001, ANN201
    return lambda m: m.topic.endswith("/state") and pred(m.json())


async def test_command_gets_result_and_state_updates(broker: Broker) -> None:
    s, stub = make_settings(broker), StubDaemon()
    bridge = MqttBridge(s, stub)
    async with running(bridge):
        sub = await online(broker, s)
        try:
            cmd = '{"action": "regenerate", "first_bar": 3, "bars": 2, "seed": 7, "id": "r1"}'
            await publish(broker, s.topic("cmd"), cmd)
            event = await sub.event("r1")
            assert event["ok"] is True and event["action"] == "regenerate"
            assert len(event["tokens"]) == 32 and event["latency_ms"] == 1.5
            assert "handled_ms" in event
            state = await sub.wait_for(is_state(lambda j: j["handled"] == 1))
            assert state.json()["tokens"][32:64] == event["tokens"]
            assert [c.action for c in stub.commands] == ["regenerate"]

            await publish(broker, s.topic("cmd"), '{"action": "tempo", "bpm": 96, "id": "t"}')
            assert (await sub.event("t"))["ok"] is True
            await sub.wait_for(is_state(lambda j: j["bpm"] == 96.0))
            assert [c.action for c in stub.commands] == ["regenerate", "tempo"]
        finally:
            await sub.__aexit__()


async def test_fresh_subscriber_gets_retained_state_and_status(broker: Broker) -> None:
    s = make_settings(broker)
    bridge = MqttBridge(s, StubDaemon())
    async with running(bridge):
        async with Subscriber(broker, s.topic("state")) as first:
            await first.wait_for(lambda m: True)  # the initial snapshot has gone out
        async with Subscriber(broker, s.topic("#")) as fresh:
            state = await fresh.wait_for(lambda m: m.topic == s.topic("state"))
            status = await fresh.wait_for(lambda m: m.topic == s.topic("status"))
            assert state.retained and state.json()["mode"] == "loop"
            assert status.retained and status.payload == "online"
    # clean shutdown says offline itself (the will only fires on unclean ones)
    async with Subscriber(broker, s.topic("status")) as after:
        msg = await after.wait_for(lambda m: True)
        assert msg.retained and msg.payload == "offline"


CHILD = """
import asyncio, sys
from daemon.mqtt import MqttBridge, MqttSettings
from tests.mqtt_broker import StubDaemon
s = MqttSettings(enabled=True, host=sys.argv[1], port=int(sys.argv[2]), device_id=sys.argv[3],
                 keepalive_s=5).resolved()
asyncio.run(MqttBridge(s, StubDaemon()).run())
"""


async def test_killed_process_leaves_offline_will(broker: Broker) -> None:
    s = make_settings(broker)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, HOST, str(broker.port), s.device_id, cwd=ROOT
    )
    try:
        async with Subscriber(broker, s.topic("status")) as sub:
            await sub.wait_for(lambda m: m.payload == "online", timeout=10)
            child.send_signal(signal.SIGKILL)
            await sub.wait_for(lambda m: m.payload == "offline")
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()
    async with Subscriber(broker, s.topic("status")) as fresh:
        msg = await fresh.wait_for(lambda m: True)
        assert msg.retained and msg.payload == "offline"


async def test_broker_restart_reconnects_and_resubscribes(broker: Broker) -> None:
    s, stub = make_settings(broker), StubDaemon()
    bridge = MqttBridge(s, stub)
    async with running(bridge):
        assert bridge.stats.connects == 1
        await asyncio.to_thread(broker.restart)  # the bridge's loop keeps running meanwhile
        async with asyncio.timeout(5):
            while bridge.stats.connects < 2:
                await asyncio.sleep(0.02)
        # the new broker has no persistence: state and status are back only if we resent them
        sub = await online(broker, s)
        try:
            await sub.wait_for(lambda m: m.topic == s.topic("state") and m.retained)
            await publish(broker, s.topic("cmd"), '{"action": "undo", "id": "after"}')
            assert (await sub.event("after"))["ok"] is True
        finally:
            await sub.__aexit__()
    assert bridge.stats.connect_failures >= 1


async def test_broker_down_at_start_does_not_block(broker: Broker) -> None:
    broker.stop()
    s = make_settings(broker)
    bridge = MqttBridge(s, StubDaemon())
    async with running(bridge, wait=False):
        for i in range(1000):  # never blocks, never grows past the bound
            bridge.publish_event({"n": i})
            bridge.notify_state_changed()
        assert len(bridge._events) == s.event_queue
        assert bridge.stats.events_dropped == 1000 - s.event_queue
        await asyncio.sleep(0.3)
        assert bridge.stats.connect_failures >= 1 and not bridge.connected.is_set()
        await asyncio.to_thread(broker.start)
        await asyncio.wait_for(bridge.connected.wait(), 5)
        async with asyncio.timeout(5):
            while bridge._events:  # the kept events are flushed once connected
                await asyncio.sleep(0.02)


BIG = '{"id": "big1", "action": "tempo", "bpm": 100, "pad": "' + "x" * 70000 + '"}'
BAD = [  # (id echoed, payload, words the error must contain)
    ("json1", b'{"id": "json1", "action": "tempo", "bpm":', "json"),
    ("type1", b'{"id": "type1", "action": "tempo", "bpm": "fast"}', "bpm"),
    ("unk1", b'{"id": "unk1", "action": "fly"}', "fly"),
    ("range1", b'{"id": "range1", "action": "tempo", "bpm": 1000}', "bpm"),
    ("field1", b'{"id": "field1", "action": "undo", "bars": 2}', "bars"),
    ("big1", BIG.encode(), "65536"),
    (7, b'{"id": 7, "action": "undo"}', "id"),  # ids are strings; echoed as sent anyway
    (None, b"[1, 2, 3]", "json object"),
    (None, b"\xff\xfe not utf-8", "utf-8"),
]


async def test_each_bad_input_gets_an_error_event_and_changes_nothing(broker: Broker) -> None:
    s, stub = make_settings(broker), StubDaemon()
    bridge = MqttBridge(s, stub)
    async with running(bridge):
        sub = await online(broker, s)
        try:
            for cid, payload, words in BAD:
                start = len(sub.messages)
                await publish(broker, s.topic("cmd"), payload)
                msg = await sub.wait_for(lambda m: m.topic.endswith("/events"), start=start)
                event = msg.json()
                assert event["ok"] is False and event.get("id") == cid, event
                assert words in event["error"].lower(), event
            assert stub.commands == [] and stub.bpm == 120.0
            assert bridge.stats.errors_sent == len(BAD)
            # and the bridge still works
            await publish(broker, s.topic("cmd"), '{"action": "tempo", "bpm": 90, "id": "ok"}')
            assert (await sub.event("ok"))["ok"] is True and stub.bpm == 90.0
        finally:
            await sub.__aexit__()


async def test_failing_command_is_answered_and_not_fatal(broker: Broker) -> None:
    s = make_settings(broker)
    bridge = MqttBridge(s, StubDaemon())
    async with running(bridge):
        sub = await online(broker, s)
        try:
            await publish(broker, s.topic("cmd"), '{"action": "panic", "id": "p"}')
            event = await sub.event("p")
            assert event["ok"] is False and "stub panic failure" in event["error"]
            await publish(broker, s.topic("cmd"), '{"action": "undo", "id": "u"}')
            assert (await sub.event("u"))["ok"] is True
        finally:
            await sub.__aexit__()


async def test_flood_is_answered_busy_not_queued(broker: Broker) -> None:
    s, stub = make_settings(broker, command_queue=4), StubDaemon(delay=0.05)
    bridge = MqttBridge(s, stub)
    n = 40
    lines = "\n".join(f'{{"action": "undo", "id": "f{i}"}}' for i in range(n)) + "\n"
    async with running(bridge):
        sub = await online(broker, s)
        try:
            await publish(broker, s.topic("cmd"), lines, lines=True)
            answers = [await sub.event(f"f{i}", timeout=10) for i in range(n)]
        finally:
            await sub.__aexit__()
    busy = [a for a in answers if not a["ok"]]
    assert busy and all(a["error"].startswith("busy") for a in busy)
    assert len(stub.commands) == n - len(busy) == bridge.stats.commands_handled
    assert bridge.stats.busy == len(busy)


def test_settings_from_config_and_cli() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--mqtt-host", "broker.lan", "--mqtt-port", "8883", "--mqtt-tls"])
    s = MqttSettings.from_config({"prefix": "studio", "device_id": "a/b+c"}, args)
    assert s.enabled and s.host == "broker.lan" and s.port == 8883 and s.tls
    assert s.topic("cmd") == "studio/a_b_c/cmd" and s.client_id.startswith("studio-a_b_c-")
    with pytest.raises(ValueError, match="unknown key"):
        MqttSettings.from_config({"hots": "x"})
    with pytest.raises(ValueError, match="port"):
        MqttSettings.from_config({"port": 0})


async def test_state_heartbeat_once_a_bar_while_playing(broker: Broker) -> None:
    s, stub = make_settings(broker), StubDaemon()
    stub.transport, stub.bpm = "playing", 300.0  # a bar = 0.8 s
    bridge = MqttBridge(s, stub)
    async with running(bridge), Subscriber(broker, s.topic("state")) as sub:
        first = await sub.wait_for(lambda m: True)
        # nothing changes and nobody notifies: the bar heartbeat alone republishes
        await sub.wait_for(lambda m: m is not first and m.json() == first.json(), timeout=4)
    assert bridge.stats.state_published >= 2


async def test_stalled_broker_blocks_nothing(broker: Broker) -> None:
    s = make_settings(broker, event_queue=50)
    bridge = MqttBridge(s, StubDaemon())
    async with running(bridge):
        sub = await online(broker, s)
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGSTOP)  # alive but silent: the worst kind of slow
        try:
            for i in range(200):  # the daemon side keeps going; memory stays bounded
                bridge.publish_event({"n": i})
                bridge.notify_state_changed()
                await asyncio.sleep(0.005)
            assert len(bridge._events) <= 50 and bridge.stats.events_dropped >= 100
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        try:  # it recovers (same session or a new one) and answers commands again
            async with asyncio.timeout(15):
                k = 0
                while not any('"id":"again' in m.payload for m in sub.messages):
                    await publish(broker, s.topic("cmd"), f'{{"action": "undo", "id": "again{k}"}}')
                    k += 1
                    await asyncio.sleep(0.3)
        finally:
            await sub.__aexit__()
