"""Conventions shared by every stage's command-line entry point.

A rule passes the (already validated) config sections a stage needs as one JSON
object with ``--settings '<json>'`` or ``--settings @file.json``; inputs and
outputs are explicit paths. A stage run by hand takes the same arguments, or
``--config config/quick.yaml`` to read and validate a config file itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from equipet.errors import ConfigError, EquipetError

log = logging.getLogger("equipet")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--settings``, ``--config`` and ``--log`` to a stage's parser."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--settings", help="validated config as JSON, or @path/to/file.json")
    src.add_argument(
        "--config", nargs="+", metavar="YAML",
        help="config file(s) to read and validate (later files override earlier ones)",
    )
    parser.add_argument("--log", type=Path, help="also append the log to this file")


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Return the full validated config from ``--settings`` or ``--config``."""
    if args.config:
        from equipet.config import load_config

        return load_config(args.config)
    text = args.settings
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read settings file: {exc}", where=str(path)) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--settings is not valid JSON ({exc})",
            fix="pass the config as a JSON object, or use --config config/quick.yaml",
        ) from exc


def setup_logging(log_file: Path | None = None) -> None:
    """Log to stderr, and to ``log_file`` too when given (Snakemake's ``log:``)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def run(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a stage's ``main``; turn user-fixable errors into a message and exit status 2."""
    try:
        main(argv)
    except EquipetError as exc:
        log.error("%s", exc)
        if not _logs_to_stderr():
            print(f"equipet: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception:
        if any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers):
            log.exception("unexpected error (a bug: please report it with this log)")
        raise


def _logs_to_stderr() -> bool:
    return any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr
               for h in logging.getLogger().handlers)
