"""``equipet-config``: check configuration files and print the config template or reference."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from equipet.cli import run


def config_main(argv: Sequence[str] | None = None) -> None:
    """``equipet-config``: validate config files and print the result, or dump the schema."""
    import yaml

    from equipet.config import TEMPLATE_HEADER, load_config, load_schema, markdown, template

    def _main(argv: Sequence[str] | None) -> None:
        parser = argparse.ArgumentParser(prog="equipet-config", description=config_main.__doc__)
        parser.add_argument("configs", nargs="*", help="config YAML file(s) to validate")
        parser.add_argument("--schema", action="store_true", help="print the assembled JSON schema")
        parser.add_argument("--template", action="store_true",
                            help="print every key with its default and description (config/config.yaml)")
        parser.add_argument("--markdown", action="store_true",
                            help="print the Markdown key reference (config/README.md)")
        args = parser.parse_args(argv)
        if args.markdown:
            print(markdown(), end="")
            return
        if args.schema:
            print(json.dumps(load_schema(), indent=2))
            return
        if args.template:
            print(TEMPLATE_HEADER + template())
            return
        print(yaml.safe_dump(load_config(args.configs), sort_keys=False))

    run(_main, argv)
