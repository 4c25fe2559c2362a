"""Ableton Link with two real peers, run in a private network namespace (never the real network).

Link finds its peers by UDP multicast on every interface of the machine. These tests must not
announce anything on the machine's real interfaces, so they re-run tests/link_session.py under
`unshare -n` (a new network namespace whose only interface is loopback; multicast is routed to
it), with a JACK server of its own inside. They skip, saying why, where a namespace cannot be
made (not Linux, no `unshare`/`ip`, no privilege for namespaces). The namespace's tests refuse
to run anywhere else (they check that `lo` is the only interface).

What the inner tests show (figures printed with `pytest -s`): the daemon starts with the
session on its bar line; its tempo follows a peer's change within 1 s; its bar lines land within
2 ms of the peer's quantum boundary on the output port through JACK; our tempo change (CC 30)
reaches the peer; the session's stop stops it; losing every peer keeps the tempo.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.jack
ROOT = Path(__file__).resolve().parent.parent
INNER = "tests/link_session.py"
INNER_TESTS = 4


def namespace_command() -> list[str]:
    """`unshare` for a network namespace: as root directly, else inside a user namespace."""
    return ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-r", "-n"]


def why_not() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    for tool in ("unshare", "ip", "jackd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if importlib.util.find_spec("aalink") is None:
        return "aalink is not installed (pip install aalink)"
    probe = subprocess.run([*namespace_command(), "sh", "-c", "ip link set lo up"],
                           capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"cannot make a private network namespace: {probe.stderr.strip()}"
    return None


def test_two_link_peers_in_a_private_network_namespace() -> None:
    reason = why_not()
    if reason:
        pytest.skip(f"Link tests need a private network namespace: {reason}")
    script = ("ip link set lo up && ip route add 224.0.0.0/4 dev lo && "
              f"exec {sys.executable} -m pytest -p no:cacheprovider -q -s -rs {INNER}")
    env = dict(os.environ, CLSM_LINK_NETNS="1")
    done = subprocess.run([*namespace_command(), "sh", "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    print(out)
    passed = re.search(r"(\d+) passed", out)
    assert done.returncode == 0 and passed and int(passed.group(1)) == INNER_TESTS, out[-4000:]
    assert "skipped" not in out, out[-4000:]
