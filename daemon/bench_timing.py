"""Output timing through a real JACK server while the engine generates every bar.

`python -m daemon.bench_timing --json [--seconds 20]` starts a private JACK server (dummy
backend), runs the daemon in a child process for each engine worker (thread, process) with a
fake engine that burns CPU on every call (or the real engine: `--engine real`), plays a melody
into the daemon's input first (`--melody-bars`, 8 by default: the real model answers an empty
context with rests), then asks for a 4-bar regeneration every bar, records the co-performer's
note-ons with a separate JACK client and prints, per worker, the onset error against the ideal
grid (p50 / p99 / max, ms):
- `send_ms`: the daemon's send time - the step's ideal time (the daemon's own timing),
- `arrival_ms`: arrival at the other client - ideal time (includes JACK's period latency),
- `jitter_ms`: |arrival - ideal - median(arrival - ideal)| (what a listener hears as timing
  wobble; JACK delivers MIDI per period, so up to one period of it is the server's),
- `timing`: the daemon's own counts from its `state`: `dropped_plans` (steps that sounded with
  no plan: content lost), `late_plans` (plan revisions too late: the step's first plan played),
  `skipped_steps` (steps the clock skipped after a stall),
- `engine_ms`: the engine's latency per regeneration (p50 / p99 / max),
- `press_ms`: press-to-result (request made, answer applied) for presses answered from a
  candidate prepared before the press (`ready`) and for the others (`cold`). `--same-target`
  regenerates bars 1-4 every time (so the prepared answer fits), `--no-prepare` turns the
  preparation off for the comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from daemon.jackd import JackdError, start_jack, stop_jack

log = logging.getLogger("bench_timing")


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    a = np.asarray(values)
    return {"n": len(values), "p50": round(float(np.percentile(a, 50)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "max": round(float(a.max()), 3)}


# ----- child: the daemon, instrumented ------------------------------------------------------

async def _child(args: argparse.Namespace) -> None:
    from daemon.app import Daemon
    from daemon.config import load_config
    from daemon.serve import engine_spec, serve
    from daemon.worker import EngineSpec

    config = load_config(None, {"midi.api": "jack", "midi.port_name": args.port_name,
                                "clock.bpm": args.bpm, "daemon.engine": args.engine,
                                "daemon.engine_worker": args.worker,
                                "daemon.model": args.model, "daemon.status_every_bars": 4,
                                "clock.spin_ms": args.spin_ms, "clock.realtime": args.realtime,
                                "daemon.prepare_ahead": args.prepare})
    spec = engine_spec(config)
    spec = EngineSpec(spec.kind, spec.model_dir, spec.threads, spec.options,
                      busy_ms=args.busy_ms, busy_kind=args.load)
    sent: list[tuple[float, float, int]] = []  # (ideal, sent, pitch) per note-on
    ideal = [0.0]
    daemons: list[Daemon] = []

    def instrument(daemon: Daemon) -> None:
        daemons.append(daemon)
        clock, sched = daemon.clock, daemon.scheduler
        fire, send = clock._fire, sched._send

        def timed_fire(step: int) -> None:  # the timing thread: keep it cheap
            ideal[0] = clock.ideal_time(step)
            fire(step)

        def timed_send(msg: Any) -> None:
            send(msg)
            if msg.type == "note_on" and msg.velocity > 0:
                sent.append((ideal[0], time.monotonic(), msg.note))

        clock._fire, sched._send = timed_fire, timed_send

    engine_ms: list[float] = []
    press_ms: dict[str, list[float]] = {"ready": [], "cold": []}

    async def regenerate_every_bar(daemon: Daemon) -> None:
        bar_s = 60.0 / args.bpm * 4
        await _play_melody(daemon, args.melody_bars)
        for i in range(int(args.seconds / bar_s)):
            first = 1 if args.same_target else 1 + 4 * (i % 2)
            command = SimpleNamespace(action="regenerate", id=None, source="bench",
                                      args={"first_bar": first, "bars": 4})
            result = await daemon.handle(command)
            if "error" in result:
                log.warning("%s", result)
                continue
            press_ms["ready" if result.get("ready") else "cold"].append(result["press_ms"])
            if not result.get("ready"):
                engine_ms.append(float(result["latency_ms"]))
            await asyncio.sleep(bar_s)
        daemon.stopping.set()

    await serve(config, [regenerate_every_bar], on_ready=instrument, spec=spec)
    snap = daemons[0].snapshot()
    timing = {k: snap[k] for k in ("dropped_plans", "late_plans", "skipped_steps")}
    Path(args.out).write_text(json.dumps({"sent": sent, "timing": timing, "engine_ms": engine_ms,
                                          "press_ms": press_ms}))


# A bar of quarter and eighth notes (step, pitch offset, steps), moved through a progression.
_PHRASE = [(0, 0, 4), (4, 4, 2), (6, 7, 2), (8, 12, 4), (12, 11, 2), (14, 7, 2)]
_ROOTS = [60, 65, 67, 60, 57, 62, 67, 60]


async def _play_melody(daemon: Any, bars: int) -> None:
    """Notes into the daemon as its MIDI input would deliver them, on the clock's grid."""
    import mido

    async def until(position: float) -> None:
        while daemon.clock.position() < position:
            await asyncio.sleep(0.002)

    start = (int(daemon.clock.position()) // 16 + 1) * 16  # from the next bar line
    for bar in range(bars):
        for step, offset, length in _PHRASE:
            at = start + 16 * bar + step
            pitch = _ROOTS[bar % len(_ROOTS)] + offset
            await until(at)
            daemon._note(mido.Message("note_on", note=pitch, velocity=90), time.monotonic())
            await until(at + length - 0.3)
            daemon._note(mido.Message("note_off", note=pitch), time.monotonic())


# ----- parent: JACK server, recorder, figures ----------------------------------------------

class _Recorder:
    def __init__(self, name: str) -> None:
        import rtmidi
        self.name = name
        self.arrivals: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self._in = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name=name)
        self._in.open_virtual_port("in")
        self._in.set_callback(self._on)

    def _on(self, event: tuple[list[int], float], _data: object) -> None:
        t = time.monotonic()
        data = event[0]
        if len(data) == 3 and data[0] & 0xF0 == 0x90 and data[2] > 0:
            with self._lock:
                self.arrivals.append((t, data[1]))

    @property
    def port(self) -> str:
        return f"{self.name}:in"

    def sources(self) -> list[str]:
        """MIDI output ports on the server, listed through this client."""
        return list(self._in.get_ports())

    def close(self) -> None:
        self._in.cancel_callback()
        self._in.close_port()
        self._in.delete()


