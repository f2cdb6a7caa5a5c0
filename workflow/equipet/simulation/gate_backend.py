"""Running real GATE 9.3+ on the macros of :mod:`equipet.simulation.gate_macros` (the ``gate`` backend).

GATE cannot run in this project's test environment (it needs Geant4 data and, for GATE 10,
internet), so the backend is opt-in: set ``acquisition.backend: gate`` and either put ``Gate``
on PATH (``acquisition.gate.executable``) or name a container image
(``acquisition.gate.container``, e.g. ``opengatecollaboration/gate:9.4-docker``; the official
images' entry point sets up Geant4 and runs ``Gate`` with the arguments, in ``/APP``; with
apptainer/singularity the ``executable`` is run inside the image).

Each split job copies the macro directory to a private work directory next to its output,
runs ``Gate jobNNN.mac`` there and gets ``part_NNN.root``, which is validated (Coincidences
tree present) and moved to the rule's output; the work directory is then removed.
``GateMaterials.db`` must be in the macro directory unless ``acquisition.gate.material_database``
names it. The
split jobs are merged exactly as for the builtin backend (:func:`equipet.simulation.gate_root.merge_root`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from equipet.errors import ConfigError, InputDataError
from equipet.simulation.gate_macros import job_macro_name, job_output_name

log = logging.getLogger("equipet.simulation.gate_backend")

CONTAINER_WORKDIR = "/APP"


def gate_command(gate: Mapping[str, Any], macro_dir: str | Path, macro: str) -> list[str]:
    """The command line that runs ``macro`` with GATE, to be executed with cwd = ``macro_dir``.

    >>> gate_command({"executable": "Gate", "container": None, "extra_args": []}, "/m", "job000.mac")
    ['Gate', 'job000.mac']
    >>> gate_command({"executable": "Gate", "container": "opengatecollaboration/gate:9.4-docker",
    ...               "container_engine": "docker", "extra_args": []}, "/m", "main.mac")[:6]
    ['docker', 'run', '--rm', '-v', '/m:/APP', '-w']
    """
    extra = [str(a) for a in gate.get("extra_args", [])]
    image = gate.get("container")
    exe = gate.get("executable", "Gate")
    if not image:
        return [exe, *extra, macro]
    mdir = str(Path(macro_dir).resolve()) if not str(macro_dir).startswith("/") else str(macro_dir)
    engine = gate.get("container_engine", "docker")
    if engine in ("docker", "podman"):
        # the official images' entry point sets up Geant4 and runs Gate with the arguments
        return [engine, "run", "--rm", "-v", f"{mdir}:{CONTAINER_WORKDIR}", "-w", CONTAINER_WORKDIR,
                image, *extra, macro]
    if engine in ("apptainer", "singularity"):
        return [engine, "exec", "--bind", f"{mdir}:{CONTAINER_WORKDIR}", "--pwd", CONTAINER_WORKDIR,
                image, exe, *extra, macro]
    raise ConfigError(f"unknown container engine '{engine}'", where="acquisition.gate.container_engine",
                      fix="use docker, podman, apptainer or singularity")


def check_available(gate: Mapping[str, Any]) -> None:
    """Raise a clear error when the program the command starts is not on PATH."""
    prog = gate.get("container_engine", "docker") if gate.get("container") else gate.get("executable", "Gate")
    if shutil.which(prog) is None:
        key = "container_engine" if gate.get("container") else "executable"
        raise ConfigError(
            f"'{prog}' is not on PATH, so the gate backend cannot run",
            where=f"acquisition.gate.{key}",
            fix="install GATE 9.3+ (Gate on PATH), or set acquisition.gate.container to a GATE image, "
                "or use the embedded simulator: acquisition.backend: builtin",
        )


def run_gate_job(gate: Mapping[str, Any], macro_dir: str | Path, job: int, out: str | Path,
                 log_file: str | Path | None = None, dry_run: bool = False) -> list[str]:
    """Run split job ``job``; move its ROOT file to ``out``. Returns the command."""
    macro_dir = Path(macro_dir)
    macro = job_macro_name(job)
    if not (macro_dir / macro).exists():
        raise InputDataError(f"macro {macro} not found", where=str(macro_dir),
                             fix="write the macros first (equipet-gate-macros) with the same acquisition.n_jobs")
    out = Path(out)
    # run in a private copy of the macros: jobs run in parallel and the macro directory (another
    # rule's output) stays untouched
    work = out.parent / f".{out.stem}_gate_work"
    cmd = gate_command(gate, work.resolve(), macro)
    log.info("running in %s (copy of %s): %s", work, macro_dir, " ".join(cmd))
    if dry_run:
        return cmd
    check_available(gate)
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(macro_dir, work)
    produced = work / f"{job_output_name(job)}.root"
    try:
        with open(log_file or os.devnull, "a") as lf:
            proc = subprocess.run(cmd, cwd=work, stdout=lf, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise InputDataError(f"Gate exited with status {proc.returncode}", where=str(macro_dir / macro),
                                 fix=f"read the Gate output in {log_file or 'the log'}")
        if not produced.exists():
            raise InputDataError(f"Gate finished but wrote no {produced.name}", where=str(macro_dir / macro),
                                 fix="check /gate/output/root/setFileName and setRootCoincidencesFlag 1")
        from equipet.simulation.gate_root import coincidence_entries

        n = coincidence_entries(produced)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(produced), str(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("job %d: %d coincidences -> %s", job, n, out)
    return cmd
