"""FedSoL's cost per round relative to FedAvg's on the FedAvg CNN, and its arithmetic floor.

The issue's target is FedSoL / FedAvg <= 2.3 per round on the CNN: a FedSoL step is 3
forwards + 2 backwards (the global model's outputs without gradient, the KL's forward and
backward at ``w``, the cross-entropy's forward and backward at ``w + eps``) plus the adaptive
perturbation, elementwise over the weights; a FedAvg step is 1 forward + 1 backward.

One round of W2's local training (MNIST, IID, ``K`` clients of 600 samples, E = 1, B = 50,
lr 0.01, momentum 0.9, no augmentation, no evaluation) from the same global weights, five ways:

- ``bare_fedavg``: a plain ``nn.Module``, ``loss.backward()``, ``torch.optim.SGD``;
- ``bare_passes``: the same loop doing FedSoL's passes only (the global forward without
  gradient, forward + ``torch.autograd.grad`` of the KL, forward + backward of the
  cross-entropy at the unperturbed weights) and no perturbation arithmetic: the arithmetic
  floor of any FedSoL implementation with this model and these kernels;
- ``bare_fedsol``: ``bare_passes`` plus the adaptive perturbation written per tensor as a
  PyTorch user would (``F.normalize``, added in place and subtracted after the backward);
- ``seq_fedavg``, ``seq_fedsol``: ``SequentialEngine.run_round`` with ``FedAvg`` and
  ``FedSoL(rho=2, adaptive)``.

The bare loops also skip the KL pass at each client's first step, where the adaptive radius is
exactly zero, as ``FedSoL`` does (so every ratio counts the same passes). Process CPU time of
one thread, the five interleaved and repeated (``--repeats``); a ratio is the median over
repeats of the ratio of the measurements of one repeat (``ratios``) and the ratio of the
fastest measurements (``ratios_of_min``). Optionally (``--components``) the
per-step time of one forward without gradient, one forward + backward and the perturbation
arithmetic of the sequential engine are timed too.

Example:
    OMP_NUM_THREADS=1 python benchmarks/fedsol_cost.py --data-dir DATA_DIR --clients 3 \
        --repeats 3 --json runs/bench/fedsol_cost.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import interleaved, perturb_, restore_, write_json  # noqa: E402

from fl_lightning.algorithms import FedAvg, FedSoL  # noqa: E402
from fl_lightning.algorithms.base import LocalContext  # noqa: E402
from fl_lightning.algorithms.fedsol import kl_to_global  # noqa: E402
from fl_lightning.data.module import FederatedDataModule  # noqa: E402
from fl_lightning.engine import SequentialEngine  # noqa: E402
from fl_lightning.models import FedAvgCNN  # noqa: E402

LR, MOMENTUM, BATCH = 0.01, 0.9, 50
RHO, TEMPERATURE = 2.0, 3.0


def bare_round(global_net, local, plan, x_all, y_all, mode: str) -> None:
    """``mode``: ``fedavg``, ``passes`` (FedSoL's passes, no perturbation) or ``fedsol``."""
    state = global_net.state_dict()
    anchors = list(global_net.parameters())
    for client in plan.clients:
        local.load_state_dict(state)
        opt = torch.optim.SGD(local.parameters(), lr=LR, momentum=MOMENTUM)
        params = list(local.parameters())
        for step, idx in enumerate(client.batches):
            x, y = x_all[idx], y_all[idx]
            eps = None
            if mode != "fedavg" and step > 0:  # the adaptive radius is 0 at step 0
                with torch.no_grad():
                    g_logits = global_net(x)
                grads = torch.autograd.grad(kl_to_global(local(x), g_logits, TEMPERATURE),
                                            params)
                if mode == "fedsol":
                    eps = perturb_(params, anchors, grads, RHO)
            opt.zero_grad()
            F.cross_entropy(local(x), y).backward()
            if eps is not None:
                restore_(params, eps)
            opt.step()


def components(net, gp, buffers, x, y, repeats: int) -> dict:
    """Per-step milliseconds of a forward (no gradient), a forward + backward, and FedSoL's
    perturbation arithmetic (``FedSoL._scaled`` and the addition to the weights) in the
    sequential engine, at weights one SGD step away from the global ones."""
    params = {k: v - 0.01 * torch.randn_like(v) for k, v in gp.items()}
    ctx = LocalContext(net=net, global_params=gp, buffers=buffers, round=0, client_id=0,
                       lr=LR, momentum=MOMENTUM)
    ctx.step = 1
    algo = FedSoL(rho=RHO, temperature=TEMPERATURE)
    names = list(params)
    leaves = [params[k].detach().requires_grad_(True) for k in names]
    grads = torch.autograd.grad(F.cross_entropy(ctx.forward(dict(zip(names, leaves,
                                                                        strict=True)), x), y),
                                leaves)
    g = dict(zip(names, grads, strict=True))

    def forward():
        with torch.no_grad():
            ctx.forward(params, x)

    def forward_backward():
        out = ctx.forward(dict(zip(names, leaves, strict=True)), x)
        torch.autograd.grad(F.cross_entropy(out, y), leaves)

    def perturb():
        eps = algo._scaled(dict(g), params, ctx)
        algo._perturbed(params, eps)

    fns = {"forward": forward, "forward_backward": forward_backward, "perturbation": perturb}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.process_time()
            for _ in range(5):
                fn()
            times[k].append((time.process_time() - start) / 5 * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data"))
    parser.add_argument("--clients", type=int, default=3, help="clients per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--components", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dm = FederatedDataModule(dataset="mnist", data_dir=args.data_dir, num_clients=100,
                             partition="iid", augment="none", seed=0)
    dm.setup("fit")
    plan = dm.round_plan(0, args.clients, 1, BATCH)
    steps = sum(len(c.batches) for c in plan.clients)
    torch.manual_seed(0)
    net, local = FedAvgCNN(10, (1, 28, 28)), FedAvgCNN(10, (1, 28, 28))
    x_all, y_all = dm.train_tensors()
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    buffers = {k: b.detach() for k, b in net.named_buffers()}
    fedavg, fedsol = FedAvg(), FedSoL(rho=RHO, temperature=TEMPERATURE)

    def seq(algo):
        return lambda: SequentialEngine().run_round(algo, net, gp, buffers, plan,
                                                    (x_all, y_all), LR, MOMENTUM, 0.0)

    runs = {
        "bare_fedavg": lambda: bare_round(net, local, plan, x_all, y_all, "fedavg"),
        "bare_passes": lambda: bare_round(net, local, plan, x_all, y_all, "passes"),
        "bare_fedsol": lambda: bare_round(net, local, plan, x_all, y_all, "fedsol"),
        "seq_fedavg": seq(fedavg),
        "seq_fedsol": seq(fedsol),
    }
    times = interleaved(runs, args.repeats, report=True)

    def ratio(a: str, b: str) -> float:
        return statistics.median(u / v for u, v in zip(times[a], times[b], strict=True))

    pairs = (("bare_passes", "bare_fedavg"), ("bare_fedsol", "bare_fedavg"),
             ("seq_fedsol", "seq_fedavg"), ("seq_fedavg", "bare_fedavg"),
             ("seq_fedsol", "bare_passes"))

    out = {
        "clients": args.clients, "client_steps": steps,
        "cpu_s_per_round_median": {k: statistics.median(v) for k, v in times.items()},
        "ms_per_client_step_median": {k: 1e3 * statistics.median(v) / steps
                                      for k, v in times.items()},
        # the median over repeats of each repeat's ratio, and the ratio of the fastest runs
        # (other jobs on the machine only ever add time)
        "ratios": {f"{a}/{b}": ratio(a, b) for a, b in pairs},
        "ratios_of_min": {f"{a}/{b}": min(times[a]) / min(times[b]) for a, b in pairs},
    }
    if args.components:
        idx = plan.clients[0].batches[0]
        out["components_ms"] = components(net, gp, buffers, x_all[idx], y_all[idx],
                                          max(5, args.repeats))
    out["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "load_average": os.getloadavg()}
    out["command"] = " ".join(["python", "benchmarks/fedsol_cost.py", *(argv or sys.argv[1:])])
    out["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(json.dumps({k: out[k] for k in ("ms_per_client_step_median", "ratios", "ratios_of_min")},
                     indent=1))
    if "components_ms" in out:
        print("components (ms/step):", {k: round(v, 2) for k, v in out["components_ms"].items()})
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
