"""Training speed of the CNN and the SCNN: epochs per second on the paper's experiments.

Times full training epochs (forward, loss, backward, Adam step) of both networks on a
128 x 128 brain-sized image, for the denoising loss (MSE) and the Radon physics loss
(180 angles), on the CPU and on every CUDA GPU present, and prints:

* epochs/s and s/epoch for each (device, experiment, model);
* the SCNN/CNN time ratio in the same run (the paper reports 106 s vs 104 s);
* the speed-up over the paper's figures (2000 denoising epochs in 106 s for the SCNN,
  5000 reconstruction epochs in 784 s, on a TITAN RTX).

    python workflow/benchmarks/bench_training.py [--size 128] [--epochs 50] [--csv out.csv]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch

from equipet.config import validate
from equipet.networks.nets import build_model, count_parameters
from equipet.brain.radon import RadonTransform
from equipet.networks.training import ForwardModelMSELoss, MSELoss, seconds_per_epoch

PAPER_S_PER_EPOCH = {  # TITAN RTX, from the paper's text
    ("denoise", "cnn"): 104 / 2000, ("denoise", "scnn"): 106 / 2000,
    ("radon_recon", "cnn"): 766 / 5000, ("radon_recon", "scnn"): 784 / 5000,
}


def time_epochs(model_name: str, experiment: str, size: int, epochs: int, device: torch.device) -> tuple[float, int]:
    """Median seconds per training epoch after 5 warm-up epochs, and the parameter count."""
    models_cfg = validate({})["models"]
    torch.manual_seed(0)
    model = build_model(model_name, models_cfg)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 1, size, size), dtype=np.float32))
    if experiment == "denoise":
        loss = MSELoss(image)
    else:
        op = RadonTransform(size, np.linspace(0, 180, 180, endpoint=False))
        with torch.no_grad():
            sino = op.apply(image)
        loss = ForwardModelMSELoss(op, sino)
    return seconds_per_epoch(model, image, loss, device, epochs=epochs, warmup=5), count_parameters(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--csv", default=None)
    args = p.parse_args()
    devices = [torch.device("cpu")] + [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    rows = []
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
        for experiment in ("denoise", "radon_recon"):
            for model in ("cnn", "scnn"):
                s, n_params = time_epochs(model, experiment, args.size, args.epochs, device)
                rows.append({"device": name, "experiment": experiment, "model": model, "parameters": n_params,
                             "s_per_epoch": s, "epochs_per_s": 1 / s,
                             "speedup_vs_paper": PAPER_S_PER_EPOCH[(experiment, model)] / s})
    df = pd.DataFrame(rows)
    ratio = df.pivot_table(index=["device", "experiment"], columns="model", values="s_per_epoch")
    ratio["scnn_over_cnn_time"] = ratio["scnn"] / ratio["cnn"]
    pd.set_option("display.width", 160)
    print(f"image {args.size}x{args.size}, median of {args.epochs} epochs after 5 warm-up epochs")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print()
    print(ratio.to_string(float_format=lambda v: f"{v:.4g}"))
    if args.csv:
        df.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
