"""The command line: `python run_daemon.py --help`.

Options override the config (configs/default.toml <- --config FILE <- options). Errors a user
can fix (config, MIDI backend, model) end with one line that says what to do and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from daemon.app import Daemon, ExtraTask
from daemon.config import Config, ConfigError, load_config
from daemon.midi_io import MidiBackendError, list_ports
from daemon.serve import serve
from daemon.worker import EngineLoadError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clsm-daemon",
        description="Real-time MIDI co-performer around the CLSM model (Akama, ISMIR 2021).")
    p.add_argument("--config", help="a TOML file laid over configs/default.toml")
    p.add_argument("--model", help="model directory (default models/clsm-default)")
    p.add_argument("--midi-api", choices=["auto", "alsa", "jack", "coremidi"])
    p.add_argument("--port-name", help="virtual ports <name>-in / <name>-out (default clsm)")
    p.add_argument("--connect-in", help="read an existing MIDI port (by name) instead")
    p.add_argument("--connect-out", help="write an existing MIDI port (by name) instead")
    p.add_argument("--list-ports", action="store_true",
                   help="list the MIDI ports of the chosen --midi-api (names for --connect-in / "
                        "--connect-out) and exit")
    p.add_argument("--bpm", type=float)
    p.add_argument("--clock", choices=["internal", "external", "link"],
                   help="transport: internal (--bpm), external MIDI clock in, or link (an "
                        "Ableton Link session: tempo, bar lines, start/stop; [link] config)")
    p.add_argument("--send-clock", action=argparse.BooleanOptionalAction, default=None,
                   help="internal clock: send MIDI clock, Start and Stop out (config: "
                        "[clock] send_clock)")
    p.add_argument("--mode", choices=["loop", "follow"])
    p.add_argument("--engine", choices=["real", "fake"])
    p.add_argument("--engine-worker", choices=["thread", "process"])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="engine device (config [engine] device; auto = cuda when available)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    g = p.add_argument_group("OSC (override [osc] of the config; docs/osc.md)")
    g.add_argument("--osc-port", type=int, help="UDP port for /clsm/... messages; giving it "
                   "enables OSC (0 = off)")
    g.add_argument("--osc-host", help="address to listen on (default 127.0.0.1: this machine "
                   "only)")
    g = p.add_argument_group("web page (override [http] of the config; README 'Web page')")
    g.add_argument("--http-port", type=int, help="serve the live piano-roll page and its "
                   "WebSocket on this TCP port (0 = off)")
    g.add_argument("--http-host", help="address to listen on (default 127.0.0.1: this machine "
                   "only; any other needs a token)")
    g.add_argument("--http-token", help="token the page must carry (/?token=...); required "
                   "beyond loopback. $CLSM_HTTP_TOKEN keeps it out of `ps`")
    with contextlib.suppress(ImportError):
        from daemon import mqtt
        mqtt.add_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, {
        "daemon.model": args.model, "midi.api": args.midi_api, "midi.port_name": args.port_name,
        "midi.connect_in": args.connect_in, "midi.connect_out": args.connect_out,
        "clock.bpm": args.bpm, "clock.source": args.clock, "clock.send_clock": args.send_clock,
        "daemon.mode": args.mode,
        "daemon.engine": args.engine, "daemon.engine_worker": args.engine_worker,
        "engine.device": args.device,
        "osc.port": args.osc_port, "osc.host": args.osc_host,
        "http.port": args.http_port, "http.host": args.http_host, "http.token": args.http_token,
    })


def mqtt_tasks(config: Config, args: argparse.Namespace) -> list[ExtraTask]:
    """The MQTT bridge as an extra task, when enabled."""
    try:
        from daemon.mqtt import MqttBridge, MqttSettings
    except ImportError:
        return []
    settings = MqttSettings.from_config(config["mqtt"], args)
    if not settings.enabled:
        return []

    async def bridge(daemon: Daemon) -> None:
        b = MqttBridge(settings, daemon)
        # Results, transport changes and errors go out as events and refresh the state.
        daemon.listeners.append(b.on_daemon_event)
        await b.run()
    return [bridge]


def osc_tasks(config: Config) -> list[ExtraTask]:
    """The OSC server as an extra task, when a port is given."""
    if not config["osc"]["port"]:
        return []
    from daemon.osc import OscServer, OscSettings

    settings = OscSettings.from_config(config["osc"])

    async def server(daemon: Daemon) -> None:
        await OscServer(settings, daemon).run()
    return [server]


def web_tasks(config: Config) -> list[ExtraTask]:
    """The web page's server as an extra task, when a port is given."""
    if not config["http"]["port"]:
        return []
    from daemon.web_guard import WebSettings
    from daemon.webui import WebServer

    settings = WebSettings.from_config(config["http"])  # refuses beyond loopback without a token

    async def server(daemon: Daemon) -> None:
        await WebServer(settings, daemon).run()
    return [server]


def show_ports(api: str) -> int:
    """`--list-ports`: the MIDI ports on `api`, one a line, on stdout (the command's output)."""
    name, sources, destinations = list_ports(api)
    lines = [f"MIDI API: {name}", "inputs (read from; --connect-in NAME):"]
    lines += [f"  {port}" for port in sources] or ["  (none)"]
    lines.append("outputs (write to; --connect-out NAME):")
    lines += [f"  {port}" for port in destinations] or ["  (none)"]
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        if args.list_ports:
            return show_ports(config["midi"]["api"])
        asyncio.run(serve(config, mqtt_tasks(config, args) + osc_tasks(config)
                          + web_tasks(config)))
    except (ConfigError, MidiBackendError, EngineLoadError, ValueError) as e:
        print(f"clsm daemon: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
