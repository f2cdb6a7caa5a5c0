"""Shared fixtures: the repository root and the validated configs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
# What a workflow run needs from the checkout (results/ and resources/ are made fresh).
CHECKOUT_PARTS = ["Snakefile", "workflow", "config", "envs"]


def copy_checkout(dst: Path) -> Path:
    """Copy the workflow into ``dst`` so that test runs never touch the developer's results/."""
    for name in CHECKOUT_PARTS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst / name)
    return dst


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
