"""`pip install .` (NOT editable) into a fresh venv: console scripts, packaged defaults, model.

The venv is new and empty except for one `.pth` line that puts the project venv's
site-packages after its own: the dependencies (torch==2.13.0 among them: never let pip
resolve an open `torch`, it pulls a multi-GB CUDA build) come from there, and `pip install
--no-deps` builds and installs this project as a wheel. The source is copied first, so the
in-tree build leaves nothing in the working tree. Commands run from an empty directory: what
they find, they find in the installed package.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

import pytest

from tests.jack_server import jack_server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("clsm-daemon", "clsm-train", "clsm-evaluate", "clsm-export")
SOURCES = ("pyproject.toml", "README.md", "daemon", "engine", "training", "configs")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    env = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)
    py = env / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], check=True, capture_output=True, text=True)
    (Path(purelib.stdout.strip()) / "clsm-deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", str(src)],
                   check=True, timeout=300)
    shutil.rmtree(src)  # nothing may come from the source any more
    return env


def run(venv: Path, *cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / cmd[0]), *cmd[1:]], capture_output=True,
                          text=True, timeout=120, cwd=venv.parent, **kw)


def test_every_console_script_answers_help(venv: Path) -> None:
    for script in SCRIPTS:
        done = run(venv, script, "--help")
        assert done.returncode == 0, f"{script}: {done.stderr[-2000:]}"
        assert "usage:" in done.stdout, script


def test_the_installed_package_has_its_default_config(venv: Path) -> None:
    done = run(venv, "python", "-c", "import daemon, daemon.config as c; c.load_config(); "
               "print(daemon.__file__); print(c.DEFAULT_PATH)")
    assert done.returncode == 0, done.stderr
    package, default = done.stdout.split()
    assert package.startswith(str(venv)) and default.startswith(str(venv))
    assert not Path(default).is_symlink()
    installed = tomllib.loads(Path(default).read_text())
    assert installed == tomllib.loads((ROOT / "configs" / "default.toml").read_text())


def test_without_a_model_the_daemon_says_how_to_get_one(venv: Path) -> None:
    done = run(venv, "clsm-daemon", "--midi-api", "jack")
    assert done.returncode == 2, done.stderr
    assert "--model DIR" in done.stderr and "ships no model" in done.stderr, done.stderr


@pytest.mark.jack
def test_the_installed_daemon_runs(venv: Path, jack_server) -> None:  # noqa: F811
    """With --engine fake (no model) to "ready:", then SIGTERM ends it cleanly."""
    proc = subprocess.Popen([str(venv / "bin" / "clsm-daemon"), "--midi-api", "jack",
                             "--engine", "fake", "--port-name", f"inst{os.getpid()}"],
                            cwd=venv.parent, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        end = time.monotonic() + 60
        for line in proc.stderr:
            lines.append(line)
            if "ready:" in line or time.monotonic() > end:
                break
        assert any("ready:" in line for line in lines), "".join(lines[-20:])
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(15)
    assert rc == 0, "".join(lines[-20:])
