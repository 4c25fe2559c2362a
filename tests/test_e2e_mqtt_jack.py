"""MQTT and MIDI together: a command published with mosquitto_pub regenerates bars, the result
comes back on `events` and in `state`, and the notes come out of the daemon's JACK port."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid

import pytest

from engine.tokens import PITCH_MIN, is_pitch
from tests.jack_server import jack_server, sounding_after  # noqa: F401
from tests.mqtt_broker import HOST, MOSQUITTO_PUB, MOSQUITTO_SUB, broker_fixture  # noqa: F401
from tests.test_e2e_jack import Daemon

pytestmark = [pytest.mark.jack, pytest.mark.mqtt]


class Sub:
    """A real mosquitto_sub on everything under the device's topics."""

    def __init__(self, port: int, topic: str) -> None:
        self.lines: list[tuple[str, str]] = []
        self.proc = subprocess.Popen([MOSQUITTO_SUB, "-h", HOST, "-p", str(port), "-t", topic, "-v"],
                                     stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            topic, _, payload = line.rstrip("\n").partition(" ")
            self.lines.append((topic, payload))

    def wait(self, pred, timeout: float = 20.0) -> tuple[str, str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for item in list(self.lines):
                if pred(*item):
                    return item
            time.sleep(0.05)
        raise AssertionError(f"not seen in {timeout} s; got {self.lines[-10:]}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def test_mqtt_regenerate_reaches_events_state_and_midi_out(jack_server, broker, tmp_path):  # noqa: F811
    device = f"e2e{uuid.uuid4().hex[:6]}"
    base = f"clsm/{device}"
    sub = Sub(broker.port, f"{base}/#")
    d = Daemon(tmp_path, "--bpm", "240", "--engine-worker", "thread", "--mqtt-host", HOST,
               "--mqtt-port", str(broker.port), "--mqtt-device-id", device)
    try:
        d.wait_log("ready:", timeout=60)
        sub.wait(lambda t, p: t == f"{base}/status" and p == "online")
        cmd = {"action": "regenerate", "first_bar": 1, "bars": 2, "seed": 5, "id": "m1"}
        subprocess.run([MOSQUITTO_PUB, "-h", HOST, "-p", str(broker.port), "-t", f"{base}/cmd",
                        "-m", json.dumps(cmd)], check=True, timeout=10)
        _, payload = sub.wait(lambda t, p: t == f"{base}/events" and '"m1"' in p)
        event = json.loads(payload)
        assert event["ok"] and (event["first_bar"], event["last_bar"]) == (1, 2), event
        tokens = event["tokens"]
        assert len(tokens) == 32
        sub.wait(lambda t, p: t == f"{base}/state"
                 and json.loads(p)["owners"][:2] == ["coperformer", "coperformer"])
        pitches = {t + PITCH_MIN for t in tokens if is_pitch(t)}
        assert pitches, "the fake engine's candidate should hold notes"
        # bars 1-2 come round once per 8-bar loop (8 s at 240 bpm)
        assert d.rec.wait_for(lambda ms: any(m.type == "note_on" and m.velocity > 0
                                             and m.note in pitches for _, m in ms), 20)
        bad = {"action": "tempo", "bpm": 1000, "id": "bad1"}
        subprocess.run([MOSQUITTO_PUB, "-h", HOST, "-p", str(broker.port), "-t", f"{base}/cmd",
                        "-m", json.dumps(bad)], check=True, timeout=10)
        _, payload = sub.wait(lambda t, p: t == f"{base}/events" and '"bad1"' in p)
        assert not json.loads(payload)["ok"] and "bpm" in json.loads(payload)["error"]
    finally:
        rc = d.stop()
    try:
        sub.wait(lambda t, p: t == f"{base}/status" and p == "offline", timeout=10)
    finally:
        sub.close()
    assert rc == 0
    assert sounding_after(d.rec.messages()) == set()
