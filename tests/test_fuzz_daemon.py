"""Bounded fuzz (issue 15, marker `slow`): a corpus of hostile MQTT payloads and MIDI byte
strings against `run_daemon.py` on real JACK and mosquitto. It must answer every payload, stay
alive, change no state, and keep its clock running. Prints the counts for the notes:
  scripts/with_training_paused.sh .venv/bin/python -m pytest -m slow tests/test_fuzz_daemon.py -s
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
import uuid
from pathlib import Path

import mido
import pytest

from tests.jack_server import jack_server  # noqa: F401
from tests.mqtt_broker import HOST, MOSQUITTO_PUB, MOSQUITTO_SUB, broker_fixture  # noqa: F401
from tests.test_e2e_jack import Daemon, ticks_seen
from tests.test_e2e_mqtt_jack import Sub

pytestmark = [pytest.mark.jack, pytest.mark.mqtt, pytest.mark.slow]

TAILS = [  # each follows '{"id":"zN",'
    '"action":"tempo","bpm":1' + "0" * 400 + "}", '"action":"vary","delta":-1' + "0" * 999 + "}",
    '"action":"seed","value":' + "9" * 5000 + "}", '"action":"interpolate","alpha":NaN}',
    '"action":"interpolate","alpha":Infinity}', '"action":"tempo","bpm":"fast"}',
    '"action":"fly\\nCRITICAL forged"}', '"action":"undo","x":' + "[" * 3000 + "]" * 3000 + "}",
    '"action":"regenerate","first_bar":8,"bars":4}', '"action":"clear","bars":2}',
    '"action":"mode","value":"' + "x" * 60000 + '"}', '"action":"record","value":1}',
    '"action":"transport","value":true}', '"action":null}', '"action":["undo"]}',
    '"action":"target"}', '"action":"step","direction":0}', '"action":', '"action":"tempo",',
    '"action":"temperature","value":-0.0001}', '"action":"tempo","bpm":1e999}',
    '"action":"regenerate","seed":-1}', '"action":"regenerate","temperature":10.0000001}',
]
NO_ID = [b"", b"   ", b"\xff\xfe\x00", b"[]", b"null", b"42", b'"undo"', b"{" * 100, b"\x1b[2J"]


def corpus(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        tail = TAILS[i % len(TAILS)]
        if i % 7 == 6:  # random bytes after a valid start
            tail = "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(1, 40)))
        out.append(f'{{"id":"z{i}",{tail}'.encode())
    return out


def hostile_midi(rng: random.Random, n: int) -> list[list[int]]:
    """Byte strings that are not notes or CCs: truncated, unknown, SysEx, SPP, realtime."""
    fixed = [[0xE0], [0xE5, 0x10], [0xF1], [0xF2], [0xF2, 0x10], [0xF2, 0x7F, 0x7F], [0xF4],
             [0xF0, *[rng.randrange(128) for _ in range(4000)], 0xF7], [0xF8] * 1, [0xFA], [0xFC]]
    out = list(fixed)
    while len(out) < n:
        data = [rng.randrange(256) for _ in range(rng.randrange(1, 4))]  # rtmidi: <= 3
        try:
            msg = mido.Message.from_bytes(data)
        except Exception:  # noqa: BLE001 - unparsable: exactly what we want
            out.append(data)
            continue
        if msg.type not in ("note_on", "note_off", "control_change", "start", "stop",
                            "continue"):
            out.append(data)
    return out


class OutSub(Sub):
    """Sub on the daemon's outputs only (the hostile `cmd` payloads are not valid text)."""

    def __init__(self, port: int, base: str) -> None:
        self.lines = []
        self.proc = subprocess.Popen(
            [MOSQUITTO_SUB, "-h", HOST, "-p", str(port), "-v", "-t", f"{base}/events",
             "-t", f"{base}/state", "-t", f"{base}/status"],
            stdout=subprocess.PIPE, text=True, errors="replace")
        threading.Thread(target=self._read, daemon=True).start()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def test_fuzz_daemon_answers_stays_alive_and_keeps_time(jack_server, broker, tmp_path):  # noqa: F811
    rng = random.Random(15)
    device = f"fz{uuid.uuid4().hex[:6]}"
    base = f"clsm/{device}"
    sub = OutSub(broker.port, base)
    d = Daemon(tmp_path, "--bpm", "240", "--mqtt-host", HOST, "--mqtt-port", str(broker.port),
               "--mqtt-device-id", device, config="[clock]\nsend_clock = true\n")
    payloads, midi = corpus(rng, 400), hostile_midi(rng, 3000)
    try:
        d.wait_log("ready:", timeout=60)
        sub.wait(lambda t, p: t == f"{base}/status" and p == "online")
        _, before = sub.wait(lambda t, p: t == f"{base}/state")
        state0, rss0, ticks0 = json.loads(before), rss_kib(d.proc.pid), ticks_seen(d.rec)
        for i, data in enumerate(midi):
            d.rec._out.send_message(data)
            if i % 100 == 0:
                time.sleep(0.01)  # JACK's ring between the test client and the server
        for p in payloads + NO_ID:
            subprocess.run([MOSQUITTO_PUB, "-h", HOST, "-p", str(broker.port), "-t",
                            f"{base}/cmd", "-s" if p else "-n"], input=p, check=True, timeout=10)
        ids = {f"z{i}" for i in range(len(payloads))}
        end = time.monotonic() + 60
        answered: set[str] = set()
        while time.monotonic() < end and answered != ids:
            answered = {json.loads(x).get("id") for t, x in list(sub.lines)
                        if t == f"{base}/events"} & ids
            time.sleep(0.2)
        answers = [e for e in (json.loads(x) for t, x in list(sub.lines) if t == f"{base}/events")
                   if "ok" in e]  # transport events carry no "ok"
        ticks1 = ticks_seen(d.rec)
        assert d.rec.wait_for(lambda _: ticks_seen(d.rec) > ticks1 + 48, 20), "clock stopped"
        _, after = sub.wait(lambda t, p: t == f"{base}/state" and json.loads(p)["mqtt"]["received"]
                            >= len(payloads) + len(NO_ID) - 2)
        state1, rss1 = json.loads(after), rss_kib(d.proc.pid)
        alive = d.proc.poll() is None
    finally:
        rc = d.stop()
        sub.close()
    changed = [k for k in ("tokens", "bpm", "mode", "target", "owners", "seed", "temperature")
               if state0.get(k) != state1.get(k)]
    print(f"\nfuzz: MQTT sent {len(payloads) + len(NO_ID)} ({len(payloads)} with ids), answered "
          f"{len(answers)} times, ids answered {len(answered)}/{len(ids)}, ok answers "
          f"{sum(e['ok'] is True for e in answers)}; MIDI byte strings sent {len(midi)}; "
          f"state changes {changed}; alive {alive}, exit {rc}; ticks {ticks0} -> {ticks1}; "
          f"RSS {rss0} -> {rss1} KiB; bridge counters {state1.get('mqtt')}")
    assert alive and rc == 0
    assert answered == ids and all(e["ok"] is False for e in answers)
    assert len(answers) == len(payloads) + len(NO_ID)
    assert changed == []
    assert ticks1 > ticks0
    assert any("unparsable MIDI" in line for line in d.log)
