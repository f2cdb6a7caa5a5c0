"""equipet: equivariant-network-assisted list-mode TOF PET reconstruction.

One module per concept; each pipeline stage has a command-line entry point
(see ``pyproject.toml``) that a Snakemake rule calls and a person can run by hand.
"""

__version__ = "0.1.0"
