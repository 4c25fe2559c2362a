"""Issue 15, defect 6, as a closed terminal sends it: SIGHUP (or SIGTERM, as systemd's
control-group kill does) to the daemon's whole process group, engine worker child included.

`test_e2e_jack.py::test_sighup_ends_every_note_like_sigterm` signals the daemon alone; here
every process of the group gets the signal at once, so the engine worker child must leave
ending to its parent the way it already did for Ctrl-C's SIGINT.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess

import pytest

import tests.test_e2e_jack as e2e
from tests.jack_server import jack_server, sounding_after  # noqa: F401

pytestmark = pytest.mark.jack


def problems(log: list[str]) -> list[str]:
    return [line for line in log if any(
        word in line for word in ("Traceback", "ERROR", "BrokenProcessPool", "could not be",
                                 "died unexpectedly"))]


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_a_signal_to_the_whole_group_ends_every_note_and_exits_cleanly(
        jack_server, tmp_path, monkeypatch, sig) -> None:  # noqa: F811
    # The daemon leads a process group of its own (as a shell job does), so the group signal
    # reaches it and its engine worker, never pytest.
    monkeypatch.setattr(e2e.subprocess, "Popen",
                        functools.partial(subprocess.Popen, start_new_session=True))
    d = e2e.Daemon(tmp_path, "--bpm", "120", "--engine-worker", "process")
    try:
        d.wait_log("ready:")
        d.rec.send(e2e.cc(20, 0))  # bars 1-4
        d.rec.send(e2e.cc(21, 127))
        d.rec.send(e2e.cc(22, 127))
        sounding = d.rec.wait_for(lambda ms: bool(sounding_after(
            [(t, m) for t, m in ms if getattr(m, "channel", -1) == 0])), timeout=20)
        assert sounding, f"no note ever sounded; log:\n{''.join(d.log[-20:])}"
        os.killpg(d.proc.pid, sig)
        rc = d.proc.wait(15)
    finally:
        d.stop()
    assert rc == 0, "".join(d.log[-30:])
    assert sounding_after(d.rec.messages()) == set()
    assert any("shutting down" in line for line in d.log)
    assert problems(d.log) == [], "".join(line for line in d.log if " DEBUG " not in line)
