"""Seconds per client-step of the batched vs the sequential engine on the CPU, small models.

With a 1-layer (logistic regression) or the 2NN model a local step is a handful of small
kernels, so the CPU is launch-bound the way a GPU is with small client batches: the ratio
``batched / sequential`` of seconds per client-step is what vmapping the clients saves. MNIST
with 2 label shards per client (100 clients), 10 clients per round, E = 1, B = 50, momentum 0.9,
no augmentation by default (its per-sample cost is the same in both engines and dominates a
linear model's step);
each configuration runs a warm-up round, then ``--repeats`` timed rounds interleaved with the
other configurations (ABAB...), and the fastest is kept.

Example:
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/cpu_engines.py \
        --data-dir ../shared/data --out runs/bench/cpu_engines.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn

from fl_lightning.algorithms import SCAFFOLD, FedAvg, FedSoL
from fl_lightning.algorithms.base import finish_round
from fl_lightning.data.module import FederatedDataModule
from fl_lightning.engine import SequentialEngine
from fl_lightning.engines import BatchedEngine
from fl_lightning.models import MLP2NN


class Linear1(nn.Module):
    """Logistic regression: ``Flatten -> Linear(784, 10)`` (features = the flattened input)."""

    def __init__(self, num_classes: int = 10, input_shape=(1, 28, 28)) -> None:
        super().__init__()
        c, h, w = input_shape
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c * h * w, num_classes)

    def forward_features(self, x):
        return self.flatten(x)

    def forward(self, x):
        return self.classifier(self.forward_features(x))


MODELS = {"linear": Linear1, "2nn": MLP2NN}
ALGORITHMS = {"fedavg": FedAvg, "fedsol": lambda: FedSoL(rho=2.0), "scaffold": SCAFFOLD}
ENGINES = {"sequential": SequentialEngine, "batched": BatchedEngine}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--augment", default="none", choices=("none", "paper"),
                        help="none (default): time the engines, not the per-sample "
                             "augmentation both pay alike")
    parser.add_argument("--out", default="runs/bench/cpu_engines.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dm = FederatedDataModule(dataset="mnist", data_dir=args.data_dir, num_clients=100,
                             partition="shard", seed=0, augment=args.augment)
    dm.setup("fit")
    data = dm.train_tensors("cpu", torch.float32)
    state = {}
    for m in MODELS:
        for a in ALGORITHMS:
            for e in ENGINES:
                torch.manual_seed(0)
                state[(m, a, e)] = (MODELS[m](10, (1, 28, 28)), ALGORITHMS[a](), ENGINES[e]())
    times: dict[str, list[float]] = {}

    def one_round(key, r):
        net, algo, engine = state[key]
        plan = dm.round_plan(r, 10, 1, 50)
        gp = {k: p.detach().clone() for k, p in net.named_parameters()}
        tic = time.perf_counter()
        results = engine.run_round(algo, net, gp, {}, plan, data, 0.01, 0.9, 1e-5)
        new = finish_round(algo, gp, results, num_clients=100,
                           total_samples=plan.total_samples)
        sec = time.perf_counter() - tic
        with torch.no_grad():
            for k, p in net.named_parameters():
                p.copy_(new[k])
        return sec / sum(len(c.batches) for c in plan.clients)

    for key in state:
        one_round(key, 0)
    for r in range(args.repeats):
        for key in state:
            times.setdefault("/".join(key), []).append(one_round(key, 1 + r))
    best = {k: min(v) for k, v in times.items()}
    ratios = {f"{m}/{a}": best[f"{m}/{a}/batched"] / best[f"{m}/{a}/sequential"]
              for m in MODELS for a in ALGORITHMS}
    result = {"seconds_per_client_step": best, "all": times,
              "batched_over_sequential (target <= 0.3)": ratios,
              "load_average": os.getloadavg(), "torch": torch.__version__}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print("| model / algorithm | sequential ms/client-step | batched | batched / sequential |")
    print("|---|---:|---:|---:|")
    for k, v in ratios.items():
        print(f"| {k} | {1e3 * best[k + '/sequential']:.3f} | {1e3 * best[k + '/batched']:.3f} "
              f"| {v:.2f} |")
    print(f"load average {os.getloadavg()}")
    return result


if __name__ == "__main__":
    main()
