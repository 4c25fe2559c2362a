"""Issue 15 through a real mosquitto: huge numbers, retained and spoofed topics, floods, forged
log lines, oversized packets. Each test names the defect it guards."""

from __future__ import annotations

import asyncio
import logging

import pytest

from daemon.mqtt import MqttBridge, MqttSettings
from tests.mqtt_broker import (
    Broker,
    StubDaemon,
    Subscriber,
    broker_fixture,  # noqa: F401 - provides the `broker` fixture
    publish,
)
from tests.test_mqtt import make_settings, online, running

pytestmark = pytest.mark.mqtt
HUGE = "1" + "0" * 400


async def events_only(b: Broker, s: MqttSettings) -> Subscriber:
    """A subscriber on ``events`` alone (hostile payloads on ``cmd`` would break its line
    parsing), live once it has seen the answer to a probe command."""
    sub = await Subscriber(b, s.topic("events")).__aenter__()
    async with asyncio.timeout(10):
        k = 0
        while not any('"id":"probe' in m.payload for m in sub.messages):
            await publish(b, s.topic("cmd"), f'{{"action": "undo", "id": "probe{k}"}}')
            k += 1
            await asyncio.sleep(0.2)
    return sub


async def test_huge_integer_in_a_float_field_is_answered(broker: Broker) -> None:
    """Defect 3: OverflowError in math.isfinite gave no answer at all."""
    s, stub = make_settings(broker), StubDaemon()
    bridge = MqttBridge(s, stub)
    async with running(bridge):
        sub = await online(broker, s)
        try:
            for i, field in enumerate(('"action": "tempo", "bpm"', '"action": "vary", "delta"',
                                       '"action": "interpolate", "alpha"',
                                       '"action": "temperature", "value"')):
                await publish(broker, s.topic("cmd"), f'{{"id": "h{i}", {field}: {HUGE}}}')
                event = await sub.event(f"h{i}")
                assert event["ok"] is False and "must be" in event["error"], event
                assert len(event["error"]) < 300
        finally:
            await sub.__aexit__()
    assert stub.commands == [] and bridge.stats.handler_crashes == 0


async def test_retained_command_is_refused_not_replayed(broker: Broker) -> None:
    """Defect 5: a retained command replayed at every start and reconnect."""
    s, stub = make_settings(broker), StubDaemon()
    await publish(broker, s.topic("cmd"), '{"action": "tempo", "bpm": 150, "id": "ret"}',
                  retain=True)
    bridge = MqttBridge(s, stub)
    async with Subscriber(broker, s.topic("#")) as sub:
        # the refusal goes out as soon as the bridge subscribes: we must be listening by then
        # (an `events` subscriber started alongside the bridge missed it once)
        await sub.wait_subscribed(s.topic("probe"))
        async with running(bridge):
            event = await sub.event("ret")
            assert event["ok"] is False and "retained" in event["error"]
            # a live command published with the retain flag is refused too
            await publish(broker, s.topic("cmd"), '{"action": "undo", "id": "ret2"}',
                          retain=True)
            assert "retained" in (await sub.event("ret2"))["error"]
            await publish(broker, s.topic("cmd"), '{"action": "undo", "id": "live"}')
            assert (await sub.event("live"))["ok"] is True
    assert [c.action for c in stub.commands] == ["undo"] and stub.bpm == 120.0


async def test_spoofed_offline_status_is_corrected(broker: Broker) -> None:
    """Defect 5: a foreign retained `offline` on our status topic stayed there."""
    s = make_settings(broker)
    bridge = MqttBridge(s, StubDaemon())
    async with running(bridge):
        sub = await online(broker, s)
        try:
            start = len(sub.messages)
            await publish(broker, s.topic("status"), "offline", retain=True)
            await sub.wait_for(lambda m: m.topic == s.topic("status") and m.payload == "online",
                               start=start)
        finally:
            await sub.__aexit__()
        async with Subscriber(broker, s.topic("status")) as fresh:
            msg = await fresh.wait_for(lambda m: True)
            assert msg.retained and msg.payload == "online"


