"""Choosing the compute device, once, from the ``device`` config key."""

from __future__ import annotations

import torch

from equipet.errors import DeviceError


def select_device(request: str = "auto") -> torch.device:
    """Return the torch device for ``request`` (``auto``, ``cpu`` or ``cuda[:N]``).

    ``auto`` takes the first CUDA GPU when one is present, else the CPU.
    An explicit ``cuda`` request without a GPU is an error, not a silent fallback,
    so that a cluster job that lost its GPU does not run 100x slower unnoticed.
    """
    if request == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if request == "cpu":
        return torch.device("cpu")
    if request.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device '{request}' was requested but torch sees no CUDA GPU "
                f"(torch {torch.__version__}, cuda build: {torch.version.cuda})",
                where="config: device",
                fix="set device: auto (GPU when present, else CPU) or device: cpu, "
                "or run on a node with a GPU and a CUDA build of torch",
            )
        return torch.device(request)
    raise DeviceError(
        f"unknown device '{request}'",
        where="config: device",
        fix="use one of: auto, cpu, cuda, cuda:N",
    )
