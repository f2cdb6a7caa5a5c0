"""Shared fixtures: the repository root and the validated configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
# What a workflow run needs from the checkout (results/ and resources/ are made fresh).
CHECKOUT_PARTS = ["Snakefile", "workflow", "config", "envs"]


def copy_checkout(dst: Path) -> Path:
    """Copy the workflow into ``dst`` so that test runs never touch the developer's results/.

    ``workflow/benchmarks/measured/`` (the committed tables and the ablation's archived runs,
    megabytes that grow with the study) is left out: no run reads it."""
    for name in CHECKOUT_PARTS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "measured"))
        else:
            shutil.copy2(src, dst / name)
    return dst


def pinned_env(env: dict, workdir: Path) -> dict:
    """``env`` with the copy's equipet package (``workdir/workflow``) first on PYTHONPATH.

    The venv holds an editable install of the checkout, which may change while the tests
    run; every run in a copy (and every SLURM job, via sbatch --export=ALL) uses the code of
    that copy, so runs made at different times compare the same code.
    """
    path = [str(workdir / "workflow"), *filter(None, [env.get("PYTHONPATH")])]
    return dict(env, PYTHONPATH=os.pathsep.join(path))


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> dict:
    """The whole workflow with config/quick.yaml, run once per test session on 2 cores.

    It runs in a copy of the checkout, with that copy's equipet package first on the path,
    so that it runs the code the copy holds even while the checkout is being edited. The
    workflow test checks its outputs; the SLURM test compares its cluster runs against it.
    Returns the copy (``workdir``), its ``results`` and the run's ``wall`` time in seconds.
    """
    workdir = copy_checkout(tmp_path_factory.mktemp("quick_run"))
    (workdir / "results").mkdir()
    env = pinned_env(dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1",
                          PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])),
                     workdir)
    log = workdir / "snakemake.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile",
                               "config/quick.yaml"], cwd=workdir, env=env, stdout=out,
                              stderr=subprocess.STDOUT, text=True, timeout=1800)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, f"the quick run failed ({log}):\n" + log.read_text()[-6000:]
    print(f"\nquick config, local run (--cores 2): {wall:.0f} s")
    return {"workdir": workdir, "results": workdir / "results", "wall": wall}


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


def crystal_box(scanner, rsector, module, crystal, layer, points_mm):
    """Whether each point lies in the crystal (DOI layer) its IDs name, and that crystal's centre.

    Computed from the scanner's numbers and GATE's ID convention alone (scanner.py module
    doc), not through :class:`equipet.simulation.scanner.Scanner`'s own geometry methods, so that tests
    of ``locate`` and ``crystal_centres_mm`` do not check the code with itself. Inner radius:
    the inner corners of neighbouring modules meet, ``R = (n_y p / 2) / tan(pi / n_modules)``.
    Returns ``(inside (N,), centre (N, 3) mm)``; ``inside`` allows 1 um of rounding.
    """
    import math

    import numpy as np

    p = scanner.pixel_size_mm + scanner.pixel_gap_mm
    ny, nz, n = scanner.pixels_transaxial, scanner.pixels_axial, scanner.modules_per_ring
    R = scanner.inner_radius_mm if scanner.inner_radius_mm is not None else ny * p / 2 / math.tan(math.pi / n)
    d = scanner.crystal_thickness_mm / scanner.doi_layers
    k, m, c, l = (np.asarray(a, dtype=np.int64) for a in (rsector, module, crystal, layer))
    iy, iz = c % ny, c // ny
    phi = 2 * math.pi * k / n
    x, y, z = (np.asarray(points_mm, dtype=np.float64)[:, a] for a in range(3))
    radial = x * np.cos(phi) + y * np.sin(phi)
    trans = -x * np.sin(phi) + y * np.cos(phi)
    r_lo = R + l * d
    t_lo = (iy - ny / 2) * p + scanner.pixel_gap_mm / 2
    z_lo = -scanner.rings * nz * p / 2 + m * nz * p + iz * p + scanner.pixel_gap_mm / 2
    s = scanner.pixel_size_mm
    eps = 1e-3
    inside = ((radial >= r_lo - eps) & (radial <= r_lo + d + eps) & (trans >= t_lo - eps) & (trans <= t_lo + s + eps)
              & (z >= z_lo - eps) & (z <= z_lo + s + eps)
              & (k >= 0) & (k < n) & (m >= 0) & (m < scanner.rings) & (iy >= 0) & (iz < nz) & (l >= 0)
              & (l < scanner.doi_layers))
    rc, tc = r_lo + d / 2, t_lo + s / 2
    centre = np.stack([rc * np.cos(phi) - tc * np.sin(phi), rc * np.sin(phi) + tc * np.cos(phi), z_lo + s / 2], 1)
    return inside, centre
