"""Command-line entry points of :mod:`equipet.study.ablation` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from equipet import cli
from equipet.errors import ConfigError
from equipet.files import atomic_path
from equipet.study.ablation import (
    EXPERIMENTS,
    collect,
    configuration,
    log,
    loss_envelope_figure,
    quality_figure,
    select,
    summary_table,
    train_run,
)


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-ablation``: train one ablation run, select the screen's best, or summarise."""
    cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> None:
    p = argparse.ArgumentParser(prog="equipet-ablation", description=main.__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="one grid or confirmation run")
    cli.add_common_arguments(t)
    t.add_argument("--brain", type=Path, required=True)
    t.add_argument("--experiment", choices=EXPERIMENTS, required=True)
    t.add_argument("--seed", type=int, required=True)
    t.add_argument("--out-dir", type=Path, required=True)
    which = t.add_mutually_exclusive_group(required=True)
    which.add_argument("--configuration", help="grid run: the configuration's name")
    which.add_argument("--selection", type=Path, help="confirmation run: selection.json of the screen")
    t.add_argument("--model", choices=["scnn", "cnn"], help="with --selection: which selected network")
    s = sub.add_parser("select", help="best paper-consistent SCNN and CNN of the screen")
    s.add_argument("--log", type=Path)
    s.add_argument("--runs", type=Path, nargs="+", required=True, help="screen run directories")
    s.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("summarise", help="ablation.csv, the tidy metrics and the two figures")
    cli.add_common_arguments(m)
    m.add_argument("--runs", type=Path, nargs="+", required=True, help="grid and confirmation run directories")
    m.add_argument("--table", type=Path, required=True)
    m.add_argument("--metrics", type=Path, required=True)
    m.add_argument("--loss-figure", type=Path, required=True)
    m.add_argument("--quality-figure", type=Path, required=True)
    args = p.parse_args(argv)
    cli.setup_logging(args.log)
    if args.what == "train":
        cfg = cli.settings_from_args(args)
        if args.selection is not None:
            if args.model is None:
                raise ConfigError("--selection needs --model scnn or --model cnn", where="equipet-ablation train")
            chosen = json.loads(args.selection.read_text())[args.model]["configuration"]
            conf, stage = configuration(cfg, chosen), "confirm"
        else:
            conf, stage = configuration(cfg, args.configuration), "grid"
        train_run(cfg, args.brain, conf, args.experiment, args.seed, args.out_dir, stage)
    elif args.what == "select":
        chosen = select(args.runs)
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(chosen, indent=2) + "\n")
        log.info("screen: best paper-consistent SCNN %s (PSNR %.2f dB), CNN %s (PSNR %.2f dB)",
                 chosen["scnn"]["configuration"], chosen["scnn"]["psnr"],
                 chosen["cnn"]["configuration"], chosen["cnn"]["psnr"])
    else:
        cfg = cli.settings_from_args(args)
        metrics, losses, runs = collect(args.runs, int(cfg["assisted"]["plateau"]["window"]))
        with atomic_path(args.metrics) as tmp:
            metrics.to_csv(tmp, index=False)
        table = summary_table(runs)
        with atomic_path(args.table) as tmp:
            table.to_csv(tmp, index=False)
        loss_envelope_figure(losses, args.loss_figure)
        quality_figure(runs, args.quality_figure)
        log.info("ablation summary of %d runs:\n%s", len(runs),
                 table[["stage", "experiment", "configuration", "n_seeds", "psnr_train_mean", "psnr_heldout_mean",
                        "loss_instability_mean"]].to_string(index=False))
