"""``python -m snakemake`` for the SLURM tests, with the SLURM executor polling at the set interval.

The SLURM executor plugin lengthens its wait between status checks by 10 s after each check in
which no job finished (up to 180 s), to spare a shared controller. On the one-node test cluster
that back-off is only idle time: a job that finishes a few seconds after a check is noticed up to
half a minute later, and the tests' runs wait on one job after another. Here every wait is
``--seconds-between-status-checks``; submission, the jobs and their outputs are unchanged, and the
jobs SLURM runs start the plain ``snakemake`` of the venv.
"""

from __future__ import annotations

from snakemake_executor_plugin_slurm import Executor
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor


def _interval(self) -> float:
    return self.workflow.remote_execution_settings.seconds_between_status_checks


# The plugin sets the attribute after each round of checks; the setter keeps the interval fixed.
assert isinstance(RemoteExecutor.__dict__.get("next_seconds_between_status_checks"), property), (
    "the executor interface no longer has the next_seconds_between_status_checks property this "
    "test helper overrides")
Executor.next_seconds_between_status_checks = property(_interval, lambda self, value: None)

if __name__ == "__main__":
    from snakemake.cli import main

    main()
