"""Per-round time of the official FedSoL code and of fl-lightning on the same MNIST setup.

Given a checkout of https://github.com/Lee-Gihun/FedSOL (never vendored here), the script runs,
one after another (official FedAvg, ours FedAvg, official FedSoL, ours FedSoL, so a drifting
machine speed affects both alike), ``--rounds`` rounds of the paper's MNIST setup: 100 clients
with 2 label shards each (the official partition, reproduced exactly by
``--data.reference_partition``), 10 clients per round drawn as the official code draws them,
E = 5, B = 50, FedAvgCNN, SGD lr 0.01, momentum 0.9, weight decay 1e-5, FedSoL adaptive with
rho = 2.

Same evaluation work per round. The official round (its own ``Elapsed`` timer: local training,
evaluation, aggregation, global evaluation) evaluates, for every sampled client after its local
training, the client's model on its training set (with the training augmentation), on a
client-aligned test subset (``int(1000 * p_c)`` test samples of each class ``c``, ``p_c`` the
client's label distribution) and on the whole 10,000-image test set; then the new global model
on the test set. fl-lightning evaluates the global model on the test set every round
(``val_check_interval=1``), and the callback :class:`OfficialEvaluationWork` below adds exactly
the per-client evaluations (same samples, large batches). Our round is timed from the start of
the training step to the end of that round's validation.

Running the official code offline: its ``main.py`` calls ``wandb.init``; the script sets
``WANDB_MODE=disabled`` (wandb's documented switch), so nothing is sent or written. It passes
``--device cpu`` and the MNIST options on its command line (documented options only) and makes
``<official>/data/mnist/MNIST/raw`` a symbolic link to ``<data-dir>/MNIST/raw`` (torchvision's
layout), so the official loader finds the files and downloads nothing. No official file is
edited.

Example:
    OMP_NUM_THREADS=1 python benchmarks/vs_official.py --official /work/official_fedsol \
        --python /work/official_venv/bin/python --data-dir /work/shared/data --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fl_lightning.algorithms import FedAvg, FedSoL
from fl_lightning.data.module import FederatedDataModule
from fl_lightning.models.cnn import FedAvgCNN
from fl_lightning.module import FederatedModule

OFFICIAL_CONFIGS = {
    "fedavg": ["--config_path", "configs/baselines/fedavg.json"],
    "fedsol": ["--config_path", "configs/fedsol_adaptive.json", "--rho", "2.0"],
}
OURS = {"fedavg": lambda: FedAvg(), "fedsol": lambda: FedSoL(rho=2.0, temperature=3.0)}
ROUND_LINE = re.compile(r"\[Round (\d+)/\d+\] \(Elapsed ([0-9.]+)s\)")


class OfficialEvaluationWork(pl.Callback):
    """After each round, evaluate every client's model as the official code does.

    Per client: its training set (augmented, as the official ``train`` loader is), a test
    subset aligned with its label distribution (``int(1000 * p_c)`` samples of class ``c``,
    drawn once per client) and the whole test set.
    """

    needs_client_results = True  # reads every client's weights

    def __init__(self, dm: FederatedDataModule, batch_size: int = 1000) -> None:
        self.dm = dm
        self.batch_size = batch_size
        self.aligned: dict[int, torch.Tensor] = {}
        self.samples_evaluated = 0
        self.seconds: list[float] = []

    def _aligned(self, cid: int) -> torch.Tensor:
        if cid not in self.aligned:
            y_train = self.dm.train_y[self.dm.client_indices[cid]]
            prob = torch.bincount(y_train, minlength=10).double() / len(y_train)
            rng = np.random.default_rng(cid)
            picks = []
            for c in range(10):
                pool = torch.nonzero(self.dm.test_y == c).flatten().numpy()
                amount = min(len(pool), int(1000 * float(prob[c])))
                picks.append(rng.choice(pool, amount, replace=False))
            self.aligned[cid] = torch.as_tensor(np.concatenate(picks), dtype=torch.long)
        return self.aligned[cid]

    @torch.no_grad()
    def _evaluate(self, module, params, x: torch.Tensor, y: torch.Tensor) -> float:
        correct, loss_sum = 0, 0.0
        for start in range(0, len(y), self.batch_size):
            xb, yb = x[start:start + self.batch_size], y[start:start + self.batch_size]
            logits = functional_call(module.net, params, (xb,))
            correct += int((logits.argmax(1) == yb).sum())
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        self.samples_evaluated += len(y)
        return correct / max(len(y), 1)

    def on_round_end(self, trainer, module, result) -> None:
        tic = time.perf_counter()
        self._evaluate_clients(module, result)
        self.seconds.append(time.perf_counter() - tic)

    def _evaluate_clients(self, module, result) -> None:
        dm = self.dm
        x_train, y_train = dm.train_tensors(module.device, module.dtype)
        x_test, y_test = dm.test_x.to(module.dtype), dm.test_y
        for client in result.clients:
            idx = dm.client_indices[client.client_id]
            x_local = dm.augment_batch(x_train[idx], result.round, client.client_id, 10**6)
            self._evaluate(module, client.params, x_local, y_train[idx])
            aligned = self._aligned(client.client_id)
            self._evaluate(module, client.params, x_test[aligned], y_test[aligned])
            self._evaluate(module, client.params, x_test, y_test)


class _RoundClock(pl.Callback):
    """Seconds from the start of a round's training step to the end of its validation, and
    of the validation (global test evaluation) alone."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.validation_seconds: list[float] = []
        self._start = self._val_start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self._start)
        self.validation_seconds.append(now - self._val_start)


