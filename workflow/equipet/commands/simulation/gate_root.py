"""Command-line entry points of :mod:`equipet.simulation.gate_root` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from equipet.errors import InputDataError
from equipet.simulation.gate_root import count_coincidences, log, merge_root


def merge_main(argv: Sequence[str] | None = None) -> None:
    """``equipet-merge-root``: merge split jobs' GATE ROOT files; optionally write counts JSON."""
    from equipet.cli import run, setup_logging
    from equipet.files import atomic_path

    def _main(argv: Sequence[str] | None) -> None:
        p = argparse.ArgumentParser(prog="equipet-merge-root", description=merge_main.__doc__)
        p.add_argument("parts", nargs="+", type=Path, help="ROOT files of the split jobs, in job order")
        p.add_argument("--out", type=Path, required=True, help="merged ROOT file")
        p.add_argument("--counts", type=Path, help="write prompts/trues/scatter/randoms as JSON")
        p.add_argument("--log", type=Path)
        args = p.parse_args(argv)
        setup_logging(args.log)
        merge_root(args.parts, args.out)
        if args.counts:
            counts = count_coincidences(args.out)
            log.info("counts: %s", counts)
            with atomic_path(args.counts) as tmp:
                tmp.write_text(json.dumps(counts, indent=1))

    run(_main, argv)


def counts_table_main(argv: Sequence[str] | None = None) -> None:
    """``equipet-counts-table``: one CSV row (trues, scatter, randoms...) per CTR from counts JSONs."""
    from equipet.cli import run, setup_logging
    from equipet.files import atomic_path

    def _main(argv: Sequence[str] | None) -> None:
        p = argparse.ArgumentParser(prog="equipet-counts-table", description=counts_table_main.__doc__)
        p.add_argument("counts", nargs="+", type=Path, help="counts.json files")
        p.add_argument("--ctrs", nargs="+", type=int, required=True, help="CTR (ps) of each file, same order")
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--log", type=Path)
        args = p.parse_args(argv)
        setup_logging(args.log)
        if len(args.ctrs) != len(args.counts):
            raise InputDataError("need one --ctrs value per counts file", where="--ctrs")
        cols = ["ctr_ps", "n_decays", "prompts", "trues", "scatter", "randoms", "scatter_fraction", "random_fraction"]
        lines = [",".join(cols)]
        for ctr, cp in zip(args.ctrs, args.counts):
            try:
                c = json.loads(cp.read_text())
            except (OSError, ValueError) as exc:
                raise InputDataError(f"cannot read counts ({exc})", where=str(cp),
                                     fix="rerun the merge rule that writes it") from exc
            c["ctr_ps"] = ctr
            lines.append(",".join(str(c.get(k, "")) for k in cols))
        with atomic_path(args.out) as tmp:
            tmp.write_text("\n".join(lines) + "\n")

    run(_main, argv)
