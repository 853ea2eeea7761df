"""Seconds per communication round and samples per second, per algorithm and client engine.

Runs the MNIST paper configuration (FedAvgCNN, 100 clients with 2 label shards each, 10 clients
per round, B = 50; E = 5 in the paper, ``--local-epochs`` to shrink it) through the real
Lightning ``Trainer`` and times every round from ``on_train_batch_start`` to
``on_train_batch_end`` (the whole framework: round plan, augmentation, local training,
aggregation, server optimizer step, logging). Each measurement is one fit of ``1 + --rounds``
rounds whose first round is an untimed warm-up; the configurations are run in turn and the
whole sequence is repeated ``--repeats`` times (ABAB...), so a drifting machine speed affects
all of them alike. The reported number is the fastest timed round (other jobs on a shared
machine only add time); the median is printed beside it.

Two bare PyTorch loops give the hardware limit for the same work: the same clients, the same
index batches and the same batched augmentation, FedAvgCNN with ``loss.backward()`` and
``torch.optim.SGD`` on tensors already in memory; ``bare_b50`` steps every client one after
another with batches of B (the sequential engine's work), ``bare_b500`` concatenates the K
clients' batches of a step into one batch of K * B (the batched engine's total batch).

Example:
    OMP_NUM_THREADS=1 python benchmarks/round_time.py --data-dir /work/shared/data \
        --local-epochs 1 --rounds 1 --repeats 2 --out runs/bench/round_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from fl_lightning.algorithms import FedAvg, FedSAM, FedSoL
from fl_lightning.data.module import FederatedDataModule
from fl_lightning.engine import SequentialEngine
from fl_lightning.engines import BatchedEngine
from fl_lightning.models.cnn import FedAvgCNN
from fl_lightning.module import FederatedModule

ALGORITHMS = {
    "fedavg": lambda: FedAvg(),
    "fedsam": lambda: FedSAM(rho=0.1),
    "fedsol": lambda: FedSoL(rho=2.0),
    "fedsol_head": lambda: FedSoL(rho=2.0, perturb_body=False),
}
ENGINES = {"sequential": SequentialEngine, "batched": BatchedEngine}


class _RoundTimer(pl.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


def _datamodule(args) -> FederatedDataModule:
    dm = FederatedDataModule(
        dataset=args.dataset, data_dir=args.data_dir, num_clients=100, partition="shard",
        shards_per_client=2, seed=0, eval_batch_size=10000,
    )
    dm.setup("fit")
    return dm


def _fit_rounds(dm, algorithm: str, engine: str, args) -> list[float]:
    """Seconds of each timed round (the first, warm-up round is dropped)."""
    pl.seed_everything(0, verbose=False)
    module = FederatedModule(
        net=FedAvgCNN, algorithm=ALGORITHMS[algorithm](), engine=ENGINES[engine](),
        num_classes=dm.num_classes, input_shape=dm.input_shape, sample_ratio=0.1,
        local_epochs=args.local_epochs, batch_size=50, local_lr=0.01,
    )
    timer = _RoundTimer()
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, max_steps=1 + args.rounds, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[timer], default_root_dir=args.work_dir,
    )
    trainer.fit(module, datamodule=dm)
    return timer.seconds[1:]


def _bare_rounds(dm, total_batch: bool, args) -> list[float]:
    """The same work as a FedAvg round in a plain PyTorch loop (1 warm-up + ``rounds``)."""
    torch.manual_seed(0)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    net = FedAvgCNN(dm.num_classes, dm.input_shape).to(device)
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    x_all, y_all = dm.train_tensors(device, torch.float32)
    seconds = []
    for r in range(1 + args.rounds):
        plan = dm.round_plan(r, 10, args.local_epochs, 50)
        tic = time.perf_counter()
        if total_batch:  # one model, the K clients' batches of a step concatenated
            net.load_state_dict(start)
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
            for step in range(max(len(c.batches) for c in plan.clients)):
                xs, ys = [], []
                for c in plan.clients:
                    idx = c.batches[step].to(device)
                    xs.append(plan.transform(x_all[idx], r, c.client_id, step))
                    ys.append(y_all[idx])
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(torch.cat(xs)), torch.cat(ys)).backward()
                opt.step()
        else:  # every client from the same start, one after another, batches of B
            for c in plan.clients:
                net.load_state_dict(start)
                opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9,
                                      weight_decay=1e-5)
                for step, idx in enumerate(c.batches):
                    idx = idx.to(device)
                    x = plan.transform(x_all[idx], r, c.client_id, step)
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(net(x), y_all[idx]).backward()
                    opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - tic)
    return seconds[1:]


def summarize(times: dict[str, list[float]], samples: int) -> dict:
    """Rows (fastest round, median, samples/s of the fastest) and the ratios, from the
    fastest round of each configuration: on a shared machine other jobs only ever add time,
    so the minimum is the least disturbed estimate (the median is kept beside it)."""
    rows = {}
    for key, secs in times.items():
        best = min(secs)
        rows[key] = {"seconds_per_round": best, "median_seconds": statistics.median(secs),
                     "samples_per_second": samples / best, "all_seconds": secs}
    sec = {k: r["seconds_per_round"] for k, r in rows.items()}
    ratios = {}
    for engine, bare in (("sequential", "bare_b50"), ("batched", "bare_b500")):
        avg = sec.get(f"fedavg/{engine}")
        if avg is None:
            continue
        if bare in sec:
            ratios[f"{engine}: fedavg / {bare}"] = avg / sec[bare]
        for a in ("fedsam", "fedsol", "fedsol_head"):
            if f"{a}/{engine}" in sec:
                ratios[f"{engine}: {a} / fedavg"] = sec[f"{a}/{engine}"] / avg
    for a in ALGORITHMS:
        if f"{a}/sequential" in sec and f"{a}/batched" in sec:
            ratios[f"{a}: sequential / batched (speed-up of batched)"] = (
                sec[f"{a}/sequential"] / sec[f"{a}/batched"]
            )
    return {"rows": rows, "ratios": ratios}


def print_tables(result: dict) -> None:
    print("\n| configuration | s / round (fastest) | median | samples / s |")
    print("|---|---:|---:|---:|")
    for key, row in result["rows"].items():
        print(f"| {key} | {row['seconds_per_round']:.2f} | {row['median_seconds']:.2f} | "
              f"{row['samples_per_second']:.0f} |")
    print("\n| ratio | value |\n|---|---:|")
    for key, value in result["ratios"].items():
        print(f"| {key} | {value:.2f} |")


def _machine() -> dict[str, str]:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model, "cores": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__, "cuda": "none" if not torch.cuda.is_available()
        else torch.cuda.get_device_name(0),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data", help="folder holding MNIST/raw")
    parser.add_argument("--dataset", default="mnist", help="mnist, or cifar10 (32x32x3)")
    parser.add_argument("--accelerator", default="cpu", help="cpu or gpu")
    parser.add_argument("--local-epochs", type=int, default=5, help="E (the paper: 5)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="ABAB repetitions")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/bench/round_time.json")
    parser.add_argument("--work-dir", default="runs/bench/work",
                        help="where the fits write their final metrics")
    parser.add_argument("--summarize", metavar="JSON",
                        help="only print the tables of an earlier run's JSON (with --out)")
    args = parser.parse_args(argv)
    if args.summarize:  # re-read an earlier run, e.g. one written before the 'times' key
        with open(args.summarize) as fh:
            result = json.load(fh)
        times = result.get("times") or {k: r["all_seconds"] for k, r in result["rows"].items()}
        result.update(times=times, **summarize(times, result["config"]["samples_per_round"]))
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
        print_tables(result)
        return result
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    dm = _datamodule(args)
    configs = [(a, e) for e in args.engines for a in args.algorithms]
    times: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        for name, total in (("bare_b50", False), ("bare_b500", True)):
            times.setdefault(name, []).extend(_bare_rounds(dm, total, args))
        for algorithm, engine in configs:
            key = f"{algorithm}/{engine}"
            times.setdefault(key, []).extend(_fit_rounds(dm, algorithm, engine, args))
            print(f"repeat {rep}: {key} {times[key][-1]:.2f} s", flush=True)
    # samples per timed round (shard s=2: every client has the same size)
    samples = sum(len(b) for c in dm.round_plan(1, 10, args.local_epochs, 50).clients
                  for b in c.batches)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "config": {"dataset": args.dataset, "partition": "shard s=2", "num_clients": 100,
                   "clients_per_round": 10, "local_epochs": args.local_epochs,
                   "batch_size": 50, "samples_per_round": samples,
                   "rounds_timed_per_fit": args.rounds, "repeats": args.repeats},
        "times": times,
    }
    result.update(summarize(times, samples))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print_tables(result)
    return result


if __name__ == "__main__":
    main()
