"""Loading and validating the workflow configuration.

The schema lives in ``config/schema/``, one YAML file per top-level section
(``<section>.schema.yaml``); :func:`load_schema` assembles them into one JSON
schema. The schema is the single source of defaults: :func:`validate` fills every
missing key from it, so the code never carries defaults of its own.

Errors name the file, the dotted key and the fix, e.g.::

    config/quick.yaml: denoise.epochs: -3 is less than the minimum of 1
      fix: number of training epochs (integer >= 1)
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from equipet.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO_ROOT / "config" / "schema"


def load_schema(schema_dir: str | Path = SCHEMA_DIR) -> dict[str, Any]:
    """Assemble the per-section schema files into one JSON schema (a dict)."""
    schema_dir = Path(schema_dir)
    files = sorted(schema_dir.glob("*.schema.yaml"))
    if not files:
        raise ConfigError("no *.schema.yaml files found", where=str(schema_dir),
                          fix="run from an equipet checkout, or pass schema_dir")
    properties: dict[str, Any] = {}
    for f in files:
        part = yaml.safe_load(f.read_text())
        if f.name == "top.schema.yaml":
            properties.update(part["properties"])
        else:
            properties[f.name.removesuffix(".schema.yaml")] = part
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "equipet workflow configuration",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }


def _fill_defaults(instance: Any, schema: Mapping[str, Any]) -> None:
    """Insert schema defaults for missing keys, recursively (objects create their sub-defaults)."""
    if not isinstance(instance, dict) or schema.get("type") != "object":
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in instance:
            if "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            elif sub.get("type") == "object":
                instance[key] = {}
        if key in instance:
            _fill_defaults(instance[key], sub)


def _describe(error: jsonschema.ValidationError, schema: Mapping[str, Any]) -> tuple[str, str | None]:
    path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    sub = schema
    for p in error.absolute_path:
        if isinstance(p, int):
            sub = sub.get("items", {})
        else:
            sub = sub.get("properties", {}).get(p, {})
    fix = sub.get("description")
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        fix = f"remove or correct the key; allowed keys here: {', '.join(allowed)}"
    return path, fix


def validate(config: dict[str, Any], source: str = "config", schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fill defaults into ``config`` in place and validate it; return it.

    Raises :class:`ConfigError` naming ``source``, the key and the fix for the
    first problem found (all problems are listed in the message).
    """
    schema = load_schema() if schema is None else schema
    _fill_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = []
        first_fix = None
        for err in errors:
            path, fix = _describe(err, schema)
            lines.append(f"{path}: {err.message}")
            first_fix = first_fix or fix
        raise ConfigError("; ".join(lines), where=source, fix=first_fix)
    _check_consistency(config, source)
    return config


def _check_consistency(config: Mapping[str, Any], source: str) -> None:
    """Cross-key rules that a JSON schema cannot express."""
    for section in ("denoise", "radon_recon"):
        sec = config.get(section)
        if not sec:
            continue
        bad = [s for s in sec["snapshots"] if s > sec["epochs"]]
        if bad:
            raise ConfigError(
                f"snapshot epochs {bad} exceed epochs={sec['epochs']}",
                where=f"{source}: {section}.snapshots",
                fix=f"keep every snapshot <= {section}.epochs",
            )


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into ``base`` recursively (like Snakemake's --configfile)."""
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML config file; a syntax error names the file and line."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", where=str(path),
                          fix="check the path passed with --configfile/--config") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", where=str(path),
                          fix="correct the YAML syntax at the line shown") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of section names to settings",
                          where=str(path))
    return data


def load_config(paths: str | Path | Iterable[str | Path]) -> dict[str, Any]:
    """Read, merge (later files win), fill defaults and validate config file(s)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    config: dict[str, Any] = {}
    for p in paths:
        deep_merge(config, read_yaml(p))
    return validate(config, source=" + ".join(map(str, paths)))


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-config``: validate config files and print the result, or dump the schema."""
    from equipet.cli import run

    def _main(argv: Sequence[str] | None) -> None:
        parser = argparse.ArgumentParser(prog="equipet-config", description=main.__doc__)
        parser.add_argument("configs", nargs="*", help="config YAML file(s) to validate")
        parser.add_argument("--schema", action="store_true", help="print the assembled JSON schema")
        args = parser.parse_args(argv)
        if args.schema:
            print(json.dumps(load_schema(), indent=2))
            return
        print(yaml.safe_dump(load_config(args.configs), sort_keys=False))

    run(_main, argv)
