"""Evaluation time of the global model by evaluation batch size, on the CPU (issue #26).

The global model is evaluated on the whole test split every ``--trainer.val_check_interval``
rounds, in batches of ``--data.eval_batch_size``. This script times that evaluation (the
forward pass, the accuracy and the summed cross-entropy, as ``FederatedModule.evaluate`` and
the validation step compute them) on the MNIST test split (10,000 images) for FedAvgCNN and
MLP2NN, batch sizes 100 / 250 / 500 / 1000 (and any given), on 1 and 2 threads: wall seconds
per evaluation (``time.perf_counter``; process CPU seconds beside them), interleaved repeats
(repeat ``r`` starts at the ``r``-th batch size), median and minimum. It also checks that the
accuracy is the same for every batch size and how far the loss moves (float rounding only).

Example (from the repository root; DATA_DIR holds MNIST/raw)::

    python benchmarks/eval_batch.py --data-dir DATA_DIR --repeats 7 --json runs/bench/eval.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from common import write_json

from fl_lightning.data.datasets import load_dataset
from fl_lightning.models import MLP2NN, FedAvgCNN


@torch.no_grad()
def evaluate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int):
    """Accuracy and mean loss over ``x``, ``y`` in batches of ``batch``."""
    correct, loss = 0, torch.zeros((), dtype=torch.float64)
    for start in range(0, len(y), batch):
        logits = net(x[start:start + batch])
        target = y[start:start + batch]
        correct += int((logits.argmax(1) == target).sum())
        loss += F.cross_entropy(logits, target, reduction="sum").double()
    return correct / len(y), float(loss) / len(y)


def measure(net, x, y, batches: list[int], repeats: int) -> dict[int, dict]:
    """Wall and CPU seconds per evaluation for each batch size (after one warm-up each)."""
    for b in batches:
        evaluate(net, x, y, b)
    wall: dict[int, list[float]] = {b: [] for b in batches}
    cpu: dict[int, list[float]] = {b: [] for b in batches}
    for r in range(repeats):
        for b in batches[r % len(batches):] + batches[:r % len(batches)]:
            w, c = time.perf_counter(), time.process_time()
            evaluate(net, x, y, b)
            wall[b].append(time.perf_counter() - w)
            cpu[b].append(time.process_time() - c)
    results = {b: evaluate(net, x, y, b) for b in batches}
    return {b: {"wall_median": statistics.median(wall[b]), "wall_min": min(wall[b]),
                "cpu_median": statistics.median(cpu[b]), "accuracy": results[b][0],
                "loss": results[b][1]} for b in batches}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.path.join("..", "shared", "data"))
    p.add_argument("--batches", default="100,250,500,1000")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--nets", default="FedAvgCNN,MLP2NN")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    x, y = load_dataset("mnist", args.data_dir, False, "test")
    out: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                 "command": " ".join(sys.argv), "results": {}}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name in args.nets.split(","):
            cls = {"FedAvgCNN": FedAvgCNN, "MLP2NN": MLP2NN}[name]
            torch.manual_seed(0)
            net = cls(10, (1, 28, 28)).eval()
            load = os.getloadavg()[0]
            res = measure(net, x, y, batches, args.repeats)
            out["results"][f"{name} threads={threads}"] = {"load_before": load, "by_batch": res,
                                                           "load_after": os.getloadavg()[0]}
            best = min(res, key=lambda b: res[b]["wall_median"])
            accs = {r["accuracy"] for r in res.values()}
            losses = [r["loss"] for r in res.values()]
            print(f"{name} threads={threads} (load {load:.1f}): " + ", ".join(
                f"{b}: {r['wall_median']:.3f} s (min {r['wall_min']:.3f}, cpu "
                f"{r['cpu_median']:.3f})" for b, r in res.items())
                + f"; fastest {best}; accuracies {sorted(accs)}; loss spread "
                f"{max(losses) - min(losses):.2e}", flush=True)
    write_json(args.json, out)


if __name__ == "__main__":
    main()
