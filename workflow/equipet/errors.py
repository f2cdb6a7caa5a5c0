"""Errors that reach the user.

Every error raised on bad input says *what* is wrong (the file and the field),
and *how to fix it*. Command-line entry points turn them into a one-paragraph
message and exit status 2 instead of a traceback (see :mod:`equipet.cli`).
"""

from __future__ import annotations


class EquipetError(Exception):
    """Base class for errors caused by input the user can fix.

    Parameters
    ----------
    message:
        What is wrong.
    where:
        The file (and field) concerned, e.g. ``"config/quick.yaml: denoise.epochs"``.
    fix:
        What the user should do about it.
    """

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.message = message
        self.where = where
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = []
        if self.where:
            parts.append(f"{self.where}: ")
        parts.append(self.message)
        if self.fix:
            parts.append(f"\n  fix: {self.fix}")
        return "".join(parts)


class ConfigError(EquipetError):
    """A configuration file or value is invalid."""


class InputDataError(EquipetError):
    """An input data file (ROOT, NIfTI, image, checkpoint) is missing, truncated or malformed."""


class TrainingDivergedError(EquipetError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""


class DeviceError(EquipetError):
    """The requested compute device is not available."""
