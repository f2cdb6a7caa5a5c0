"""The full-batch likelihood along assisted runs: full batch against the stochastic estimators.

Run:  python workflow/benchmarks/trace_assisted_likelihood.py --config config/quick.yaml \\
          --slice results/assisted/ctr100/slice.npz --system results/assisted/ctr100/system.pt \\
          [--model scnn] [--seed 0] [--epochs 5000] [--estimators full saga none] [--full-on-matrix]
          [--out trace.csv]

Trains the same network from the same start (same seed) with Adam at the configuration's
learning rate and no step decay, once per estimator: ``full`` (``poisson_full``, every event
every epoch), ``saga`` and ``none`` (the ``poisson`` method with that
``assisted.variance_reduction``), and evaluates the full-batch list-mode negative
log-likelihood ``L`` (module doc of :mod:`equipet.assisted.methods`) of the current image at a fixed
set of epochs (epoch 0: the start image, the same for every estimator). Prints one line per
estimator and writes the CSV ``estimator, epoch, full_nll`` (again after each estimator, so a
long trace keeps what it has measured).
Where :mod:`check_assisted_likelihood` compares the end points of two runs, this shows where
along the run they part. No files of a run are written (no checkpoints, no snapshots).
``--full-on-matrix`` computes the full-batch objective (training and evaluation) on the stored
slice matrix instead of the on-the-fly projector: the same ``L`` to float32 rounding
(``tests/test_projector.py``), several times faster on a paper-scale slice.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from equipet.assisted.methods import NonNegativeOutput, build_loss, input_scale, load_system
from equipet.config import load_config
from equipet.device import select_device
from equipet.networks.nets import build_model
from equipet.networks.training import seed_everything

from check_assisted_likelihood import slice_run_parser

TRACE_EPOCHS = (1, 10, 30, 100, 200, 300, 500, 700, 1000, 1500, 2000, 3000, 5000, 10000, 20000)


def main(argv=None) -> int:
    p = slice_run_parser(__doc__.splitlines()[0], epochs=5000)
    p.add_argument("--estimators", nargs="+", default=["full", "saga", "none"], choices=["full", "saga", "none"])
    p.add_argument("--full-on-matrix", action="store_true",
                   help="full batch on the stored matrix (one block, plain gradient) instead of on the fly")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    cfg = load_config(args.config)
    device = select_device(cfg["device"])
    data = dict(np.load(args.slice))
    scale = input_scale(data["early"].astype(np.float32))
    system = load_system(args.system, device)
    if args.full_on_matrix:
        c = copy.deepcopy(cfg)
        c["assisted"].update(subset_events=None, variance_reduction="none")
        on_matrix = build_loss(c, data, scale, device, "poisson", system)
        full, evaluate = on_matrix, on_matrix.full
    else:
        full = evaluate = build_loss(cfg, data, scale, device, "poisson_full")
    net_input = torch.from_numpy(data["early"].astype(np.float32) / scale)[None, None].to(device)
    lr = cfg["assisted"]["learning_rate"] or cfg["training"]["learning_rate"]
    at = sorted({e for e in TRACE_EPOCHS if e < args.epochs} | {args.epochs})
    rows = []
    for estimator in args.estimators:
        if estimator == "full":
            loss = full
        else:
            c = copy.deepcopy(cfg)
            c["assisted"]["variance_reduction"] = estimator
            loss = build_loss(c, data, scale, device, "poisson", system)
        seed_everything(args.seed, cfg["training"]["deterministic"])
        model = NonNegativeOutput(build_model(args.model, cfg["models"])).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        with torch.no_grad():
            rows.append(dict(estimator=estimator, epoch=0, full_nll=float(evaluate(model(net_input)))))
        for epoch in range(1, args.epochs + 1):
            optimizer.zero_grad(set_to_none=True)
            loss(model(net_input)).backward()
            optimizer.step()
            if epoch in at:
                with torch.no_grad():
                    rows.append(dict(estimator=estimator, epoch=epoch, full_nll=float(evaluate(model(net_input)))))
        print(f"{estimator:>5}: " + " ".join(f"{r['epoch']}:{r['full_nll']:.4f}" for r in rows
                                             if r["estimator"] == estimator), flush=True)
        if args.out is not None:
            pd.DataFrame(rows).to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
