"""The command-line entry points (argparse) of equipet, one module per library module."""
