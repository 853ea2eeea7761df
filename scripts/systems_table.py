"""Run the systems experiments of docs/systems.md on MNIST and write their tables.

Usage (from the repository root; resumable, a finished run is skipped; one run at a time):

    OMP_NUM_THREADS=1 python scripts/systems_table.py --runs runs/systems \
        --out docs/systems_tables.md [--only robust,dp,compression,participation]

Every row is one command of the form

    fl-lightning fit --config configs/mnist/systems_2nn.yaml \
        [--config configs/algorithms/<algorithm>.yaml] [--config configs/systems/<x>.yaml ...] \
        --data.data_dir DATA_DIR [overrides]

printed in full under its table, with its wall time.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from _run import run_cached

BASE = "configs/mnist/systems_2nn.yaml"
AGGREGATORS = [
    ("mean (FedAvg)", []), ("coordinate median", ["median"]),
    ("trimmed mean (beta=0.2)", ["trimmed_mean"]), ("Multi-Krum (f=2, m=5)", ["krum"]),
    ("norm bounding (M=1)", ["norm_bounding"]),
]
ATTACKS = [
    ("none", None, 0.0), ("sign flip 10%", "sign_flip_20", 0.1),
    ("sign flip 20%", "sign_flip_20", 0.2), ("Gaussian 10%", "gaussian_20", 0.1),
    ("Gaussian 20%", "gaussian_20", 0.2), ("label flip 20%", "label_flip_20", 0.2),
    ("scaling x10 20%", "scaling_20", 0.2),
]
NOISE = [None, 0.3, 0.5, 1.0, 2.0]
COMPRESSION = [
    ("none (float32)", []),
    ("8-bit stochastic quantization", ["--model.compressor.init_args.bits", "8"]),
    ("4-bit stochastic quantization", ["--model.compressor.init_args.bits", "4"]),
    ("2-bit stochastic quantization", ["--model.compressor.init_args.bits", "2"]),
    ("top-k 10% + error feedback", ["--model.compressor.init_args.ratio", "0.1"]),
    ("top-k 1% + error feedback", ["--model.compressor.init_args.ratio", "0.01"]),
]
PARTICIPATION = [("all report", None), ("30% dropouts", "dropouts_30"),
                 ("30% stragglers (half the steps)", "stragglers_30")]
PART_ALGOS = [("FedAvg", None), ("FedProx (mu=0.01)", "fedprox")]


def _systems(*names: str | None) -> list[str]:
    return [a for n in names if n for a in ("--config", f"configs/systems/{n}.yaml")]


def rows() -> dict[str, list[tuple[str, list[str]]]]:
    """``table -> [(run key, extra args)]``."""
    out: dict[str, list[tuple[str, list[str]]]] = {"robust": [], "dp": [], "compression": [],
                                                   "participation": []}
    for a_label, agg in AGGREGATORS:
        for k_label, attack, share in ATTACKS:
            extra = _systems(*agg, attack)
            if attack:
                extra += ["--model.attack.init_args.share", str(share)]
            out["robust"].append((f"{a_label} | {k_label}", extra))
    for z in NOISE:
        extra = [] if z is None else [*_systems("dp"),
                                      "--model.privacy.init_args.noise_multiplier", str(z)]
        out["dp"].append((f"z={z}", extra))
    for label, args in COMPRESSION:
        name = "topk_10" if "top-k" in label else "quantize_8bit" if "bit" in label else None
        out["compression"].append((label, [*_systems(name), *args]))
    for algo_label, algo in PART_ALGOS:
        for p_label, part in PARTICIPATION:
            extra = ([] if algo is None else ["--config", f"configs/algorithms/{algo}.yaml"])
            if algo == "fedprox":
                extra += ["--model.algorithm.init_args.mu", "0.01"]
            out["participation"].append((f"{algo_label} | {p_label}", extra + _systems(part)))
    return out


def command(extra: list[str], out_dir: str, data_dir: str) -> list[str]:
    return [
        sys.executable, "-m", "fl_lightning.cli", "fit", "--config", BASE, *extra,
        "--data.data_dir", data_dir,
        "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", out_dir,
    ]


def run(key: str, extra: list[str], args: argparse.Namespace) -> dict:
    slug = "".join(c if c.isalnum() else "_" for c in key).strip("_")
    out_dir = os.path.join(args.runs, slug)
    cmd = command(extra, out_dir, args.data_dir)
    if args.table_only and not os.path.exists(os.path.join(out_dir, "result.json")):
        return {"cmd": cmd, "seconds": 0.0, "rc": None}
    return run_cached(cmd, out_dir, key, {"final_metrics.json": "final"})


def _acc(r: dict) -> str:
    if r["rc"] is None:
        return "not run"
    return f"{100 * r['final']['test_acc']:.2f}" if "final" in r else f"failed (rc {r['rc']})"


def _shown(cmd: list[str]) -> str:
    """The command as a user types it: ``fl-lightning fit ...`` with the data folder as
    ``DATA_DIR``."""
    args = cmd[3:] if cmd[1:3] == ["-m", "fl_lightning.cli"] else cmd[1:]
    args = ["DATA_DIR" if i and args[i - 1] == "--data.data_dir" else a
            for i, a in enumerate(args)]
    return shlex.join(["fl-lightning", *args])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"),
                   help="the folder holding MNIST (default: $DATA_DIR, else ./data)")
    p.add_argument("--runs", default="runs/systems")
    p.add_argument("--out", default="docs/systems_tables.md")
    p.add_argument("--only", default="dp,compression,participation,robust",
                   help="tables to run, in this order")
    p.add_argument("--table-only", action="store_true",
                   help="write the tables from the finished runs only ('not run' cells)")
    args = p.parse_args()
    tables = rows()
    chosen = [t for t in args.only.split(",") if t]
    results = {t: {k: run(k, e, args) for k, e in tables[t]} for t in chosen}
    lines: list[str] = []
    if "robust" in results:
        res = results["robust"]
        lines += ["### Accuracy (%) under attack: mean vs robust aggregators", "",
                  "| aggregator | " + " | ".join(k for k, _, _ in ATTACKS) + " |",
                  "|---" * (len(ATTACKS) + 1) + "|"]
        for a_label, _ in AGGREGATORS:
            cells = [_acc(res[f"{a_label} | {k}"]) for k, _, _ in ATTACKS]
            lines.append(f"| {a_label} | " + " | ".join(cells) + " |")
    if "dp" in results:
        res = results["dp"]
        lines += ["", "### Accuracy vs epsilon: DP-FedAvg (C=1, delta=1e-5, q=0.1)", "",
                  "| noise multiplier z | epsilon after 30 rounds | test acc (%) |",
                  "|---|---|---|"]
        for key, _ in tables["dp"]:
            r = res[key]
            eps = r.get("final", {}).get("epsilon")
            shown = "-" if r["rc"] is None else "inf (no DP)" if eps is None else f"{eps:.2f}"
            lines.append(f"| {key[2:] if key != 'z=None' else 'no DP'} | {shown} | {_acc(r)} |")
    if "compression" in results:
        res = results["compression"]
        lines += ["", "### Accuracy vs bytes uploaded: compression", "",
                  "| compressor | MB uploaded (30 rounds) | vs float32 | test acc (%) |",
                  "|---|---|---|---|"]
        # without a systems option nothing is counted: 30 rounds x 10 clients x 199,210 float32
        base = 30 * 10 * 199_210 * 4
        for key, _ in tables["compression"]:
            r = res[key]
            b = r.get("final", {}).get("bytes_up_total", base if "final" in r else None)
            ratio = f"{b / base:.4f}" if b and base else "-"
            mb = f"{b / 1e6:.2f}" if b else "-"
            lines.append(f"| {key} | {mb} | {ratio} | {_acc(r)} |")
    if "participation" in results:
        res = results["participation"]
        lines += ["", "### Accuracy (%) under dropouts and stragglers", "",
                  "| algorithm | " + " | ".join(p for p, _ in PARTICIPATION) + " |",
                  "|---" * (len(PARTICIPATION) + 1) + "|"]
        for a_label, _ in PART_ALGOS:
            cells = [_acc(res[f"{a_label} | {p}"]) for p, _ in PARTICIPATION]
            lines.append(f"| {a_label} | " + " | ".join(cells) + " |")
    lines += ["", "Commands (wall time on the machine that ran them):", ""]
    for t in chosen:
        for key, _ in tables[t]:
            r = results[t][key]
            if r["rc"] is not None:
                lines.append(f"- {t} / {key} ({r['seconds']:.0f} s): `{_shown(r['cmd'])}`")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
