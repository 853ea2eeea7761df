"""Seconds per round: one process vs Lightning DDP with N CPU processes (gloo), same config.

Runs ``fl-lightning fit`` with the given config files twice per repeat (one process, then
``--trainer.strategy ddp --trainer.accelerator cpu --trainer.devices N``), with a round timer
callback on every rank (``on_train_batch_start`` to ``on_train_batch_end``: the whole round,
including the all-reduce or the all-gather of client results). The first round of each run is
an untimed warm-up; the reported number is the median of the timed rounds of rank 0, and the
fastest over the repeats (other jobs on a shared machine only add time). Each run also reports
``ddp_gather_bytes`` (bytes each rank received per round when the results are all-gathered),
``ddp_reduce_bytes`` (bytes each rank sent to the all-reduce of the round's sums) and the peak
RSS of every rank. ``--one-process-threads 2`` gives the one-process run as many threads as
the DDP ranks have together (with ``OMP_NUM_THREADS=1`` set for the DDP ranks: "equal total
threads"); ``--code DIR`` runs another checkout's ``fl_lightning`` (e.g. before a change).

Example:
    OMP_NUM_THREADS=1 python benchmarks/ddp_round_time.py --data-dir ../shared/data \\
        --config configs/mnist/fedavg_shard.yaml --rounds 4 --local-epochs 1 \\
        --out runs/bench/ddp_fedavg.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]


class RoundTimer(pl.Callback):
    """Writes every round's wall time of this rank to ``<out>/rounds_rank<r>.json``."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer, pl_module) -> None:
        import resource

        Path(self.out, f"rounds_rank{trainer.global_rank}.json").write_text(
            json.dumps(self.seconds)
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
        Path(self.out, f"rss_rank{trainer.global_rank}.json").write_text(json.dumps(peak))


def _run(configs: list[str], extra: list[str], devices: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fl_lightning.cli", "fit"]
        for c in configs:
            cmd += ["--config", str(Path(c).resolve())]
        cmd += [
            "--trainer.max_steps", str(args.rounds + 1), "--trainer.val_check_interval",
            str(args.rounds + 1), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.callbacks+=ddp_round_time.RoundTimer", f"--trainer.callbacks.out={tmp}",
            *extra,
        ]
        if args.data_dir:
            cmd += ["--data.data_dir", str(Path(args.data_dir).resolve())]
        if args.local_epochs:
            cmd += ["--model.local_epochs", str(args.local_epochs)]
        if devices > 1:
            cmd += ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
                    "--trainer.devices", str(devices)]
        code = Path(args.code).resolve() if args.code else REPO
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(code), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
        if devices == 1 and args.one_process_threads:
            env["OMP_NUM_THREADS"] = str(args.one_process_threads)
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        seconds = json.loads(Path(tmp, "rounds_rank0.json").read_text())[1:]
        [metrics] = Path(tmp).glob("lightning_logs/fl/version_*/metrics.csv")
        with open(metrics) as fh:
            rows = list(csv.DictReader(fh))
        moved = {}
        for key in ("ddp_gather_bytes", "ddp_reduce_bytes"):
            values = [float(r[key]) for r in rows if r.get(key)]
            moved[key] = values[-1] if values else None
        rss = [json.loads(Path(tmp, f"rss_rank{r}.json").read_text()) for r in range(devices)]
        return {"median_s": statistics.median(seconds), "rounds_s": seconds,
                "peak_rss_mib": rss, **moved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True,
                        help="config file(s), stacked in order")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds (after 1 warm-up)")
    parser.add_argument("--local-epochs", type=int, default=None)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--one-process-threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the one-process run (default: inherited)")
    parser.add_argument("--code", default=None,
                        help="the checkout whose fl_lightning runs (default: this one)")
    parser.add_argument("extra", nargs="*", help="more fl-lightning options (after --)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"one_process": [], f"ddp_{args.devices}": []}
    for _ in range(args.repeats):
        runs["one_process"].append(_run(args.config, args.extra, 1, args))
        runs[f"ddp_{args.devices}"].append(_run(args.config, args.extra, args.devices, args))
    best = {k: min(r["median_s"] for r in v) for k, v in runs.items()}
    report = {
        "configs": args.config, "extra": args.extra, "rounds": args.rounds,
        "local_epochs": args.local_epochs, "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "seconds_per_round": best,
        "speedup": best["one_process"] / best[f"ddp_{args.devices}"],
        "one_process_threads": args.one_process_threads, "code": args.code,
        "ddp_gather_bytes": runs[f"ddp_{args.devices}"][0]["ddp_gather_bytes"],
        "ddp_reduce_bytes": runs[f"ddp_{args.devices}"][0]["ddp_reduce_bytes"],
        "peak_rss_mib": {k: max((r["peak_rss_mib"] for r in v), key=max)
                         for k, v in runs.items()},
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
