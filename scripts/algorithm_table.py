"""Run every algorithm config on MNIST (LDA alpha=0.1 and shard s=2) and write the table.

Usage (from the repository root; resumable, a finished run is skipped):

    OMP_NUM_THREADS=1 python scripts/algorithm_table.py --rounds 5 --sample-ratio 0.1 \
        --local-epochs 5 --main --jobs 2 --runs runs/mnist5 --out runs/mnist5_table.md

Each row is one command of the form

    fl-lightning fit --config configs/mnist/fedavg_<lda|shard>.yaml \
        --config configs/algorithms/<row>.yaml --data.data_dir DATA_DIR <budget flags>

printed in full under the table.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor

from _run import run_cached

ROWS = [
    ("FedAvg", "fedavg"), ("FedProx (mu=1)", "fedprox"), ("FedSAM (rho=0.1)", "fedsam"),
    ("FedASAM (rho=1)", "fedasam"), ("SCAFFOLD", "scaffold"),
    ("FedNova (official nova_ccvr)", "fednova"),
    ("FedNova plain (no ccvr)", "fednova_plain"), ("FedDyn (alpha=0.1)", "feddyn"),
    ("MOON (mu=0.1, tau=0.5)", "moon"), ("FedNTD (beta=1, tau=1)", "fedntd"),
    ("FedAvgM (server momentum 0.9)", "fedavgm"), ("FedAdam (server lr 0.01)", "fedadam"),
    ("FedYogi (server lr 0.01)", "fedyogi"), ("FedAdagrad (server lr 0.01)", "fedadagrad"),
    ("FedSoL (adaptive, rho=2)", "fedsol"), ("FedSoL fixed radius", "fedsol_fixed"),
    ("FedSoL head only", "fedsol_head"), ("FedSoL body only", "fedsol_body"),
    ("FedSoL + FedProx source", "fedsol_prox_fedprox"),
    ("FedSoL + SCAFFOLD source", "fedsol_prox_scaffold"),
    ("FedSoL + FedDyn source", "fedsol_prox_feddyn"),
    ("FedSoL + MOON source", "fedsol_prox_moon"),
    ("FedSoL + FedNova(ccvr) source", "fedsol_prox_fednova"),
    *((f"Ablation A{i}", f"ablation_a{i}") for i in (0, 2, 3, 4, 5, 6)),  # A1 = FedSoL
]
PERSONALIZED = [
    ("FedAvg-FT", "pers_fedavg_ft"), ("FedSoL-FT", "pers_fedsol_ft"),
    ("FedBABU", "pers_fedbabu"), ("Per-FedAvg (FO)", "pers_perfedavg"),
    ("kNN-Per", "pers_knnper"), ("LocalOnly", "pers_localonly"),
]
PARTITIONS = {"lda": "LDA alpha=0.1", "shard": "shard s=2"}
# every algorithm runs on both partitions; the FedSoL variants of paper Tables 6 and 7 (and
# FedNova's official ccvr variant) on LDA only, to fit the CPU budget
BOTH = {"fedavg", "fedprox", "fedsam", "fedasam", "scaffold", "fednova", "feddyn", "moon",
        "fedntd", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedsol", "fedsol_head"}
LDA_ONLY = {row for _, row in ROWS if row not in BOTH}


def command(part: str, row: str, args: argparse.Namespace, out_dir: str) -> list[str]:
    return [
        sys.executable, "-m", "fl_lightning.cli", "fit",
        "--config", f"configs/mnist/fedavg_{part}.yaml",
        "--config", f"configs/algorithms/{row}.yaml",
        "--data.data_dir", args.data_dir,
        "--trainer.max_steps", str(args.rounds),
        "--model.sample_ratio", str(args.sample_ratio),
        "--model.local_epochs", str(args.local_epochs),
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", out_dir,
        *(["--trainer.callbacks.init_args.epochs", str(args.localonly_epochs)]
          if row == "pers_localonly" and args.localonly_epochs else []),
    ]


def run(part: str, row: str, args: argparse.Namespace) -> dict:
    out_dir = os.path.join(args.runs, part, row)
    return run_cached(
        command(part, row, args, out_dir), out_dir, f"{part} {row}",
        {name: name for name in ("final_metrics.json", "personalized_metrics.json")},
    )


def _shown(cmd: list[str]) -> str:
    """The command as a user types it: ``fl-lightning fit ...`` with the data folder as
    ``DATA_DIR``."""
    args = cmd[3:] if cmd[1:3] == ["-m", "fl_lightning.cli"] else cmd[1:]
    args = ["DATA_DIR" if i and args[i - 1] == "--data.data_dir" else a
            for i, a in enumerate(args)]
    return shlex.join(["fl-lightning", *args])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sample-ratio", type=float, default=0.05)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"),
                   help="the folder holding MNIST (default: $DATA_DIR, else ./data)")
    p.add_argument("--runs", default="runs/algorithm_table")
    p.add_argument("--out", default="docs/results_algorithms_table.md")
    p.add_argument("--only", default="", help="comma-separated row names, run in this order")
    p.add_argument("--personalized", action="store_true")
    p.add_argument("--main", action="store_true",
                   help="only the rows run on both partitions (no Table 6/7 variants)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--localonly-epochs", type=int, default=0,
                   help="LocalOnly's epochs per client (default: the config's official 200)")
    args = p.parse_args()
    rows = PERSONALIZED if args.personalized else ROWS
    if args.only:
        order = args.only.split(",")  # the rows run in the order given
        rows = sorted((r for r in rows if r[1] in order), key=lambda r: order.index(r[1]))
    if args.main and not args.personalized:
        rows = [r for r in rows if r[1] in BOTH]
    parts = ["lda"] if args.personalized else list(PARTITIONS)
    keys = [(part, row) for _, row in rows for part in parts
            if part == "lda" or row not in LDA_ONLY]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(zip(keys, pool.map(lambda key: run(*key, args), keys), strict=True))
    lines = []
    if args.personalized:
        lines += ["| Method | LDA 0.1: personalized acc (mean +- std over clients) | "
                  "before fine-tuning | global test acc | time (s) |", "|---|---|---|---|---|"]
        for label, row in rows:
            r = results[("lda", row)]
            pm, fm = r.get("personalized_metrics.json", {}), r.get("final_metrics.json", {})
            cell = (f"{100 * pm['acc_mean']:.2f} +- {100 * pm['acc_std']:.2f}" if pm
                    else f"failed (rc {r['rc']})")
            before = (f"{100 * pm['before_mean']:.2f} +- {100 * pm['before_std']:.2f}"
                      if pm else "")
            glob_acc = f"{100 * fm['test_acc']:.2f}" if fm else ""
            lines.append(f"| {label} | {cell} | {before} | {glob_acc} | {r['seconds']:.0f} |")
    else:
        lines += ["| Algorithm | config | LDA alpha=0.1 acc (%) | shard s=2 acc (%) | "
                  "time LDA / shard (s) |", "|---|---|---|---|---|"]
        for label, row in rows:
            cells, times = [], []
            for part in parts:
                r = results.get((part, row))
                if r is None:
                    cells.append("not run")
                    times.append("-")
                    continue
                fm = r.get("final_metrics.json")
                cells.append(f"{100 * fm['test_acc']:.2f}" if fm else f"failed (rc {r['rc']})")
                times.append(f"{r['seconds']:.0f}")
            lines.append(f"| {label} | `configs/algorithms/{row}.yaml` | {' | '.join(cells)} | "
                         f"{' / '.join(times)} |")
    lines += ["", "Commands, one per row and partition:", "", "```"]
    for _, row in rows:
        for part in parts:
            if (part, row) in results:
                lines.append(_shown(results[(part, row)]["cmd"]))
    lines += ["```", ""]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
