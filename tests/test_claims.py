"""Paper claims: verdicts follow the rules, flip with the data, and refuse what is not comparable."""

import numpy as np
import pandas as pd
import pytest

from equipet.claims import NOT_COMPARABLE, NOT_REPRODUCED, REPRODUCED, Run, paper_claims, smallest_resolved

PLATEAU = {"window": 10, "tolerance": 0.05}
RODS = [6.5, 5.5, 4.5, 3.5, 2.2, 1.6]


def curve(epochs, start, floor, tau):
    k = np.arange(1, epochs + 1)
    return floor + (start - floor) * np.exp(-k / tau)


def run(experiment, model, seed, losses, total_s, device="cuda", ctr=None):
    return Run(experiment, model, seed, ctr, np.asarray(losses, float),
               np.linspace(total_s / len(losses), total_s, len(losses)), device)


def brain_runs(scnn_fast=True, epochs=(2000, 5000), device="cuda"):
    runs = []
    for seed in (0, 1):
        fast, slow = (curve(epochs[0], 1.0, 0.001, 100), curve(epochs[0], 1.0, 0.01, 800))
        runs += [run("denoise", "scnn", seed, fast if scnn_fast else slow, 106, device),
                 run("denoise", "cnn", seed, slow if scnn_fast else fast, 104, device)]
        fast, slow = (curve(epochs[1], 1.0, 0.015, 60), curve(epochs[1], 1.0, 0.14, 1500))
        runs += [run("radon_recon", "scnn", seed, fast if scnn_fast else slow, 784, device),
                 run("radon_recon", "cnn", seed, slow if scnn_fast else fast, 766, device)]
    return runs


def assisted(scnn_smallest=3.5, cnn_smallest=5.5, epochs=60000, device="cuda", scnn_tau=150.0):
    rows, runs = [], []
    for seed in (0, 1):
        for model, smallest, tau, total in (("scnn", scnn_smallest, scnn_tau, 870), ("cnn", cnn_smallest, 5000, 821)):
            for d in RODS:
                rows.append({"experiment": "assisted", "model": model, "seed": seed, "epoch": epochs,
                             "metric": "resolved", "value": float(d >= smallest), "ctr_ps": 100.0,
                             "rod_mm": d, "split": "train"})
            runs.append(run("assisted", model, seed, curve(epochs, 10.0, 1.0, tau), total, device, 100.0))
    return pd.DataFrame(rows), runs


def verdicts(table):
    return dict(zip(table["claim_id"], table["verdict"]))


def test_all_claims_reproduced_on_matching_synthetic_data():
    metrics, runs = assisted()
    v = verdicts(paper_claims(metrics, brain_runs() + runs, PLATEAU))
    for claim in ("denoise_scnn1000_vs_cnn2000", "radon_min_loss_ratio", "radon_scnn500_vs_cnn_min",
                  "radon_speedup_epochs", "radon_speedup_time", "assisted_scnn_smallest_resolved",
                  "assisted_cnn_smallest_resolved", "assisted_scnn_plateau_epoch", "denoise_time_scnn",
                  "radon_recon_time_ratio_scnn_cnn", "assisted_time_scnn", "assisted_time_ratio_scnn_cnn"):
        assert v[claim] == REPRODUCED, claim
    # absolute loss values are never comparable (unknown normalisation)
    assert v["radon_min_loss_scnn"] == NOT_COMPARABLE and v["radon_min_loss_cnn"] == NOT_COMPARABLE


def test_verdicts_flip_when_the_data_contradict_the_claims():
    metrics, runs = assisted(scnn_smallest=6.5, cnn_smallest=3.5, scnn_tau=3000.0)
    table = paper_claims(metrics, brain_runs(scnn_fast=False) + runs, PLATEAU)
    v = verdicts(table)
    for claim in ("denoise_scnn1000_vs_cnn2000", "radon_min_loss_ratio", "radon_scnn500_vs_cnn_min",
                  "radon_speedup_epochs", "assisted_scnn_smallest_resolved", "assisted_cnn_smallest_resolved",
                  "assisted_scnn_plateau_epoch"):
        assert v[claim] == NOT_REPRODUCED, claim
    row = table.set_index("claim_id").loc["assisted_scnn_smallest_resolved"]
    assert row["measured_mean"] == 6.5 and row["measured_sd"] == 0.0 and row["n"] == 2


def test_quick_runs_and_cpu_timings_are_not_comparable():
    metrics, runs = assisted(epochs=100, device="cpu")
    table = paper_claims(metrics, brain_runs(epochs=(150, 150), device="cpu") + runs, PLATEAU)
    assert set(table["verdict"]) == {NOT_COMPARABLE}
    reasons = table.set_index("claim_id")["reason"]
    assert "scale" in reasons["assisted_scnn_smallest_resolved"]
    assert "device" in reasons["assisted_time_scnn"]
    # long enough but on a CPU: accuracy claims are tested, timing claims are not
    metrics, runs = assisted(device="cpu")
    v = verdicts(paper_claims(metrics, brain_runs(device="cpu") + runs, PLATEAU))
    assert v["radon_speedup_epochs"] == REPRODUCED and v["radon_speedup_time"] == NOT_COMPARABLE
    assert v["assisted_time_ratio_scnn_cnn"] == NOT_COMPARABLE


def test_smallest_resolved():
    assert smallest_resolved({6.5: 1, 5.5: 1, 4.5: 1, 3.5: 1, 2.2: 0, 1.6: 1}) == 3.5
    assert smallest_resolved({6.5: 0, 5.5: 1}) == np.inf
    assert smallest_resolved({6.5: 1, 1.6: 1}) == pytest.approx(1.6)


def test_brain_runs_alone_give_the_brain_claims_only():
    """The brain benchmarks' claims table (no simulation, MLEM or assisted runs): every
    III-A/B claim with its verdict, and no assisted row."""
    brain_metrics = pd.DataFrame([{"experiment": "denoise", "model": "scnn", "seed": 0, "epoch": 2000,
                                   "metric": "psnr", "value": 30.0, "split": "train"}])
    table = paper_claims(brain_metrics, brain_runs(), PLATEAU)
    assert not table["claim_id"].str.startswith("assisted").any()
    v = verdicts(table)
    assert v["denoise_scnn1000_vs_cnn2000"] == REPRODUCED and v["radon_min_loss_ratio"] == REPRODUCED
    v = verdicts(paper_claims(brain_metrics, brain_runs(scnn_fast=False), PLATEAU))
    assert v["denoise_scnn1000_vs_cnn2000"] == NOT_REPRODUCED and v["radon_min_loss_ratio"] == NOT_REPRODUCED