async def test_flood_every_command_is_answered(broker: Broker) -> None:
    """Defect 4: aiomqtt's own queue discarded acknowledged commands without a word."""
    s, stub = make_settings(broker, command_queue=8, incoming_queue=4), StubDaemon()
    bridge = MqttBridge(s, stub)
    n = 240  # over command_queue + incoming_queue, under the 256 unsent events kept
    lines = "\n".join(f'{{"action": "undo", "id": "f{i}"}}' for i in range(n)) + "\n"
    async with running(bridge):
        sub = await online(broker, s)
        try:
            await publish(broker, s.topic("cmd"), lines, lines=True)
            answers = [await sub.event(f"f{i}", timeout=20) for i in range(n)]
            busy = [a for a in answers if not a["ok"]]
            assert all(a["error"].startswith("busy") for a in busy)
            assert len(stub.commands) + len(busy) == n
            # a state published mid-flood may count the busy ones before the last received:
            # wait for the one that has both final counts
            await sub.wait_for(
                lambda m: m.topic.endswith("/state") and m.json()["mqtt"]["busy"] == len(busy)
                and m.json()["mqtt"]["received"] == n, timeout=5)
        finally:
            await sub.__aexit__()


async def test_payload_with_newlines_forges_no_log_line(
        broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    """Defect 9: control characters from outside are escaped in logs and errors."""
    caplog.set_level(logging.INFO, logger="daemon.mqtt")
    s = make_settings(broker)
    bridge = MqttBridge(s, StubDaemon())
    forged = '{"id": "n1", "action": "fly\\nCRITICAL daemon: forged", "x": "' + "y" * 60000 + '"}'
    async with running(bridge):
        sub = await events_only(broker, s)
        try:
            await publish(broker, s.topic("cmd"), b"\n\rWARNING forged\x1b[2J" + b"{" * 3)
            await publish(broker, s.topic("cmd"), forged)
            event = await sub.event("n1")
            assert "\n" not in event["error"] and len(event["error"]) < 400
        finally:
            await sub.__aexit__()
    lines = [r.getMessage() for r in caplog.records if r.name == "daemon.mqtt"]
    assert lines and not any("\n" in x or "\r" in x or "\x1b" in x for x in lines)
    assert max(len(x) for x in lines) < 1000


async def test_packets_over_the_limit_never_reach_python(broker: Broker) -> None:
    """Defect 10: a 50 MB payload was read into memory; the broker now drops it for us."""
    s, stub = make_settings(broker), StubDaemon()
    bridge = MqttBridge(s, stub)
    async with running(bridge):
        sub = await events_only(broker, s)
        try:
            big = b'{"id": "huge", "action": "undo", "pad": "' + b"x" * 3_000_000 + b'"}'
            await publish(broker, s.topic("cmd"), big)
            # between the application limit and the packet limit: still an error event
            mid = b'{"id": "mid", "action": "undo", "pad": "' + b"x" * 100_000 + b'"}'
            await publish(broker, s.topic("cmd"), mid)
            assert "65536" in (await sub.event("mid"))["error"]
            await publish(broker, s.topic("cmd"), '{"action": "undo", "id": "after"}')
            assert (await sub.event("after"))["ok"] is True
        finally:
            await sub.__aexit__()
    # the 3 MB one never arrived: probes, mid and after did
    assert bridge.stats.commands_received == bridge.stats.commands_handled + 1
    assert not any('"huge"' in m.payload for m in sub.messages)


async def test_two_daemons_with_one_client_id_are_told_apart(broker: Broker, caplog) -> None:
    """Defect 11: the same client id made two daemons kick each other off 44 times in 30 s,
    with nothing in the log but reconnects."""
    caplog.set_level(logging.WARNING, logger="daemon.mqtt")
    s = make_settings(broker, client_id="same-id")
    first, second = MqttBridge(s, StubDaemon()), MqttBridge(s, StubDaemon())
    async with running(first), running(second, wait=False):
        await asyncio.sleep(3)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("'same-id'" in e and "client_id" in e for e in errors), errors
    assert len(errors) <= 2  # one per 30 s window and daemon, not one per reconnect
    assert first.stats.takeovers + second.stats.takeovers >= 3
    assert "takeovers" in first.stats.for_state()


async def test_a_lone_daemon_reports_no_takeover(broker: Broker, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="daemon.mqtt")
    bridge = MqttBridge(make_settings(broker), StubDaemon())
    async with running(bridge):
        await asyncio.sleep(1)
    assert bridge.stats.takeovers == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
