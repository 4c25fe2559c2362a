"""Issue 15 defect 8: a model folder whose manifest lies or reaches outside the folder gives one
clear EngineError line, never a part loaded unhashed or a TorchScript traceback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.runtime import Engine, EngineError


def edited(folder: Path, tmp: Path, edit: Callable[[dict, Path], None]) -> Path:
    out = tmp / "model"
    shutil.copytree(folder, out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest, out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def outside_part(m: dict, out: Path) -> None:
    stray = out.parent / "stray.pt"  # a real, loadable part, but outside and never hashed
    shutil.copy(out / m["parts"]["latent"], stray)
    m["parts"]["latent"] = str(stray)


def dotdot_part(m: dict, out: Path) -> None:
    shutil.copy(out / m["parts"]["decoder"], out.parent / "dec.pt")
    m["parts"]["decoder"] = "../dec.pt"


def unlisted_part(m: dict, out: Path) -> None:
    shutil.copy(out / m["parts"]["decoder"], out / "other.pt")
    m["parts"]["decoder"] = "other.pt"


def dotdot_file(m: dict, out: Path) -> None:
    shutil.copy(out / "manifest.json", out.parent / "x.json")
    m["files"]["../x.json"] = {"sha256": "0" * 64}


def swapped(m: dict, out: Path) -> None:
    m["parts"]["latent"], m["parts"]["decoder"] = m["parts"]["decoder"], m["parts"]["latent"]


def wrong_d_z(m: dict, out: Path) -> None:
    m["model_args"]["d_z"] = m["model_args"]["d_z"] + 3


def wrong_n_out(m: dict, out: Path) -> None:
    m["model_args"]["n_out"] = 7


@pytest.mark.parametrize(("edit", "words"), [
    (outside_part, "inside the model folder"),
    (dotdot_part, "inside the model folder"),
    (unlisted_part, "not listed"),
    (dotdot_file, "inside the model folder"),
    (swapped, "does not match its manifest"),
    (wrong_d_z, "does not match its manifest"),
    (wrong_n_out, "does not match its manifest"),
])
def test_lying_manifest_is_one_clear_line(folder: Path, tmp_path: Path, edit, words: str) -> None:
    path = edited(folder, tmp_path, edit)
    with pytest.raises(EngineError) as info:
        Engine.load(path)
    text = str(info.value)
    assert words in text and "\n" not in text and len(text) < 400, text
    assert "re-export" in text


def test_the_untouched_folder_still_loads(folder: Path) -> None:
    Engine.load(folder, warm=False)
