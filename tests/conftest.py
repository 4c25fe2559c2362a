"""Fixtures shared across test modules."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests use one torch thread: the suite shares 2 cores and must stay deterministic."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny exported model folder (TorchScript parts + eager weights + manifest)."""
    from tests.test_export import export_tiny

    out = tmp_path_factory.mktemp("models") / "tiny"
    export_tiny(out)
    return out