def _link_data(official: str, data_dir: str) -> None:
    target = os.path.abspath(os.path.join(data_dir, "MNIST", "raw"))
    folder = os.path.join(official, "data", "mnist", "MNIST")
    os.makedirs(folder, exist_ok=True)
    link = os.path.join(folder, "raw")
    if not os.path.lexists(link):
        os.symlink(target, link)


def run_official(args, algorithm: str) -> dict:
    cmd = [
        args.python, "main.py", *OFFICIAL_CONFIGS[algorithm], "--dataset_name", "mnist",
        "--model_name", "fedavg_mnist", "--partition_method", "sharding", "--partition_s", "2",
        "--n_clients", "100", "--batch_size", "50", "--sample_ratio", "0.1",
        "--local_epochs", str(args.local_epochs), "--n_rounds", str(args.rounds),
        "--device", "cpu",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=args.official, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if proc.returncode != 0:
        raise RuntimeError(f"official {algorithm} failed: {proc.stderr[-2000:]}")
    rounds = [float(s) for _, s in ROUND_LINE.findall(proc.stdout)]
    return {"seconds_per_round": rounds, "wall_seconds": wall, "command": " ".join(cmd)}


def run_ours(args, dm: FederatedDataModule, algorithm: str) -> dict:
    pl.seed_everything(0, verbose=False)
    module = FederatedModule(
        net=FedAvgCNN, algorithm=OURS[algorithm](), num_classes=10, input_shape=(1, 28, 28),
        sample_ratio=0.1, local_epochs=args.local_epochs, batch_size=50, local_lr=0.01,
        lr_decay=0.99, momentum=0.9, weight_decay=1e-5,
    )
    clock, work = _RoundClock(), OfficialEvaluationWork(dm)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.rounds, val_check_interval=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[clock, work], default_root_dir=args.work_dir,
    )
    tic = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return {"seconds_per_round": clock.seconds, "wall_seconds": time.perf_counter() - tic,
            "client_evaluation_seconds": work.seconds,
            "global_evaluation_seconds": clock.validation_seconds,
            "client_samples_evaluated_per_round": work.samples_evaluated / args.rounds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="checkout of Lee-Gihun/FedSOL")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter with the official code's requirements (wandb, einops)")
    parser.add_argument("--data-dir", default="data", help="folder holding MNIST/raw")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--algorithms", nargs="+", default=list(OURS))
    parser.add_argument("--out", default="runs/bench/vs_official.json")
    parser.add_argument("--work-dir", default="runs/bench/work")
    parser.add_argument("--ours-only", action="store_true",
                        help="skip the official runs (e.g. to see where our round's time goes)")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.official, "main.py")):
        raise SystemExit(f"--official {args.official}: no main.py there (a FedSOL checkout?)")
    torch.set_num_threads(1)
    _link_data(args.official, args.data_dir)
    dm = FederatedDataModule(
        dataset="mnist", data_dir=args.data_dir, num_clients=100, partition="shard",
        shards_per_client=2, seed=19940817, reference_partition=True, sampling="official",
        eval_batch_size=1000,
    )
    dm.setup("fit")
    results: dict[str, dict] = {}
    for algorithm in args.algorithms:
        if not args.ours_only:
            results[f"official/{algorithm}"] = run_official(args, algorithm)
            print(f"official {algorithm}: "
                  f"{results[f'official/{algorithm}']['seconds_per_round']}", flush=True)
        results[f"ours/{algorithm}"] = run_ours(args, dm, algorithm)
        print(f"ours {algorithm}: {results[f'ours/{algorithm}']['seconds_per_round']}",
              flush=True)
    summary = {}
    for algorithm in [] if args.ours_only else args.algorithms:
        off = statistics.mean(results[f"official/{algorithm}"]["seconds_per_round"])
        ours = statistics.mean(results[f"ours/{algorithm}"]["seconds_per_round"])
        summary[algorithm] = {"official_s": off, "ours_s": ours, "speedup": off / ours}
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "config": {"dataset": "mnist", "partition": "shard s=2 (official procedure)",
                   "num_clients": 100, "clients_per_round": 10,
                   "local_epochs": args.local_epochs, "batch_size": 50, "rounds": args.rounds},
        "runs": results, "summary": summary,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print("\n| algorithm | official s / round | fl-lightning s / round | speed-up |")
    print("|---|---:|---:|---:|")
    for algorithm, row in summary.items():
        print(f"| {algorithm} | {row['official_s']:.1f} | {row['ours_s']:.1f} | "
              f"{row['speedup']:.1f}x |")
    return out


if __name__ == "__main__":
    main()
