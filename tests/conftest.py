"""Shared fixtures: a clean gin state for every test and a per-test scratch folder."""

from __future__ import annotations

from pathlib import Path

import gin
import pytest
import torch


@pytest.fixture(autouse=True)
def clear_gin():
    """Bindings parsed by one test must never leak into the next (docs/configuration.md, "Conventions")."""
    yield
    gin.clear_config()


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    """The test machines have 2 cores shared with other work: keep torch from oversubscribing."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    """An empty folder, removed by pytest later; tests write their tiny datasets and caches here."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder
