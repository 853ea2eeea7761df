"""Start-up, seconds per round and peak RSS of the synthetic population at 1,000 vs 100,000
clients (``--data.dataset synthetic_population``; issue #27 part C).

FedAvg, ``LogisticRegression``, 100 clients per round, E = 1, B = 10, 3 timed rounds after
one untimed warm-up round; every measurement is a fresh process (so the peak RSS is its own)
run as ``prlimit --as=8000000000 python benchmarks/population.py --child N`` with
``OMP_NUM_THREADS=1``; the sizes are run in turn and the sequence is repeated ``--repeats``
times (ABAB...), so a drifting machine speed affects both alike. Reported: the data module's
``setup`` (the sizes of all N clients and the held-out test clients), the process's start-up
until the first round begins (imports, Lightning, setup), the fastest and the median timed
round, the peak RSS (``ru_maxrss``) and the samples generated.

Example:
    OMP_NUM_THREADS=1 python benchmarks/population.py --clients 1000 100000 --repeats 2 \
        --out runs/bench/population.json
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402 - the clock starts before the imports
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402


def _child(num_clients: int, rounds: int, per_round: int) -> dict:
    import resource
    import shutil
    import tempfile

    import lightning.pytorch as pl

    from fl_lightning.algorithms import FedAvg
    from fl_lightning.data.module import FederatedDataModule
    from fl_lightning.models import LogisticRegression
    from fl_lightning.module import FederatedModule

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.first = 0.0
            self.seconds: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.first = self.first or time.perf_counter() - _T0
            self._tic = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.seconds.append(time.perf_counter() - self._tic)

    dm = FederatedDataModule(dataset="synthetic_population", partition="natural",
                             num_clients=num_clients, augment="none", eval_batch_size=100_000)
    tic = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - tic
    pl.seed_everything(0, verbose=False)
    module = FederatedModule(
        net=LogisticRegression, algorithm=FedAvg(), num_classes=10, input_shape=(1, 1, 60),
        sample_ratio=per_round / num_clients, local_epochs=1, batch_size=10, local_lr=0.01,
        momentum=0.0, weight_decay=0.0, lr_decay=1.0)
    clock = Clock()
    work = tempfile.mkdtemp(prefix="population_bench_")  # the fit's own files go there
    trainer = pl.Trainer(default_root_dir=work, accelerator="cpu", devices=1,
                         max_steps=1 + rounds, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[clock])
    trainer.fit(module, datamodule=dm)
    shutil.rmtree(work, ignore_errors=True)
    return {"num_clients": num_clients, "setup_s": setup_s, "startup_s": clock.first,
            "round_s": clock.seconds[1:], "peak_rss_mib":
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "generated_samples": dm.population.generated, "test_samples": len(dm.test_y)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-limit", default="8000000000")
    parser.add_argument("--child", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.rounds, args.per_round)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs: dict[int, list[dict]] = {n: [] for n in args.clients}
    for _ in range(args.repeats):
        for n in args.clients:
            cmd = ["prlimit", f"--as={args.memory_limit}", sys.executable, __file__, "--child",
                   str(n), "--rounds", str(args.rounds), "--per-round", str(args.per_round)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            runs[n].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for n, rs in runs.items():
        rounds = [s for r in rs for s in r["round_s"]]
        rows.append({"num_clients": n, "setup_s": min(r["setup_s"] for r in rs),
                     "startup_s": min(r["startup_s"] for r in rs),
                     "round_s_min": min(rounds), "round_s_median": statistics.median(rounds),
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                     "generated_samples": rs[0]["generated_samples"],
                     "test_samples": rs[0]["test_samples"]})
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end")
    print("| clients | setup (s) | start-up to round 1 (s) | s/round min / median | peak RSS "
          "(MiB) | samples generated (test) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['num_clients']:,} | {r['setup_s']:.3f} | {r['startup_s']:.1f} | "
              f"{r['round_s_min']:.3f} / {r['round_s_median']:.3f} | {r['peak_rss_mib']:.0f} | "
              f"{r['generated_samples']:,} ({r['test_samples']:,}) |")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"rows": rows, "runs": {str(k): v for k, v in runs.items()}}, fh, indent=1)


if __name__ == "__main__":
    main()
