"""Console entry points (pyproject [project.scripts]) and the daemon's port options:
`--list-ports` and `--connect-in` / `--connect-out` through a real JACK server (marker `jack`)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import mido
import pytest

from daemon.cli import build_parser, config_from_args
from tests.jack_server import Recorder, jack_server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"clsm-daemon": "daemon.cli:main", "clsm-train": "training.train:main",
           "clsm-evaluate": "training.evaluate:main", "clsm-export": "engine.export:main"}


def test_console_scripts_are_declared_and_importable() -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == SCRIPTS
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name))


@pytest.mark.parametrize("target", sorted(SCRIPTS.values()))
def test_each_entry_point_answers_help(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    module, _, name = target.partition(":")
    with pytest.raises(SystemExit) as exit_:
        getattr(importlib.import_module(module), name)(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_connect_options_reach_the_midi_config() -> None:
    args = build_parser().parse_args(["--connect-in", "Keystep:out", "--connect-out", "synth:in"])
    midi = config_from_args(args)["midi"]
    assert (midi["connect_in"], midi["connect_out"]) == ("Keystep:out", "synth:in")


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "run_daemon.py", *args], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.jack
def test_list_ports_shows_the_jack_ports(jack_server) -> None:  # noqa: F811
    rec = Recorder(f"lp{uuid.uuid4().hex[:5]}")
    try:
        done = run_cli("--list-ports", "--midi-api", "jack")
    finally:
        rec.close()
    assert done.returncode == 0, done.stderr
    out = done.stdout
    inputs, _, outputs = out.partition("outputs (write to")
    assert "MIDI API: jack" in out
    assert rec.port_out in inputs and rec.port_in not in inputs  # we can read its out
    assert rec.port_in in outputs and rec.port_out not in outputs  # and write to its in


def test_list_ports_without_a_backend_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JACK_DEFAULT_SERVER", f"absent-{uuid.uuid4().hex[:6]}")
    monkeypatch.setenv("JACK_NO_START_SERVER", "1")
    done = run_cli("--list-ports", "--midi-api", "jack")
    assert done.returncode == 2
    assert "no JACK server is running" in done.stderr


@pytest.mark.jack
def test_daemon_connects_to_existing_ports_by_name(jack_server) -> None:  # noqa: F811
    """--connect-in / --connect-out: no virtual ports; the clock goes out to the named port and
    a transport CC from the named port stops it."""
    rec = Recorder(f"cn{uuid.uuid4().hex[:5]}")
    proc = subprocess.Popen(
        [sys.executable, "run_daemon.py", "--midi-api", "jack", "--engine", "fake",
         "--connect-in", rec.port_out, "--connect-out", rec.port_in, "--send-clock"],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        assert rec.wait_for(lambda ms: sum(m.type == "clock" for _, m in ms) >= 24, timeout=60), \
            "no MIDI clock arrived at the port named by --connect-out"
        rec.send(mido.Message("control_change", channel=15, control=31, value=0))  # stop
        assert rec.wait_for(lambda ms: any(m.type == "stop" for _, m in ms), timeout=10), \
            "the transport CC sent to the port named by --connect-in was not acted on"
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        rec.close()
    assert proc.returncode == 0, err
    assert "clsm-in" not in err  # no virtual port was made
