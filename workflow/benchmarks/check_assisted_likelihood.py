"""Check: the stochastic ``poisson`` method reaches the full-batch likelihood from the same start.

Run:  python workflow/benchmarks/check_assisted_likelihood.py --config config/quick.yaml \\
          --slice results/assisted/ctr100/slice.npz --system results/assisted/ctr100/system.pt \\
          [--model scnn] [--seed 0] [--epochs 2000] [--lr-decay 0.5 0.75] [--variance-reduction none]
          [--out-dir /tmp/check]

Trains the same network (same seed, so the same initial weights and hence the same start
image) with ``poisson`` (one random block of about ``assisted.subset_events`` events per
epoch) and with ``poisson_full`` (all events every epoch), both for ``--epochs`` epochs, and
evaluates the full-batch list-mode negative log-likelihood ``L`` (module doc of
:mod:`equipet.assisted.methods`) of the start image and of each final image. It prints
``|L_poisson - L_full| / (L_start - L_full)``, the gap as a fraction of the full-batch
method's total decrease (the acceptance bound is 1%), and exits 1 when it is larger than
``--tolerance``. With ``--equal-passes`` the stochastic method runs ``K`` times the epochs
(``K`` blocks), so that both methods make the same number of passes through the events (the
same projector work); otherwise both run ``--epochs``. ``--lr-decay`` sets ``assisted.lr_decay.at_fraction`` for both methods (the
same step-size schedule; the default keeps the configuration's). ``--variance-reduction`` sets
the stochastic method's gradient estimator (``assisted.variance_reduction``: ``none``, the
plain block gradient, or ``saga``; the default keeps the configuration's).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

from equipet.assisted.methods import NonNegativeOutput, build_loss, input_scale, run_assisted, subset_count
from equipet.config import load_config
from equipet.device import select_device
from equipet.networks.nets import build_model
from equipet.networks.training import predict, seed_everything


def slice_run_parser(description: str, epochs: int) -> argparse.ArgumentParser:
    """The arguments of a run on a stored slice: configuration, slice, its matrix, model, seed, epochs
    (shared with ``trace_assisted_likelihood.py``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", nargs="+", default=["config/quick.yaml"])
    p.add_argument("--slice", type=Path, required=True)
    p.add_argument("--system", type=Path, required=True)
    p.add_argument("--model", default="scnn", choices=["cnn", "scnn"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=epochs)
    return p


def main(argv=None) -> int:
    p = slice_run_parser(__doc__.splitlines()[0], epochs=2000)
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--equal-passes", action="store_true",
                   help="run poisson for K x epochs (K event blocks): the same passes through the events")
    p.add_argument("--lr-decay", type=float, nargs="*", default=None,
                   help="fractions of the epochs after which both methods' step size is multiplied by "
                        "assisted.lr_decay.factor (default: the configuration's)")
    p.add_argument("--variance-reduction", choices=["saga", "none"], default=None,
                   help="the poisson method's gradient estimator (default: the configuration's)")
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/check_assisted_likelihood"))
    args = p.parse_args(argv)

    cfg = load_config(args.config)
    cfg["assisted"]["early_stop"]["enabled"] = False
    if args.variance_reduction is not None:
        cfg["assisted"]["variance_reduction"] = args.variance_reduction
    if args.lr_decay is not None:
        cfg["assisted"]["lr_decay"]["at_fraction"] = list(args.lr_decay)
    device = select_device(cfg["device"])
    data = dict(np.load(args.slice))
    scale = input_scale(data["early"].astype(np.float32))
    full = build_loss(cfg, data, scale, device, "poisson_full")
    seed_everything(args.seed, cfg["training"]["deterministic"])
    start_model = NonNegativeOutput(build_model(args.model, cfg["models"])).to(device)
    net_input = torch.from_numpy(data["early"].astype(np.float32) / scale)[None, None].to(device)
    with torch.no_grad():
        l_start = float(full(predict(start_model, net_input)))
    finals = {}
    k_blocks = subset_count(len(data["tof"]), cfg["assisted"]["subset_events"])
    epochs = {"poisson": args.epochs * (k_blocks if args.equal_passes else 1), "poisson_full": args.epochs}
    for method in ("poisson", "poisson_full"):
        out = args.out_dir / method
        c = copy.deepcopy(cfg)
        c["assisted"].update(epochs=epochs[method], snapshots=[epochs[method]])
        run_assisted(c, args.slice, method, args.model, args.seed, out, args.system)
        finals[method] = json.loads((out / "summary.json").read_text())["full_nll"]
    decrease = l_start - finals["poisson_full"]
    gap = abs(finals["poisson"] - finals["poisson_full"]) / decrease if decrease > 0 else float("inf")
    print(f"{args.model}, seed {args.seed}, {len(data['tof'])} events; poisson_full {epochs['poisson_full']} "
          f"epochs, poisson {epochs['poisson']} epochs ({k_blocks} blocks of ~{cfg['assisted']['subset_events']} "
          f"events, {epochs['poisson'] / k_blocks:g} passes, gradient estimator "
          f"{cfg['assisted']['variance_reduction']}); step decay x"
          f"{cfg['assisted']['lr_decay']['factor']} after {cfg['assisted']['lr_decay']['at_fraction']} of the epochs")
    print(f"L(start) = {l_start:.6f}; L(poisson_full) = {finals['poisson_full']:.6f}; "
          f"L(poisson) = {finals['poisson']:.6f}")
    print(f"gap / total decrease = {gap:.4f} (tolerance {args.tolerance})")
    return 0 if gap <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
