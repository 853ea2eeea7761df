"""A sweep of R seeds as R separate ``fl-lightning fit`` processes vs one process with R
replicas (``--replicas.seed``), for the sequential and the batched engine.

Workloads (see ``docs/benchmarks.md``, "Sweeps"):

- ``synthetic``: the FedProx paper's logistic regression on Synthetic(1, 1)
  (``configs/fedprox/synthetic.yaml`` + ``fedprox_mu1.yaml``: 30 devices, 10 per round, E = 20,
  B = 10, FedProx mu = 1), shortened to ``--rounds`` rounds, evaluated every round, with the
  config's ``GlobalObjective`` callback (the training loss ``F(w)`` every round; replicas
  measure every replica with its own copy); ``--no-objective`` leaves it out on both sides;
- ``mnist2nn``: the 2NN on MNIST (``configs/mnist/systems_2nn.yaml``: 100 IID clients, 10 per
  round, E = 1, B = 10 here, FedAvg), ``--rounds`` rounds, evaluated at the end.

Every run writes its usual outputs (metrics, checkpoint, final metrics) into its own folder.
The processes run one after another with ``OMP_NUM_THREADS=1`` (one core); for each side the
wall time, the CPU time (user + system of the process) and the peak RSS are measured with
``os.wait4``; the 1-minute load average is recorded before and after. Sides are interleaved
per repeat, so both see the same load.

Example::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/sweep.py --workload synthetic \\
        --seeds 8 --rounds 20 --json runs/bench/sweep_synthetic.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = {"sequential": "SequentialEngine", "batched": "BatchedEngine"}


def workload_args(name: str, rounds: int, data_dir: str, objective: bool = True) -> list[str]:
    """The ``fit`` options of the workload (without seed and output folder)."""
    if name == "synthetic":
        return [
            "--config", os.path.join(ROOT, "configs/fedprox/synthetic.yaml"),
            "--config", os.path.join(ROOT, "configs/fedprox/fedprox_mu1.yaml"),
            *([] if objective else ["--trainer.callbacks=[]"]),
            "--trainer.max_steps", str(rounds),
        ]
    return [
        "--config", os.path.join(ROOT, "configs/mnist/systems_2nn.yaml"),
        "--model.batch_size", "10", "--data.data_dir", data_dir,
        "--trainer.max_steps", str(rounds), "--trainer.val_check_interval", str(rounds),
    ]


def run(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall time, CPU seconds and peak RSS (MiB)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise SystemExit(f"sweep: {' '.join(cmd[3:8])}... failed: {' | '.join(tail)}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "rss_mib": usage.ru_maxrss / 1024}


def side(workload: list[str], engine: str, seeds: list[int], replicas: bool,
         folder: str, alone: int = 0) -> dict:
    """R processes (``replicas=False``; only the first ``alone`` measured and the total
    scaled, when given) or one process with R replicas."""
    base = [sys.executable, "-m", "fl_lightning.cli", "fit", *workload,
            "--model.engine", ENGINES[engine], "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]
    if replicas:
        out = run([*base, "--trainer.default_root_dir", os.path.join(folder, "replicas"),
                   "--replicas.seed", ",".join(map(str, seeds))])
        return {**out, "processes": 1}
    total = {"wall": 0.0, "cpu": 0.0, "rss_mib": 0.0, "processes": len(seeds)}
    measured = seeds[:alone or len(seeds)]
    for s in measured:
        out = run([*base, "--trainer.default_root_dir", os.path.join(folder, f"seed{s}"),
                   "--seed_everything", str(s), "--data.seed", str(s)])
        total["wall"] += out["wall"]
        total["cpu"] += out["cpu"]
        total["rss_mib"] = max(total["rss_mib"], out["rss_mib"])
    if len(measured) < len(seeds):  # the other processes are estimated as the mean of these
        scale = len(seeds) / len(measured)
        total.update(wall=total["wall"] * scale, cpu=total["cpu"] * scale,
                     measured_processes=len(measured))
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=("synthetic", "mnist2nn"), default="synthetic")
    p.add_argument("--seeds", type=int, default=8, help="R, the number of seeds")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--engines", default="sequential,batched")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--side", choices=("both", "processes", "replicas"), default="both",
                   help="measure one side only (e.g. the two sides at the same time, in two "
                   "invocations)")
    p.add_argument("--alone", type=int, default=0,
                   help="measure only this many of the R separate processes and scale their "
                   "total by R / alone (0: all R)")
    p.add_argument("--no-objective", action="store_true",
                   help="synthetic: leave the config's GlobalObjective callback out")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data"))
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    seeds = list(range(args.seeds))
    workload = workload_args(args.workload, args.rounds, args.data_dir, not args.no_objective)
    results = []
    for repeat in range(args.repeats):
        for engine in engines:
            for replicas in [r for r in (False, True)
                             if args.side == "both" or r == (args.side == "replicas")]:
                folder = tempfile.mkdtemp(prefix="sweep-")
                load = os.getloadavg()[0]
                try:
                    out = side(workload, engine, seeds, replicas, folder, args.alone)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
                out.update(engine=engine, replicas=replicas, repeat=repeat, load_before=load,
                           load_after=os.getloadavg()[0])
                results.append(out)
                what = f"1 process x {args.seeds} replicas" if replicas else \
                    f"{args.seeds} processes"
                print(f"{args.workload} {engine:10s} {what:24s} wall {out['wall']:7.1f} s  "
                      f"cpu {out['cpu']:7.1f} s  peak RSS {out['rss_mib']:6.0f} MiB  "
                      f"load {load:.1f}-{out['load_after']:.1f}", flush=True)
    for engine in engines:
        rows = [r for r in results if r["engine"] == engine]
        alone = sum(r["wall"] for r in rows if not r["replicas"])
        together = sum(r["wall"] for r in rows if r["replicas"])
        cpu_alone = sum(r["cpu"] for r in rows if not r["replicas"])
        cpu_together = sum(r["cpu"] for r in rows if r["replicas"])
        if not (alone and together):
            continue
        print(f"{args.workload} {engine}: {args.seeds} processes / 1 process with replicas = "
              f"{alone / together:.2f}x wall, {cpu_alone / cpu_together:.2f}x CPU")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"workload": args.workload, "seeds": args.seeds, "rounds": args.rounds,
                       "objective": not args.no_objective, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
