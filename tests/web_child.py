"""The daemon with its page for tests/test_web_fuzz.py: `python -m tests.web_child ...`.

Runs `daemon.serve.serve` on JACK with the fake engine and the web page, fills all 8 bars with
co-performer candidates (so a note sounds every few steps), and records, like
daemon/bench_timing.py, each note-on's ideal time and the time it was sent (time.monotonic,
the same clock as the test's). On SIGTERM it writes them and the timing counters as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from daemon.app import Daemon
from daemon.cli import web_tasks
from daemon.config import load_config
from daemon.control import parse_command
from daemon.serve import serve


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port-name", required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--bpm", type=float, default=150.0)
    p.add_argument("--out", required=True)
    p.add_argument("--realtime", action="store_true", help="SCHED_FIFO clock thread")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(None, {"midi.api": "jack", "midi.port_name": args.port_name,
                                "clock.bpm": args.bpm, "daemon.engine": "fake",
                                "daemon.prepare_ahead": False, "http.port": args.http_port,
                                "clock.realtime": args.realtime})
    sent: list[tuple[float, float]] = []  # (ideal, sent) per note-on
    ideal = [0.0]
    daemons: list[Daemon] = []

    def instrument(daemon: Daemon) -> None:
        daemons.append(daemon)
        clock, sched = daemon.clock, daemon.scheduler
        fire, send = clock._fire, sched._send

        def timed_fire(step: int) -> None:
            ideal[0] = clock.ideal_time(step)
            fire(step)

        def timed_send(msg: Any) -> None:
            send(msg)
            if msg.type == "note_on" and msg.velocity > 0:
                sent.append((ideal[0], time.monotonic()))

        clock._fire, sched._send = timed_fire, timed_send

    async def fill(daemon: Daemon) -> None:
        for first in (1, 5):
            cmd = parse_command({"action": "regenerate", "first_bar": first, "bars": 4,
                                 "seed": first, "temperature": 0.7})
            result = await daemon.handle(cmd)
            assert result.get("ok"), result
        logging.getLogger("web_child").info("filled: 8 co-performer bars")

    asyncio.run(serve(config, [fill, *web_tasks(config)], on_ready=instrument))
    snap = daemons[0].snapshot()
    Path(args.out).write_text(json.dumps({
        "sent": sent, "timing": {k: snap[k] for k in ("dropped_plans", "late_plans",
                                                      "skipped_steps")}}))


if __name__ == "__main__":
    main()
