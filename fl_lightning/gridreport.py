"""The grid's report: the per-setting table (``table.md``, ``table.csv``: mean and standard
deviation over seeds of the final, best and last-rounds test accuracy, with arrows against the
FedAvg baseline) and the learning-curve figures, from the cells' curves."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fl_lightning.grid import Setting

BASELINE = "fedavg"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(
    curves: dict[tuple[str, str, int], dict[int, float]],
    finals: dict[tuple[str, str, int], float],
) -> list[dict]:
    """Per (algorithm, setting): mean/std over seeds of the final and the best accuracy.

    ``curves`` and ``finals`` are keyed by (algorithm, setting slug, seed) and hold the
    finished cells only. ``std`` is the sample standard deviation (0 for one seed).
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for alg, slug, seed in finals:
        groups.setdefault((alg, slug), []).append(seed)
    rows = []
    for (alg, slug), seeds in groups.items():
        final = [100 * finals[(alg, slug, s)] for s in sorted(seeds)]
        best = [100 * max(curves[(alg, slug, s)].values(), default=finals[(alg, slug, s)])
                for s in sorted(seeds)]
        fm, fs = mean_std(final)
        bm, bs = mean_std(best)
        rows.append({"algorithm": alg, "setting": slug, "seeds": len(seeds),
                     "final_mean": fm, "final_std": fs, "best_mean": bm, "best_std": bs})
    return rows


def _arrow(value: float, baseline: float | None) -> str:
    if baseline is None:
        return ""
    return " ↑" if value > baseline else (" ↓" if value < baseline else " =")


def write_tables(rows: list[dict], algorithms: list[str], settings: list[Setting],
                 out: str, rounds: int, seeds: list[int]) -> None:
    """``<out>.md`` (the paper-style table) and ``<out>.csv`` (one row per cell group)."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    by = {(r["algorithm"], r["setting"]): r for r in rows}
    with open(out + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["algorithm", "setting", "seeds", "final_mean",
                                           "final_std", "best_mean", "best_std"])
        w.writeheader()
        for alg in algorithms:
            for s in settings:
                if (alg, s.slug) in by:
                    w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v)
                                for k, v in by[(alg, s.slug)].items()})
    head = "| Algorithm | " + " | ".join(
        f"{s.label}: final | best" for s in settings) + " |"
    lines = [
        f"Test accuracy (%) after {rounds} rounds, mean (std) over seeds {seeds}; "
        "final = the last round, best = the highest evaluated round; the arrow compares the "
        "mean with FedAvg's; [n] = seeds finished where fewer than asked.", "",
        head, "|---|" + "---|---|" * len(settings),
    ]
    for alg in algorithms:
        cells = []
        for s in settings:
            r, base = by.get((alg, s.slug)), by.get((BASELINE, s.slug))
            if r is None:
                cells += ["not finished", ""]
                continue
            more = "" if r["seeds"] == len(seeds) else f" [{r['seeds']}]"
            for key in ("final", "best"):
                m, sd = r[f"{key}_mean"], r[f"{key}_std"]
                arrow = _arrow(m, base[f"{key}_mean"]) if base and alg != BASELINE else ""
                cells.append(f"{m:.2f} ({sd:.2f}){arrow}{more}")
        lines.append(f"| {alg} | " + " | ".join(cells) + " |")
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")


def plot_curves(curves: dict[tuple[str, str, int], dict[int, float]], algorithms: list[str],
                settings: list[Setting], out: str) -> list[str]:
    """One PNG per setting: mean test accuracy per round with a band of +- one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for s in settings:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for alg in algorithms:
            seeds = [c for (a, slug, _), c in curves.items() if a == alg and slug == s.slug and c]
            if not seeds:
                continue
            common = sorted(set.intersection(*(set(c) for c in seeds)))
            if not common:
                continue
            stats = [mean_std([100 * c[r] for c in seeds]) for r in common]
            mean = [m for m, _ in stats]
            ax.plot(common, mean, label=f"{alg} ({len(seeds)} seeds)")
            ax.fill_between(common, [m - sd for m, sd in stats], [m + sd for m, sd in stats],
                            alpha=0.2)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(s.label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        path = f"{out}_{s.slug}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
