"""Figure 1 of the FedProx paper from fl-lightning-grid runs: curves, table, CSV.

1. Extract the curves of every grid cell (``metrics.csv`` of each logger version, newest wins)
   into one small CSV: ``setting, stragglers, algorithm, seed, round, train_loss, test_acc``
   (``train_loss`` is GlobalObjective's ``objective/loss``: the global model's loss on all
   devices' training data, the paper's training loss; ``test_acc`` is ``val_acc`` on the union of
   the devices' test splits)::

       python docs/plot_fedprox.py extract --runs runs/fedprox --csv docs/results_fedprox/curves.csv

2. Draw the figure (rows: 0 / 50 / 90 % stragglers; columns: the datasets; mean over seeds with a
   band of +- one standard deviation) and the table (mean (sample std) over seeds of the final
   training loss and test accuracy, the best test accuracy, the mean test accuracy of the last
   20 rounds, and the largest training loss after round 50: the instability)::

       python docs/plot_fedprox.py plot --csv docs/results_fedprox/curves.csv \\
           --out docs/figures/fedprox/figure1
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import re
from collections import defaultdict

ALGORITHMS = ("fedavg", "fedprox_mu0", "fedprox_mu1")
LABELS = {"fedavg": "FedAvg (drops stragglers)", "fedprox_mu0": "FedProx mu=0",
          "fedprox_mu1": "FedProx mu=1", "scaffold": "SCAFFOLD", "fednova": "FedNova",
          "fedsam": "FedSAM", "fedsol": "FedSoL", "fedsol_prox_fedprox": "FedSoL + FedProx",
          "feddyn": "FedDyn (drops stragglers)"}
DATASETS = ("synthetic_iid_natural", "synthetic_natural_0_0", "synthetic_natural_0.5_0.5",
            "synthetic_natural_1_1", "mnist_powerlaw")
TITLES = {"synthetic_iid_natural": "Synthetic IID", "synthetic_natural_0_0": "Synthetic(0,0)",
          "synthetic_natural_0.5_0.5": "Synthetic(0.5,0.5)",
          "synthetic_natural_1_1": "Synthetic(1,1)", "mnist_powerlaw": "MNIST"}
LEVELS = ("0", "0.5", "0.9")


FIELDS = ["setting", "stragglers", "algorithm", "seed", "round", "train_loss", "test_acc"]


def _cell(row: dict) -> tuple[str, str, str, str]:
    return row["setting"], row["stragglers"], row["algorithm"], row["seed"]


def extract(runs: str, out: str, merge: bool = False) -> int:
    """Write the curves of every finished cell under ``runs`` to ``out``; with ``merge``, the
    cells of an existing ``out`` that ``runs`` does not hold are kept (a cell in both: the
    runs folder wins), so runs made in several sessions and folders build one CSV."""
    rows = []
    for cell in sorted(glob.glob(os.path.join(runs, "*", "*", "seed*"))):
        setting_dir, alg = os.path.split(os.path.dirname(cell))
        setting = os.path.basename(setting_dir)
        m = re.fullmatch(r"(.+)_s([0-9.]+)", setting)
        if not m or not os.path.isfile(os.path.join(cell, "result.json")):
            continue
        curve: dict[int, dict[str, float]] = {}
        for path in sorted(glob.glob(os.path.join(cell, "fl", "version_*", "metrics.csv")),
                           key=lambda p: int(p.split("version_")[1].split(os.sep)[0])):
            with open(path, newline="") as fh:
                for r in csv.DictReader(fh):
                    entry = curve.setdefault(int(r["step"]) + 1, {})
                    if r.get("objective/loss"):
                        entry["train_loss"] = float(r["objective/loss"])
                    if r.get("val_acc"):
                        entry["test_acc"] = float(r["val_acc"])
        for rnd in sorted(curve):
            rows.append({"setting": m.group(1), "stragglers": m.group(2), "algorithm": alg,
                         "seed": os.path.basename(cell)[4:], "round": rnd,
                         "train_loss": curve[rnd].get("train_loss", ""),
                         "test_acc": curve[rnd].get("test_acc", "")})
    if merge and os.path.isfile(out):
        fresh = {_cell(r) for r in rows}
        with open(out, newline="") as fh:
            kept = [r for r in csv.DictReader(fh) if _cell(r) not in fresh]
        rows = kept + rows
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def _load(path: str):
    data: dict = defaultdict(lambda: defaultdict(dict))  # (setting, level, alg) -> seed -> rnd
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            key = (r["setting"], r["stragglers"], r["algorithm"])
            data[key][r["seed"]][int(r["round"])] = (
                float(r["train_loss"]) if r["train_loss"] else math.nan,
                float(r["test_acc"]) if r["test_acc"] else math.nan)
    return data


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    return mean, math.sqrt(var)


def plot(path: str, out: str, algorithms: tuple[str, ...] = ALGORITHMS) -> None:
    import matplotlib.pyplot as plt

    from fl_lightning import plotting  # noqa: F401 - the package's style, Agg backend

    data = _load(path)
    present = [d for d in DATASETS if any(k[0] == d for k in data)]
    for metric, index, ylabel in (("loss", 0, "training loss"), ("acc", 1, "test accuracy")):
        fig, axes = plt.subplots(len(LEVELS), len(present), squeeze=False,
                                 figsize=(3.4 * len(present), 2.6 * len(LEVELS)))
        for j, dataset in enumerate(present):
            for i, level in enumerate(LEVELS):
                ax = axes[i][j]
                for alg in algorithms:
                    seeds = data.get((dataset, level, alg))
                    if not seeds:
                        continue
                    rounds = sorted(set.intersection(*(set(s) for s in seeds.values())))
                    stats = [_mean_std([seeds[s][r][index] for s in seeds]) for r in rounds]
                    mean = [m for m, _ in stats]
                    label = f"{LABELS.get(alg, alg)} ({len(seeds)} seeds)"
                    color = f"C{algorithms.index(alg) % 10}"  # one color per algorithm
                    ax.plot(rounds, mean, label=label, lw=1.2, color=color)
                    ax.fill_between(rounds, [m - s for m, s in stats],
                                    [m + s for m, s in stats], alpha=0.2, color=color)
                if not ax.lines:
                    ax.text(0.5, 0.5, "not run", ha="center", va="center",
                            transform=ax.transAxes)
                ax.set_title(f"{TITLES[dataset]}, {100 * float(level):g}% stragglers",
                             fontsize=9)
                ax.set_xlabel("round", fontsize=8)
                ax.set_ylabel(ylabel, fontsize=8)
                ax.grid(alpha=0.3)
                if metric == "loss" and ax.lines:
                    top = max(min(max(line.get_ydata()) for line in ax.lines), 0.5)
                    ax.set_ylim(0, 1.6 * top)
                if ax.lines:
                    ax.legend(fontsize=6)
        fig.tight_layout()
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        fig.savefig(f"{out}_{metric}.png", dpi=100)
        plt.close(fig)
    table(data, out + ".md", algorithms)


def table(data, path: str, algorithms: tuple[str, ...] = ALGORITHMS) -> None:
    lines = ["| setting | stragglers | algorithm | seeds | rounds | final train loss | "
             "final test acc (%) | best test acc (%) | test acc, mean of the last 20 rounds (%) | "
             "largest train loss after round 50 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for dataset in DATASETS:
        for level in LEVELS:
            for alg in algorithms:
                seeds = data.get((dataset, level, alg))
                if not seeds:
                    continue
                last = [max(c) for c in seeds.values()]
                loss = _mean_std([c[max(c)][0] for c in seeds.values()])
                acc = _mean_std([100 * c[max(c)][1] for c in seeds.values()])
                best = _mean_std([100 * max(v[1] for v in c.values()) for c in seeds.values()])
                tail = _mean_std([100 * sum(c[r][1] for r in sorted(c)[-20:]) / 20
                                  for c in seeds.values()])
                peak = _mean_std([max(c[r][0] for r in c if r > 50) for c in seeds.values()])
                lines.append(
                    f"| {TITLES[dataset]} | {100 * float(level):g}% | {LABELS.get(alg, alg)} | "
                    f"{len(seeds)} | {min(last)} | {loss[0]:.3f} ({loss[1]:.3f}) | "
                    f"{acc[0]:.2f} ({acc[1]:.2f}) | {best[0]:.2f} ({best[1]:.2f}) | "
                    f"{tail[0]:.2f} ({tail[1]:.2f}) | {peak[0]:.2f} ({peak[1]:.2f}) |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="FedProx Figure 1 from fl-lightning-grid runs")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--runs", required=True)
    e.add_argument("--csv", required=True)
    e.add_argument("--merge", action="store_true",
                   help="keep the cells of an existing --csv that --runs does not hold")
    d = sub.add_parser("plot")
    d.add_argument("--csv", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help="comma-separated grid algorithm names, in legend order")
    args = p.parse_args(argv)
    if args.cmd == "extract":
        print(f"plot_fedprox: {extract(args.runs, args.csv, args.merge)} rows -> {args.csv}")
    else:
        plot(args.csv, args.out, tuple(a for a in args.algorithms.split(",") if a))
        print(f"plot_fedprox: wrote {args.out}_loss.png, {args.out}_acc.png, {args.out}.md")


if __name__ == "__main__":
    main()
