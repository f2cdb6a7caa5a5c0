"""Shared fixtures: the repository root and the validated configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def quick_config() -> dict:
    from equipet.config import load_config

    return load_config([REPO / "config" / "config.yaml", REPO / "config" / "quick.yaml"])


@pytest.fixture(scope="session")
def paper_config() -> dict:
    from equipet.config import load_config

    return load_config(REPO / "config" / "config.yaml")
