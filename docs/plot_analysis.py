"""Draw the figures of docs/analysis.md from the analysis files of two or more runs.

Each run directory is a Lightning log dir (``.../version_N``) whose ``analysis/`` folder the
callbacks wrote. Usage::

    python docs/plot_analysis.py --out docs/figures/analysis \
        FedAvg=runs/analysis_fedavg/version_0 FedSoL=runs/analysis_fedsol/version_0
"""

from __future__ import annotations

import argparse
import csv
import json
import os

import torch

from fl_lightning import plotting  # the package's plotting style (also sets the Agg backend)


def _history(run: str, name: str) -> list[dict]:
    path = os.path.join(run, "analysis", f"{name}.json")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return json.load(fh)["history"]


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    rows = [r for r in rows if key in r]
    return [r["round"] for r in rows], [r[key] for r in rows]


def _val(run: str) -> tuple[list[float], list[float]]:
    rounds, accs = [], []
    with open(os.path.join(run, "metrics.csv")) as fh:
        for row in csv.DictReader(fh):
            if row.get("val_acc"):
                rounds.append(float(row["step"]) + 1)
                accs.append(float(row["val_acc"]))
    return rounds, accs


def _panel(runs: dict[str, str], panels: list[tuple[str, str, str]], out: str, title: str,
           logy: tuple[str, ...] = ()) -> None:
    fig, axes = plotting.subplots(len(panels))
    for ax, (source, key, label) in zip(axes, panels, strict=True):
        for name, run in runs.items():
            x, y = _val(run) if source == "val" else _series(_history(run, source), key)
            plotting.plot_rounds(ax, x, y, key=key, name=name, title=label, logy=key in logy)
    axes[0].legend()
    fig.suptitle(title)
    plotting.save(fig, out, dpi=100)


def _landscapes(runs: dict[str, str], out: str) -> None:
    grids = {}
    for name, run in runs.items():
        files = sorted(f for f in os.listdir(os.path.join(run, "analysis"))
                       if f.startswith("landscape_round") and f.endswith(".pt"))
        if files:
            grids[name] = torch.load(os.path.join(run, "analysis", files[-1]))
    if not grids:
        return
    fig, axes = plotting.subplots(len(grids), width=4.3, height=3.6)
    vmax = max(float(g["loss"].max()) for g in grids.values())
    for ax, (name, g) in zip(axes, grids.items(), strict=True):
        a, b, z = g["a"].numpy(), g["b"].numpy(), g["loss"].numpy()
        levels = torch.linspace(0, vmax, 21).numpy()
        cs = ax.contourf(a, b, z, levels=levels, cmap="viridis")
        ax.contour(a, b, z, levels=levels, colors="k", linewidths=0.3)
        ax.plot([0], [0], "r*", ms=10)
        ax.set_title(f"{name}, round {g['round']}")
        ax.set_xlabel("top eigenvector d1" if g["directions"] == "hessian" else "d1")
        ax.set_ylabel("second eigenvector d2" if g["directions"] == "hessian" else "d2")
        fig.colorbar(cs, ax=ax, label="train loss")
    plotting.save(fig, out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/figures/analysis")
    parser.add_argument("runs", nargs="+", help="NAME=LOG_DIR")
    args = parser.parse_args()
    runs = dict(r.split("=", 1) for r in args.runs)
    os.makedirs(args.out, exist_ok=True)
    _panel(runs, [("hessian", "lambda_1", "lambda_1"),
                  ("hessian", "ratio_1_5", "lambda_1 / lambda_5"),
                  ("val", "val_acc", "test accuracy")],
           os.path.join(args.out, "hessian.png"), "Hessian spectrum of the global model")
    _panel(runs, [("divergence", "div_mean", "mean ||w_g - w_k||"),
                  ("divergence", "pairwise_mean", "mean ||w_i - w_j||"),
                  ("dispersion", "b_local", "B-local dissimilarity B(w)")],
           os.path.join(args.out, "divergence.png"), "client divergence")
    _panel(runs, [("oscillation", "step_norm", "step ||w_{t+1} - w_t||"),
                  ("oscillation", "radius", "radius over the last 10 rounds"),
                  ("oscillation", "straightness", "displacement / path length")],
           os.path.join(args.out, "oscillation.png"), "global trajectory")
    _panel(runs, [("knowledge", "local_acc_mean", "local models' test accuracy"),
                  ("alignment", "cos_ce_prox", "cos(grad CE, grad KL) at the end"),
                  ("alignment", "prox_loss", "KL(global || local)")],
           os.path.join(args.out, "knowledge.png"), "knowledge preservation")
    _landscapes(runs, os.path.join(args.out, "landscape.png"))


if __name__ == "__main__":
    main()
