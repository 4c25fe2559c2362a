"""The layout rules issue 11 asked for, kept by a test so they do not drift back.

- Production code (daemon/, engine/, training/, the entry points) never imports `tests`: the
  fake engine the timing bench and `--engine fake` use lives in `daemon/fake_engine.py`.
- The docs name no absolute path of one machine: data and the spec are `../shared/...`.
- daemon/ modules stay under about 400 lines.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ("daemon", "engine", "training")
ENTRY_POINTS = ("run_daemon.py",)
# A path that only exists on one machine: a home, a work tree, a mount. System paths such as
# /usr/bin/chromium (the Debian package the browser test uses) are fine.
MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:work|home|root|Users|mnt|srv|scratch|data)/[\w.-]+")
MAX_LINES = 400


def production_files(root: Path) -> list[Path]:
    files = [p for d in PRODUCTION for p in sorted((root / d).rglob("*.py"))]
    return files + [root / name for name in ENTRY_POINTS if (root / name).exists()]


def imports_of(path: Path) -> set[str]:
    """Top-level package of every module `path` imports, at any depth (also inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value.split(".")[0])
    return names


def machine_paths(text: str) -> list[str]:
    return MACHINE_PATH.findall(text)


def test_production_code_never_imports_the_tests() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in production_files(ROOT)
                 if "tests" in imports_of(p)]
    assert offenders == []
    assert "daemon" in imports_of(ROOT / "daemon" / "bench_timing.py")  # the scan sees imports


def test_the_import_scan_finds_every_spelling(tmp_path: Path) -> None:
    for source in ("from tests.fakes import FakeEngine\n", "import tests.fakes\n",
                   "def f():\n    from tests import fakes\n",
                   "import importlib\nimportlib.import_module('tests.fakes')\n"):
        path = tmp_path / "m.py"
        path.write_text(source)
        assert "tests" in imports_of(path), source
    (tmp_path / "m.py").write_text("from .tests import x\nimport testsuite\n")
    assert "tests" not in imports_of(tmp_path / "m.py")


@pytest.mark.parametrize("doc", ["README.md", "models/clsm-default/MODEL.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_docs_name_no_machine_paths(doc: str) -> None:
    """docs/DEVELOPERS.md named the data and the spec by one machine's absolute paths."""
    assert machine_paths((ROOT / doc).read_text(encoding="utf-8")) == []


def test_the_path_check_tells_machine_paths_from_relative_and_system_ones() -> None:
    # made-up paths of other machines (a USB stick, a Mac home), not this one's
    assert machine_paths("data in /mnt/usb/data/pop909 and /Users/me/x") == [
        "/mnt/usb", "/Users/me"]
    assert machine_paths("`../shared/SPEC.md`, /usr/bin/chromium, runs/clsm/ckpt.pt") == []


def test_daemon_modules_stay_under_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "daemon").glob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
