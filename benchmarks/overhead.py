"""Per-client-step cost of the two client engines against a bare PyTorch loop, same batches.

What it measures: the framework's own cost per local step, where compute is small enough for
it to show. For each model and algorithm, one round plan of the data module (``K`` clients,
``S`` local steps each, batch ``B``, no augmentation) is trained three ways from the same
global weights:

- ``bare``: a plain ``nn.Module`` per client, ``loss.backward()`` and ``torch.optim.SGD``
  (FedSoL written the way a PyTorch user would: a KL forward and ``torch.autograd.grad``, the
  adaptive perturbation added to the weights in place, the cross-entropy backward at the
  perturbed weights, the perturbation removed, ``opt.step()``);
- ``sequential``: ``SequentialEngine.run_round`` (the clients one after another);
- ``batched``: ``BatchedEngine.run_round`` (all clients at once, ``torch.vmap``);

and the time per client-step (process CPU time divided by ``K * S``) is compared. The three
are run in turn and the sequence is repeated (``--repeats``), so a drifting machine affects
them alike; a ratio is the median over repeats of the ratio of adjacent measurements.

Models: ``linear`` (one linear layer on the 8x8 digits, 64 -> 10), ``mlp2nn`` (MNIST, the 2NN
of McMahan et al.), ``cnn`` (MNIST, FedAvgCNN). Algorithms: ``fedavg`` and ``fedsol``
(rho 2, adaptive radius, KL proximal term). Local SGD: lr 0.05, no momentum, B = 10.

Example:
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --data-dir ../shared/data \
        --quick --json runs/bench/overhead.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import perturb_, restore_, write_json  # noqa: E402
from torch import nn  # noqa: E402

from fl_lightning.algorithms import FedAvg, FedSoL  # noqa: E402
from fl_lightning.algorithms.fedsol import kl_to_global  # noqa: E402
from fl_lightning.data.module import FederatedDataModule  # noqa: E402
from fl_lightning.engine import RoundPlan, SequentialEngine  # noqa: E402
from fl_lightning.engines import BatchedEngine  # noqa: E402
from fl_lightning.models import MLP2NN, FedAvgCNN  # noqa: E402

LR, BATCH = 0.05, 10
RHO, TEMPERATURE = 2.0, 3.0


def _linear(num_classes: int, input_shape) -> nn.Module:
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))


MODELS = {
    "linear": ("digits", _linear),
    "mlp2nn": ("mnist", lambda n, s: MLP2NN(n, s)),
    "cnn": ("mnist", lambda n, s: FedAvgCNN(n, s)),
}
ALGORITHMS = {"fedavg": FedAvg, "fedsol": lambda: FedSoL(rho=RHO, temperature=TEMPERATURE)}


def bare_round(global_net: nn.Module, local: nn.Module, plan: RoundPlan, x_all, y_all,
               algorithm: str) -> None:
    """The plan trained with a plain module, ``loss.backward()`` and ``torch.optim.SGD``."""
    state = global_net.state_dict()
    for client in plan.clients:
        local.load_state_dict(state)
        opt = torch.optim.SGD(local.parameters(), lr=LR)
        params = list(local.parameters())
        anchors = list(global_net.parameters())
        for idx in client.batches:
            x, y = x_all[idx], y_all[idx]
            if algorithm == "fedsol":
                with torch.no_grad():
                    g_logits = global_net(x)
                kl = kl_to_global(local(x), g_logits, TEMPERATURE)
                grads = torch.autograd.grad(kl, params)
                eps = perturb_(params, anchors, grads, RHO)
            opt.zero_grad()
            loss = F.cross_entropy(local(x), y)
            loss.backward()
            if algorithm == "fedsol":
                restore_(params, eps)
            opt.step()


def _cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def measure(model: str, algorithm: str, args) -> dict:
    dataset, build = MODELS[model]
    clients = 10 if dataset == "digits" else 100  # digits: ~140 training samples per client
    dm = FederatedDataModule(dataset=dataset, data_dir=args.data_dir, num_clients=clients,
                             partition="iid", augment="none", seed=0)
    dm.setup("fit")
    steps = args.steps[model]
    plan = dm.round_plan(0, args.clients_per_round, 1, BATCH)
    for c in plan.clients:
        c.batches = c.batches[:steps]
    client_steps = sum(len(c.batches) for c in plan.clients)
    torch.manual_seed(0)
    net = build(dm.num_classes, dm.input_shape)
    local = build(dm.num_classes, dm.input_shape)
    x_all, y_all = dm.train_tensors()
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    buffers = {k: b.detach() for k, b in net.named_buffers()}
    algo = ALGORITHMS[algorithm]()
    runs = {
        "bare": lambda: bare_round(net, local, plan, x_all, y_all, algorithm),
        "sequential": lambda: SequentialEngine().run_round(
            algo, net, gp, buffers, plan, (x_all, y_all), LR, 0.0, 0.0),
        "batched": lambda: BatchedEngine().run_round(
            algo, net, gp, buffers, plan, (x_all, y_all), LR, 0.0, 0.0),
    }
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.repeats):
        order = names[r % 3:] + names[:r % 3]
        for name in order:
            times[name].append(_cpu_seconds(runs[name]) / client_steps)
    ratio = {
        name: statistics.median(a / b for a, b in zip(times[name], times["bare"], strict=True))
        for name in ("sequential", "batched")
    }
    return {
        "client_steps": client_steps,
        "us_per_client_step_min": {k: 1e6 * min(v) for k, v in times.items()},
        "us_per_client_step_median": {k: 1e6 * statistics.median(v) for k, v in times.items()},
        "seq_over_bare": ratio["sequential"],
        "batched_over_bare": ratio["batched"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data"))
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--models", default="linear,mlp2nn,cnn")
    parser.add_argument("--algorithms", default="fedavg,fedsol")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    args.clients_per_round = 10
    if args.quick:
        args.steps = {"linear": 14, "mlp2nn": 20, "cnn": 4}
        args.repeats = args.repeats or 5
    else:
        args.steps = {"linear": 14, "mlp2nn": 60, "cnn": 20}
        args.repeats = args.repeats or 11
    out = {"seq_over_bare": {}, "batched_over_bare": {}, "details": {}}
    for model in args.models.split(","):
        for algorithm in args.algorithms.split(","):
            key = f"{model}/{algorithm}"
            res = measure(model, algorithm, args)
            out["seq_over_bare"][key] = round(res["seq_over_bare"], 3)
            out["batched_over_bare"][key] = round(res["batched_over_bare"], 3)
            out["details"][key] = res
            med = res["us_per_client_step_median"]
            print(f"{key:16s} us/client-step bare {med['bare']:8.1f}  sequential "
                  f"{med['sequential']:8.1f} ({res['seq_over_bare']:.3f}x)  batched "
                  f"{med['batched']:8.1f} ({res['batched_over_bare']:.3f}x)", flush=True)
    out["machine"] = {
        "platform": platform.platform(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    out["command"] = " ".join(["python", "benchmarks/overhead.py", *(argv or sys.argv[1:])])
    out["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
