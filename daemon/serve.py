"""Wiring: the config -> engine worker, ports, performance, CC mapper -> a running Daemon.

`serve(config)` is what `run_daemon.py` (daemon/cli.py) runs; benchmarks and in-process tests
use it too, with extra tasks and an `on_ready` hook.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from daemon.app import Daemon, ExtraTask
from daemon.config import Config
from daemon.midi_io import MidiInput, MidiOutput, open_ports
from daemon.worker import EngineSpec, EngineWorker

log = logging.getLogger("daemon")


def make_performance(config: Config) -> Any:
    from daemon.buffer import Performance
    d, m = config["daemon"], config["midi"]
    return Performance(mode=d["mode"], polyphony=m["polyphony"], record=d["record"],
                       target=(1, d["regen_bars"]), max_hold_bars=d["max_hold_bars"])


def make_cc_mapper(config: Config) -> Any:
    from daemon.control import CCMapper
    c = config["control"]
    return CCMapper(c["channel"], dict(c["cc"]), max_delta=c["max_delta"])


def engine_spec(config: Config) -> EngineSpec:
    d, e = config["daemon"], config["engine"]
    sampling = e["decoding"] == "sample"
    return EngineSpec(kind=d["engine"], model_dir=d["model"], threads=e["threads"],
                      options={"backend": e["backend"], "device": e["device"],
                               "max_batch": e["max_batch"],
                               "temperature": e["temperature"] if sampling else 0.0,
                               "top_p": e["top_p"] if sampling else 1.0})


async def serve(config: Config, extra_tasks: list[ExtraTask] | None = None,
                on_ready: Callable[[Daemon], None] | None = None,
                spec: EngineSpec | None = None) -> None:
    """Load the engine (fail early), open the ports, run until SIGINT/SIGTERM."""
    m, d = config["midi"], config["daemon"]
    if d["engine_worker"] == "thread":
        # The clock thread must get the GIL back quickly from the engine thread's Python glue.
        sys.setswitchinterval(0.0005)
    async with EngineWorker(spec or engine_spec(config), d["engine_worker"]) as worker:
        performance, cc = make_performance(config), make_cc_mapper(config)
        async with open_ports(MidiInput(m["port_name"], m["api"], m["connect_in"]),
                              MidiOutput(m["port_name"], m["api"], m["connect_out"],
                                         m["output_channel"])) as (midi_in, out):
            daemon = Daemon(config, worker, out, performance, cc)
            daemon.extra_tasks.extend(extra_tasks or [])
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, daemon.stopping.set)
            if on_ready is not None:
                on_ready(daemon)
            log.info("ready: %s clock, %.1f bpm, %s mode, engine %s in a %s worker",
                     config["clock"]["source"], config["clock"]["bpm"], d["mode"], d["engine"],
                     d["engine_worker"])
            try:
                await daemon.run(midi_in)
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