def _connect(rec: _Recorder, src_suffix: str, timeout: float = 120.0) -> None:
    """Connect the daemon's output to the recorder once it exists.

    The port is looked for through the recorder's own JACK client: polling with jack_lsp
    (a client opened and closed every few ms) while the daemon opens its two clients can
    leave the daemon's output client stuck for good (see daemon/midi_io.py). The daemon
    opens -out last, so once it is there jack_connect can no longer race with it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hits = [p for p in rec.sources() if p.endswith(src_suffix)]
        if hits:
            subprocess.run(["jack_connect", hits[0], rec.port], check=True, timeout=10)
            return
        time.sleep(0.05)
    raise SystemExit(f"daemon port *{src_suffix} never appeared")


def run_one(args: argparse.Namespace, worker: str) -> dict[str, Any]:
    port = f"bench{uuid.uuid4().hex[:4]}"
    rec = _Recorder(f"{port}-rec")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sent.json"
        cmd = [sys.executable, "-m", "daemon.bench_timing", "--child", "--worker", worker,
               "--port-name", port, "--out", str(out), "--seconds", str(args.seconds),
               "--bpm", str(args.bpm), "--busy-ms", str(args.busy_ms), "--load", args.load,
               "--engine", args.engine, "--model", args.model, "--spin-ms", str(args.spin_ms),
               "--melody-bars", str(args.melody_bars),
               "--prepare" if args.prepare else "--no-prepare"]
        cmd += ["--same-target"] if args.same_target else []
        cmd += ["--realtime"] if args.realtime else []
        child = subprocess.Popen(cmd)
        try:
            _connect(rec, f"{port}-out")
            rc = child.wait(args.seconds + 120)
        finally:
            if child.poll() is None:
                child.terminate()
                child.wait(10)
        time.sleep(0.1)
        rec.close()
        if rc != 0 or not out.exists():
            raise SystemExit(f"daemon child ({worker}) failed with exit code {rc}")
        child_out = json.loads(out.read_text())
        sent, timing = child_out["sent"], child_out["timing"]
        engine_ms, press_ms = child_out["engine_ms"], child_out["press_ms"]
    arrivals = rec.arrivals
    # Both lists are in send order and JACK MIDI loses nothing, but the recorder may have
    # missed the first notes: walk both, pairing each arrival with the next sent note of its
    # pitch that was sent before it arrived.
    pairs, i = [], 0
    for a in arrivals:
        j = i
        while j < len(sent) and not (sent[j][2] == a[1] and sent[j][1] <= a[0]):
            j += 1
        if j < len(sent):
            pairs.append((sent[j], a))
            i = j + 1
    send_err = [(s[1] - s[0]) * 1000 for s, _ in pairs]
    arr_err = [(a[0] - s[0]) * 1000 for s, a in pairs]
    med = float(np.median(arr_err)) if arr_err else 0.0
    return {"worker": worker, "notes": len(pairs), "unmatched": len(arrivals) - len(pairs),
            "send_ms": _stats(send_err), "arrival_ms": _stats(arr_err),
            "jitter_ms": _stats([abs(e - med) for e in arr_err]), "timing": timing,
            "engine_ms": _stats(engine_ms),
            "press_ms": {k: _stats(v) for k, v in press_ms.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--bpm", type=float, default=120.0)
    p.add_argument("--period", type=int, default=128, help="JACK period (frames at 48 kHz)")
    p.add_argument("--workers", default="thread,process")
    p.add_argument("--engine", choices=["fake", "real"], default="fake")
    p.add_argument("--model", default="models/clsm-default")
    p.add_argument("--busy-ms", type=float, default=40.0, help="CPU burnt per engine call")
    p.add_argument("--load", choices=["python", "torch"], default="python",
                   help="python holds the GIL while burning; torch releases it in ops")
    p.add_argument("--spin-ms", type=float, default=2.0, help="clock: spin this long before a step")
    p.add_argument("--prepare", action=argparse.BooleanOptionalAction, default=True,
                   help="prepare the next regenerate answer before the press ([daemon] "
                        "prepare_ahead)")
    p.add_argument("--same-target", action="store_true", help="regenerate bars 1-4 every bar")
    p.add_argument("--melody-bars", type=int, default=8,
                   help="bars of melody played into the input before the regenerations")
    p.add_argument("--realtime", action="store_true", help="clock thread with SCHED_FIFO")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--port-name", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.child else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.child:
        asyncio.run(_child(args))
        return 0
    try:
        server = start_jack("clsm-bench", args.period)
    except JackdError as e:
        raise SystemExit(str(e)) from e
    os.environ.update(server.env())
    try:
        results = [run_one(args, w) for w in args.workers.split(",")]
    finally:
        stop_jack(server)
    report = {"jack": {"server": server.name, "period_frames": args.period, "rate": 48000,
                       "period_ms": round(args.period / 48.0, 3)},
              "bpm": args.bpm, "seconds": args.seconds, "engine": args.engine,
              "load": {"busy_ms": args.busy_ms, "kind": args.load}, "spin_ms": args.spin_ms,
              "realtime": args.realtime,
              "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in results:
            print(f"{r['worker']:8s} notes={r['notes']:4d} send {r['send_ms']} "
                  f"arrival {r['arrival_ms']} jitter {r['jitter_ms']} {r['timing']} "
                  f"engine {r['engine_ms']} press {r['press_ms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
