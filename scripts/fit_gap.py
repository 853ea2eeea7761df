"""The "fails to fit" measurements on the FedProx paper's convex synthetic family.

Runs (in one process, with ``fl-lightning-grid``'s cell commands and folders, so a finished
cell is skipped and a rerun of the script completes the rest) the sweeps of
``docs/analysis.md`` with ``configs/fedprox/fit_gap.yaml``: the settled gap
``F(w) - F*`` to the exact global optimum and the late oscillation, for FedAvg, SCAFFOLD and
FedSoL, as functions of

* heterogeneity: Synthetic(a, a), a in 0, 0.25, 0.5, 1, 2 (E = 20, lr 0.003);
* local epochs: E in 5, 20, 50 on Synthetic(1, 1) (lr 0.003);
* learning rate: lr in 0.001, 0.003, 0.01 on Synthetic(1, 1) (E = 20);

then writes ``<out>.csv`` (one row per run: the tail statistics GlobalObjective and
GlobalOscillation logged), ``<out>.md`` (one row per sweep point and method: mean and standard
deviation over the seeds run) and ``<out>.png`` (three panels, mean gap over the last 20% of
rounds, with a bar of +- its standard deviation over seeds).

Usage (from the repository root)::

    python scripts/fit_gap.py --runs runs/fit_gap --out docs/figures/fit_gap/fit_gap
    python scripts/fit_gap.py --runs runs/fit_gap --out docs/figures/fit_gap/fit_gap --report-only
    python scripts/fit_gap.py --out docs/figures/fit_gap/fit_gap --from-csv   # figures from CSVs
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
import time

ALGORITHMS = ("fedavg", "scaffold", "fedsol")
HETEROGENEITY = ("0", "0.25", "0.5", "1", "2")
EPOCHS = ("5", "20", "50")
LRS = ("0.001", "0.003", "0.01")
# the heterogeneity sweep runs first, so its floor runs come before the other sweeps' rows
BASE_E, BASE_LR, BASE_A = "20", "0.003", "1"


def sweeps() -> list[tuple[str, str, str, str]]:
    """``(sweep, alpha, E, lr)`` of every run (the centre point is shared)."""
    out = [("heterogeneity", a, BASE_E, BASE_LR) for a in HETEROGENEITY]
    out += [("epochs", BASE_A, e, BASE_LR) for e in EPOCHS if e != BASE_E]
    out += [("lr", BASE_A, BASE_E, lr) for lr in LRS if lr != BASE_LR]
    return out


def _folder(runs: str, alpha: str, epochs: str, lr: str) -> str:
    return os.path.join(runs, f"E{epochs}_lr{lr}")


def run_cells(runs: str, alpha: str, epochs: str, lr: str, seeds: str, report_only: bool,
              rounds: int = 100, algorithms: tuple[str, ...] = ALGORITHMS,
              floor: bool = False) -> None:
    """Run the cells of one sweep point, in this process (one interpreter start for the whole
    sweep), with ``fl-lightning-grid``'s commands and folders; finished cells are skipped.
    With ``floor`` the first algorithm's run also measures the exact heterogeneity floor
    (``configs/fedprox/fit_gap_floor.yaml``: it depends on the data only)."""
    from fl_lightning import grid
    from fl_lightning.cli import main as cli_main

    args = argparse.Namespace(
        base="configs/fedprox/fit_gap.yaml", runs=_folder(runs, alpha, epochs, lr),
        data_dir="data", rounds=rounds, eval_every=10, checkpoint_every=rounds,
        extra=f"--model.local_epochs {epochs} --model.local_lr {lr}",
    )
    setting = grid.parse_setting(f"synthetic:{alpha}:{alpha}")
    for seed in (int(v) for v in seeds.split(",") if v):
        for alg in algorithms:
            cell = grid.Cell(alg, setting, seed)
            folder = cell.folder(args.runs)
            done = os.path.join(folder, "result.json")
            if os.path.isfile(done) or report_only:
                continue
            os.makedirs(folder, exist_ok=True)
            cmd = grid.cell_command(cell, args)[3:]  # from "fit" on
            if floor and alg == algorithms[0]:
                # the grid names the base config by its absolute path
                at = next(i for i, a in enumerate(cmd)
                          if a.endswith(os.path.join("configs", "fedprox", "fit_gap.yaml"))) + 1
                cmd[at:at] = ["--config", "configs/fedprox/fit_gap_floor.yaml"]
            start = time.time()
            try:
                cli_main(cmd)
                rc = 0
            except SystemExit as stop:
                rc = int(stop.code or 0)
            final = sorted(glob.glob(os.path.join(folder, "fl", "version_*",
                                                  "final_metrics.json")))
            result = {"rc": rc, "seconds": time.time() - start, "cmd": ["fl-lightning", *cmd]}
            if rc == 0 and final:
                result["final"] = json.load(open(final[-1]))
                json.dump(result, open(done, "w"), indent=2)
            print(f"fit_gap: {alg} alpha={alpha} E={epochs} lr={lr} seed {seed}: rc={rc} "
                  f"{result['seconds']:.0f}s", flush=True)


#: ``(alpha, E, lr, algorithm, seed) -> [(round, gap)]`` of the runs :func:`collect` read.
curves: dict[tuple[str, str, str, str, str], list[tuple[int, float]]] = {}

#: the columns of the table: mean (sample standard deviation over seeds) of each
SHOWN = ["floor", "spread_V", "gap_r50", "gap_r80", "gap_tail_mean", "gap_tail_std",
         "gap_tail_range", "radius", "straightness", "test_acc"]
KEYS = ["sweep", "alpha_beta", "local_epochs", "lr", "algorithm"]


def collect(runs: str) -> list[dict]:
    rows = []
    # (alpha, seed) -> the floor probe's history: it depends on the data only, so one run per
    # data draw (the first algorithm's run of the heterogeneity sweep) measures it
    floors: dict[tuple[str, str], list] = {}
    curves.clear()
    for sweep, alpha, epochs, lr in sweeps():
        base = _folder(runs, alpha, epochs, lr)
        for alg in ALGORITHMS:
            pattern = os.path.join(base, f"synthetic_natural_{alpha}_{alpha}", alg, "seed*")
            for cell in sorted(glob.glob(pattern)):
                if not os.path.isfile(os.path.join(cell, "result.json")):
                    continue
                seed = os.path.basename(cell)[4:]
                version = sorted(glob.glob(os.path.join(cell, "fl", "version_*")))[-1]
                obj = json.load(open(os.path.join(version, "analysis", "objective.json")))
                osc_path = os.path.join(version, "analysis", "oscillation.json")
                osc = json.load(open(osc_path))["history"] if os.path.isfile(osc_path) else []
                last = [r for r in osc if "radius" in r]
                floor_path = os.path.join(version, "analysis", "floor.json")
                probe = (json.load(open(floor_path))["history"] if os.path.isfile(floor_path)
                         else floors.get((alpha, seed), []))
                if probe:
                    floors[(alpha, seed)] = probe
                final = json.load(open(os.path.join(cell, "result.json")))["final"]
                tail = obj["tail"]
                gaps = {int(r["round"]): r["gap"] for r in obj["history"] if "gap" in r}
                curves[(alpha, epochs, lr, alg, seed)] = sorted(gaps.items())
                rows.append({
                    "sweep": sweep, "alpha_beta": alpha, "local_epochs": epochs, "lr": lr,
                    "algorithm": alg, "seed": seed,
                    "F_star": obj["optimum"]["loss"],
                    "F_star_grad_norm": obj["optimum"]["grad_norm"],
                    "floor": (obj["optimum"]["loss"] - probe[-1]["opt_loss"]) if probe else None,
                    "spread_V": probe[-1]["spread_V"] if probe else None,
                    "optima_converged": probe[-1]["converged"] if probe else None,
                    "gap_r50": gaps.get(50),
                    "gap_r80": gaps.get(80),
                    "gap_tail_mean": tail.get("gap_tail_mean"),
                    "gap_tail_std": tail.get("gap_tail_std"),
                    "gap_tail_range": tail.get("gap_tail_range"),
                    "radius": last[-1]["radius"] if last else None,
                    "straightness": last[-1]["straightness"] if last else None,
                    "test_acc": final.get("test_acc"),
                })
    return rows


def _mean_std(values: list) -> tuple[float | None, float | None]:
    """:func:`fl_lightning.gridreport.mean_std` of the values that are not ``None``; the
    deviation is ``None`` below two values (the table and figure then show none)."""
    from fl_lightning.gridreport import mean_std

    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    mean, sd = mean_std(vals)
    return mean, (sd if len(vals) > 1 else None)


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per sweep point and algorithm: ``seeds``, and ``<col>`` / ``<col>_sd`` the mean
    and the sample standard deviation over the seeds (each seed is its own draw of the 30
    devices, so the spread mixes data and client sampling) of every column of :data:`SHOWN`."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in KEYS), []).append(r)
    out = []
    for key, runs in groups.items():
        agg = dict(zip(KEYS, key, strict=True))
        agg["seeds"] = len(runs)
        for col in SHOWN:
            agg[col], agg[col + "_sd"] = _mean_std([r[col] for r in runs])
        out.append(agg)
    return out


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _cell(mean, sd) -> str:
    if mean is None:
        return ""
    return _fmt(mean) if sd is None else f"{_fmt(mean)} ({_fmt(sd)})"


def write(rows: list[dict], out: str) -> None:
    """``<out>.csv`` (one row per run), ``<out>.md`` (one row per sweep point and algorithm:
    mean (standard deviation over seeds)), ``<out>_curves.csv`` (every run's gap per round) and
    the two figures."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    keys = list(rows[0]) if rows else ["sweep"]
    with open(out + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    agg = aggregate(rows)
    head = KEYS + ["seeds"] + SHOWN
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([*(str(r[k]) for k in KEYS), str(r["seeds"]),
                                 *(_cell(r[c], r[c + "_sd"]) for c in SHOWN)]) + " |"
              for r in agg]
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(out + "_curves.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["alpha_beta", "local_epochs", "lr", "algorithm", "seed", "round", "gap"])
        for (alpha, epochs, lr, alg, seed), pts in sorted(curves.items()):
            w.writerows([alpha, epochs, lr, alg, seed, r, g] for r, g in pts)
    plot(agg, out + ".png")
    plot_curves(out + "_curves.png")


def from_csv(out: str) -> None:
    """Redraw ``<out>.png`` and ``<out>_curves.png`` from ``<out>.csv`` and ``<out>_curves.csv``
    (the committed files), without the runs."""
    text = (*KEYS, "seed")
    with open(out + ".csv", newline="") as fh:
        rows = [{k: (None if v == "" else (v if k in text else float(v))) for k, v in r.items()}
                for r in csv.DictReader(fh)]
    curves.clear()
    with open(out + "_curves.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            key = (r["alpha_beta"], r["local_epochs"], r["lr"], r["algorithm"], r.get("seed", "0"))
            curves.setdefault(key, []).append((int(r["round"]), float(r["gap"])))
    plot(aggregate(rows), out + ".png")
    plot_curves(out + "_curves.png")


def plot_curves(path: str) -> None:
    """``F(w_t) - F*`` against the round, one panel per heterogeneity level (E = 20, lr 0.003):
    the mean over seeds, and a band from the lowest to the highest seed."""
    import matplotlib.pyplot as plt

    from fl_lightning import plotting

    fig, axes = plotting.subplots(len(HETEROGENEITY), width=3.2, height=3.0)
    for ax, alpha in zip(axes, HETEROGENEITY, strict=True):
        for alg in ALGORITHMS:
            runs = [dict(pts) for (a, e, lr, g, _), pts in sorted(curves.items())
                    if (a, e, lr, g) == (alpha, BASE_E, BASE_LR, alg)]
            if not runs:
                continue
            rounds = sorted(set.intersection(*(set(r) for r in runs)))
            vals = [[max(r[t], 1e-12) for r in runs] for t in rounds]
            line, = ax.plot(rounds, [sum(v) / len(v) for v in vals], lw=1,
                            label=f"{alg} ({len(runs)} seeds)" if len(runs) > 1 else alg)
            if len(runs) > 1:
                ax.fill_between(rounds, [min(v) for v in vals], [max(v) for v in vals],
                                color=line.get_color(), alpha=0.2, lw=0)
        ax.set_yscale("log")
        ax.set_title(f"Synthetic({alpha},{alpha})", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("F(w_t) - F*")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(agg: list[dict], path: str) -> None:
    """The settled gap of every sweep point (rows of :func:`aggregate`): the mean over seeds,
    with a bar of +- the standard deviation over seeds (over the last 20 rounds where there is
    one seed)."""
    import matplotlib.pyplot as plt

    from fl_lightning import plotting

    panels = [("heterogeneity", "alpha_beta", "alpha = beta"),
              ("epochs", "local_epochs", "local epochs E"),
              ("lr", "lr", "local learning rate")]
    fig, axes = plotting.subplots(3, width=4.0, height=3.2)
    for ax, (sweep, key, label) in zip(axes, panels, strict=True):
        for alg in ALGORITHMS:
            pts = [r for r in agg if r["algorithm"] == alg and (
                r["sweep"] == sweep or (r["sweep"] == "heterogeneity" and r["alpha_beta"] == BASE_A
                                        and sweep != "heterogeneity"))]
            pts = [r for r in pts if r["gap_tail_mean"] is not None]
            pts.sort(key=lambda r: float(r[key]))
            if not pts:
                continue
            x = [float(r[key]) for r in pts]
            y = [max(r["gap_tail_mean"], 1e-12) for r in pts]
            err = [r["gap_tail_mean_sd"] if r["gap_tail_mean_sd"] is not None
                   else r["gap_tail_std"] for r in pts]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=alg)
        ax.set_xlabel(label)
        ax.set_ylabel("settled gap F(w) - F*")
        ax.set_yscale("log")
        if sweep != "heterogeneity":
            ax.set_xscale("log")
            values = sorted({float(r[key]) for r in agg if r["sweep"] == sweep}
                            | {float(BASE_E if key == "local_epochs" else BASE_LR)})
            ax.set_xticks(values, [f"{v:g}" for v in values])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("gap to the exact global optimum (last 20% of rounds): mean, +- std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def unweighted_reference(alpha: str, seed: int = 0, l2: float = 1.0) -> dict[str, float]:
    """``F(u*) - F*``: how far above ``F*`` (the size-weighted objective) the minimizer ``u*`` of
    the unweighted mean ``1/K sum_k f_k + l2/2 ||w||^2`` of the device objectives sits (both
    exact, float64). A method whose server combines the devices with equal weights somewhere
    (SCAFFOLD's control variate ``c = 1/N sum_i c_i``) settles there, not at ``F*``."""
    import torch

    from fl_lightning.callbacks.functional import exact_minimum, weighted_loss
    from fl_lightning.data.module import FederatedDataModule
    from fl_lightning.models import LogisticRegression

    dm = FederatedDataModule(dataset="synthetic", partition="natural", num_clients=30,
                             synthetic_alpha=float(alpha), synthetic_beta=float(alpha), seed=seed)
    dm.setup("fit")
    torch.manual_seed(0)
    net = LogisticRegression(10, dm.input_shape)
    params = {k: v.detach() for k, v in net.named_parameters()}
    batches = [(dm.train_x[p], dm.train_y[p]) for p in dm.client_indices]
    w_star, info = exact_minimum(net, params, {}, batches, l2=l2)
    u_star, info_u = exact_minimum(net, params, {}, batches, l2=l2,
                                   weights=[1 / len(batches)] * len(batches))
    data = [(x.double(), y) for x, y in batches]
    flat = torch.cat([v.reshape(-1) for v in u_star.values()])
    f_u = float(weighted_loss(net, u_star, {}, data)) + 0.5 * l2 * float(flat @ flat)
    return {"F_star": info["loss"], "F_of_unweighted_min": f_u,
            "unweighted_gap": f_u - info["loss"],
            "converged": min(info["converged"], info_u["converged"])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs/fit_gap")
    p.add_argument("--out", default="docs/figures/fit_gap/fit_gap")
    p.add_argument("--seeds", default="0")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--rounds", type=int, default=100,
                   help="rounds per run (100: the documented sweep; fewer only to smoke-test)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--sweep", default="all", choices=["all", "heterogeneity", "epochs", "lr"])
    p.add_argument("--from-csv", action="store_true",
                   help="only redraw the figures from <out>.csv and <out>_curves.csv")
    p.add_argument("--reference", action="store_true",
                   help="also write <out>_reference.md: F(u*) - F* for every alpha (u* the "
                   "minimizer of the unweighted mean of the device objectives)")
    args = p.parse_args(argv)
    sys.argv = sys.argv[:1]  # the in-process fl-lightning runs get their own arguments
    if args.from_csv:
        from_csv(args.out)
        print(f"fit_gap: redrew {args.out}.png and {args.out}_curves.png")
        return
    algorithms = tuple(a for a in args.algorithms.split(",") if a)
    for sweep, alpha, epochs, lr in sweeps():
        if args.sweep in ("all", sweep):
            run_cells(args.runs, alpha, epochs, lr, args.seeds, args.report_only, args.rounds,
                      algorithms, floor=sweep == "heterogeneity")
    rows = collect(args.runs)
    write(rows, args.out)
    if args.reference:
        lines = ["| alpha = beta | seed | F* | F(u*) | F(u*) - F* |", "|---|---|---|---|---|"]
        for alpha in HETEROGENEITY:
            for seed in (int(v) for v in args.seeds.split(",") if v):
                ref = unweighted_reference(alpha, seed)
                lines.append(f"| {alpha} | {seed} | {ref['F_star']:.6f} | "
                             f"{ref['F_of_unweighted_min']:.6f} | {ref['unweighted_gap']:.4f} |")
        with open(args.out + "_reference.md", "w") as fh:
            fh.write("\n".join(lines) + "\n")
    print(f"fit_gap: {len(rows)} runs; wrote {args.out}.csv, {args.out}.md, {args.out}.png")


if __name__ == "__main__":
    main()
