"""One-call GPU benchmark suite: what a session lent a GPU runs, in at most ~8 minutes.

Needs only torch, lightning, torchvision (and numpy) plus this repository on ``PYTHONPATH``: it
drives the client engines directly (no CLI, so no jsonargparse), on MNIST read from
``--data-dir`` (torchvision's ``MNIST/raw`` layout). Sections, each a key of the JSON:

- ``profile``: per local step of one FedAvg round, the CUDA kernels, memcpys and
  synchronizations (``torch.profiler``) of both engines (on a CPU: the operator count);
- ``rounds``: seconds per round (fastest of ``--repeats`` after a warm-up round) of the
  sequential and the batched engine x {FedAvg, FedSoL, FedSoL head-only, SCAFFOLD}; FedAvgCNN,
  100 clients with 2 label shards each, 10 clients per round, E = 5, B = 50, lr 0.01,
  momentum 0.9, weight decay 1e-5 (the paper's MNIST setup; ``--smoke``: 20 clients, 4 per
  round, E = 1, B = 10);
- ``bare``: a centralized plain PyTorch loop (``loss.backward()``, ``torch.optim.SGD``) over
  the same number of steps at the same total batch (10 x 50), the throughput limit of a
  batched round; ``ratios`` gives batched FedAvg / bare;
- ``scaffold_1000``: 1000 SCAFFOLD clients (every client's ``c_i`` stored), 100 per round,
  batched: ``torch.cuda.max_memory_allocated`` and seconds per round;
- ``grouped_conv``: FedAvgCNN forward + backward of 10 clients as one vmapped call (grouped
  convolutions) against 10 dense per-client calls: max |difference| of the gradients and the
  time of each.

Engine and device options are off by default so that the numbers are comparable; each is
handed to every ``BatchedEngine`` the suite builds (``fl_lightning.engines.BatchedEngine``,
docs/engines.md) and recorded under ``config`` in the JSON:

- ``--compile none|default|reduce-overhead|max-autotune`` and ``--compile-backend`` (default
  inductor): ``torch.compile`` of the whole local step (``reduce-overhead``: CUDA graphs);
  the warm-up round pays the compilation;
- ``--tf32``, ``--cudnn-benchmark`` (the engine's flags, also set process-wide here for the
  sequential engine and the bare loop), ``--channels-last`` (NHWC model, data and stacked
  client weights), ``--autocast bf16`` (bfloat16 autocast of the batched local step);
- ``--bf16``: bfloat16 weights and data everywhere (not autocast).

``--sections`` and ``--algorithms`` run a subset (e.g. only ``rounds`` of ``fedavg`` with
another compile mode); ``--smoke`` shrinks everything to seconds and skips the warm-up rounds
(the unit tests run ``--device cpu --smoke`` on tiny MNIST files).

Example:
    PYTHONPATH=$PWD python benchmarks/gpu_suite.py --data-dir ../shared/data \
        --out runs/bench/gpu_suite.json
    PYTHONPATH=$PWD python benchmarks/gpu_suite.py --data-dir ../shared/data \
        --compile reduce-overhead --tf32 --sections rounds,bare \
        --out runs/bench/gpu_suite_cudagraphs.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from fl_lightning.algorithms import SCAFFOLD, FedAvg, FedSoL
from fl_lightning.algorithms.base import finish_round
from fl_lightning.data.module import FederatedDataModule
from fl_lightning.engine import SequentialEngine
from fl_lightning.engines import BatchedEngine
from fl_lightning.engines.batched import AUTOCAST, COMPILE_MODES
from fl_lightning.models.cnn import FedAvgCNN

ALGORITHMS = {
    "fedavg": FedAvg,
    "fedsol": lambda: FedSoL(rho=2.0),
    "fedsol_head": lambda: FedSoL(rho=2.0, perturb_body=False),
    "scaffold": SCAFFOLD,
}
SECTIONS = ("profile", "rounds", "bare", "grouped_conv", "scaffold_1000")
LR, MOMENTUM, WD = 0.01, 0.9, 1e-5


def engine_options(args) -> dict:
    """The ``BatchedEngine`` keyword arguments the command line asks for."""
    return {"compile": args.compile, "compile_backend": args.compile_backend,
            "tf32": args.tf32, "cudnn_benchmark": args.cudnn_benchmark,
            "channels_last": args.channels_last, "autocast": args.autocast}


def engines(args) -> dict:
    """Engine name -> a factory of fresh engines (the batched one with the asked options)."""
    options = engine_options(args)
    return {"sequential": SequentialEngine, "batched": lambda: BatchedEngine(**options)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Setup:
    """Data, model and round plans of one configuration."""

    def __init__(self, args, num_clients: int, per_round: int, epochs: int) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if args.bf16 else torch.float32
        self.dm = FederatedDataModule(
            dataset="mnist", data_dir=args.data_dir, num_clients=num_clients, partition="shard",
            shards_per_client=2, seed=0, verify_checksums=not args.no_verify,
        )
        self.dm.setup("fit")
        self.per_round, self.epochs = per_round, epochs
        self.batch = 10 if args.smoke else 50
        self.data = self.dm.train_tensors(self.device, self.dtype)
        if args.channels_last:
            self.data = (self.data[0].contiguous(memory_format=torch.channels_last),
                         self.data[1])

    def net(self) -> torch.nn.Module:
        torch.manual_seed(0)
        net = FedAvgCNN(10, self.dm.input_shape).to(self.device, self.dtype)
        if self.args.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net

    def plan(self, round_idx: int):
        return self.dm.round_plan(round_idx, self.per_round, self.epochs, self.batch)


def _round(setup: _Setup, engine, algorithm, net, round_idx: int) -> float:
    """One round (engine, commit, server rule, new global weights); its seconds."""
    plan = setup.plan(round_idx)
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    buffers = {k: b.detach() for k, b in net.named_buffers()}
    _sync(setup.device)
    tic = time.perf_counter()
    results = engine.run_round(algorithm, net, gp, buffers, plan, setup.data, LR, MOMENTUM, WD)
    new = finish_round(algorithm, gp, results, num_clients=plan.num_clients,
                       total_samples=plan.total_samples)
    with torch.no_grad():
        for k, p in net.named_parameters():
            p.copy_(new[k])
    _sync(setup.device)
    return time.perf_counter() - tic


def _warm(args) -> int:
    """Untimed warm-up rounds before a measurement: 1 (compilation, first allocations,
    SCAFFOLD's first state), 0 under ``--smoke``, whose numbers only show that it runs."""
    return 0 if args.smoke else 1


def _steps(setup: _Setup, round_idx: int) -> int:
    return max(len(c.batches) for c in setup.plan(round_idx).clients)


def bench_rounds(setup: _Setup, args) -> dict:
    out = {}
    for engine_name, engine_cls in engines(args).items():
        for algo_name in args.algorithms:
            algo_cls = ALGORITHMS[algo_name]
            net, algorithm, engine = setup.net(), algo_cls(), engine_cls()
            if _warm(args):
                _round(setup, engine, algorithm, net, 0)  # warm-up (and SCAFFOLD's 1st state)
            secs = [_round(setup, engine, algorithm, net, 1 + r) for r in range(args.repeats)]
            out[f"{algo_name}/{engine_name}"] = {
                "seconds_per_round": min(secs), "median": statistics.median(secs),
                "client_steps_per_second": setup.per_round * _steps(setup, 1) / min(secs),
            }
            print(f"rounds {algo_name}/{engine_name}: {min(secs):.3f} s", flush=True)
    return out


def bench_bare(setup: _Setup, args) -> dict:
    """Centralized loop: one model, the 10 clients' batches of a step as one batch of 500."""
    net = setup.net()
    x_all, y_all = setup.data
    secs = []
    for r in range(_warm(args) + args.repeats):
        plan = setup.plan(r)
        opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
        steps = max(len(c.batches) for c in plan.clients)
        idx = [torch.cat([c.batches[s % len(c.batches)] for c in plan.clients]).to(setup.device)
               for s in range(steps)]
        _sync(setup.device)
        tic = time.perf_counter()
        for i in idx:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x_all[i]), y_all[i]).backward()
            opt.step()
        _sync(setup.device)
        secs.append(time.perf_counter() - tic)
    secs = secs[_warm(args):]
    return {"seconds_per_round": min(secs), "median": statistics.median(secs),
            "total_batch": setup.per_round * setup.batch}


def bench_profile(setup: _Setup, args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if setup.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    out = {}
    for engine_name, engine_cls in engines(args).items():
        net, algorithm, engine = setup.net(), FedAvg(), engine_cls()
        if _warm(args):
            _round(setup, engine, algorithm, net, 0)
        with profile(activities=activities) as prof:
            _round(setup, engine, algorithm, net, 1)
        plan = setup.plan(1)
        # client-steps for the sequential engine, vmapped steps for the batched one
        steps = (sum(len(c.batches) for c in plan.clients) if engine_name == "sequential"
                 else max(len(c.batches) for c in plan.clients))
        events = prof.events()
        kernels = sum(1 for e in events if e.device_type.name == "CUDA"
                      and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())
        memcpy = sum(1 for e in events if e.device_type.name == "CUDA"
                     and "memcpy" in e.name.lower())
        syncs = sum(1 for e in events if "synchronize" in e.name.lower())
        ops = sum(1 for e in events if e.device_type.name == "CPU" and e.name.startswith("aten::"))
        out[engine_name] = {
            "steps": steps, "kernels_per_step": kernels / steps,
            "memcpys_per_step": memcpy / steps, "syncs_per_step": syncs / steps,
            "aten_ops_per_step": ops / steps,
        }
        print(f"profile {engine_name}: {out[engine_name]}", flush=True)
    return out


def bench_scaffold_1000(args) -> dict:
    clients, per_round = (20, 5) if args.smoke else (1000, 100)
    setup = _Setup(args, clients, per_round, 1)
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    net, algorithm, engine = setup.net(), SCAFFOLD(), BatchedEngine(**engine_options(args))
    gp = {k: p.detach() for k, p in net.named_parameters()}
    for cid in range(clients):  # the steady state: every client holds a control variate
        algorithm.clients.put(cid, {"c_i": {k: torch.zeros_like(v) for k, v in gp.items()}})
    warm = _warm(args)
    secs = [_round(setup, engine, algorithm, net, r) for r in range(warm + args.repeats)][warm:]
    peak = (torch.cuda.max_memory_allocated(setup.device) if setup.device.type == "cuda"
            else None)
    return {"num_clients": clients, "clients_per_round": per_round, "local_epochs": 1,
            "stored_clients": len(algorithm.clients), "seconds_per_round": min(secs),
            "max_memory_allocated_bytes": peak}


def bench_grouped_conv(setup: _Setup, args) -> dict:
    """10 clients' FedAvgCNN gradients: one vmapped call (grouped conv) vs 10 dense calls."""
    net = setup.net()
    x_all, y_all = setup.data
    k, B = setup.per_round, setup.batch
    params = {n: p.detach().unsqueeze(0).expand(k, *p.shape).clone()
              for n, p in net.named_parameters()}
    x = x_all[: k * B].reshape(k, B, *x_all.shape[1:])
    y = y_all[: k * B].reshape(k, B)

    def loss(p, xb, yb):
        return F.cross_entropy(functional_call(net, p, (xb,)), yb)

    batched = vmap(grad(loss))

    def dense():
        return [grad(loss)({n: v[i] for n, v in params.items()}, x[i], y[i]) for i in range(k)]

    def timed(fn):
        fn()
        best = float("inf")
        for _ in range(args.repeats + 1):
            _sync(setup.device)
            tic = time.perf_counter()
            fn()
            _sync(setup.device)
            best = min(best, time.perf_counter() - tic)
        return best

    def max_diff(dtype) -> float:
        p = {n: v.to(dtype) for n, v in params.items()}
        net.to(dtype)
        gb = vmap(grad(loss))(p, x.to(dtype), y)
        gd = [grad(loss)({n: v[i] for n, v in p.items()}, x[i].to(dtype), y[i])
              for i in range(k)]
        net.to(setup.dtype)
        return max(float((gb[n][i] - gd[i][n]).abs().max()) for i in range(k) for n in gb)

    # the same gradients up to rounding: float64 shows it (the first convolution's weight
    # gradient sums B * H * W products, so its float32 rounding is far above float32's epsilon)
    diff, diff64 = max_diff(setup.dtype), max_diff(torch.float64)
    return {"clients": k, "batch": B, "max_abs_grad_diff": diff,
            "max_abs_grad_diff_float64": diff64,
            "vmap_seconds": timed(lambda: batched(params, x, y)),
            "dense_loop_seconds": timed(dense)}


def _configure(args) -> None:
    torch.set_flush_denormal(True)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    else:
        torch.set_num_threads(args.threads)


def _machine(args) -> dict:
    info = {"platform": platform.platform(), "torch": torch.__version__, "device": args.device,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


def print_table(result: dict) -> None:
    print("\n| configuration | s / round | client-steps / s |")
    print("|---|---:|---:|")
    for key, row in result.get("rounds", {}).items():
        print(f"| {key} | {row['seconds_per_round']:.3f} | "
              f"{row['client_steps_per_second']:.1f} |")
    if "bare" in result:
        print(f"| bare centralized loop, batch {result['bare']['total_batch']} | "
              f"{result['bare']['seconds_per_round']:.3f} | |")
    for key, value in result["ratios"].items():
        print(f"- {key}: {value:.3f}")
    print(f"- config: {json.dumps(result['config'])}")
    for section in ("profile", "scaffold_1000", "grouped_conv"):
        if section in result:
            print(f"- {section}: {json.dumps(result[section])}")


def _names(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"gpu_suite.py: error: {option} {text!r}: "
                         f"use a comma-separated subset of {','.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding MNIST/raw")
    parser.add_argument("--out", default="runs/bench/gpu_suite.json")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per measurement")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (tests)")
    parser.add_argument("--no-verify", action="store_true", help="skip MNIST checksums")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU only)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS),
                        help=f"rounds section: comma-separated subset of {','.join(ALGORITHMS)}")
    parser.add_argument("--compile", default="none", choices=COMPILE_MODES,
                        help="torch.compile mode of the batched local step")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (inductor; eager / aot_eager to test)")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls and convolutions")
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument("--channels-last", action="store_true", help="NHWC inputs and model")
    parser.add_argument("--autocast", default="none", choices=AUTOCAST,
                        help="bfloat16 autocast of the batched local step")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights and data")
    args = parser.parse_args(argv)
    sections = _names(args.sections, SECTIONS, "--sections")
    args.algorithms = _names(args.algorithms, tuple(ALGORITHMS), "--algorithms")
    _configure(args)
    if args.smoke:
        args.repeats = 1
        setup = _Setup(args, 20, 4, 1)
    else:
        setup = _Setup(args, 100, 10, 5)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(args),
        "config": {"clients": setup.dm.num_clients, "clients_per_round": setup.per_round,
                   "local_epochs": setup.epochs, "batch_size": setup.batch, "repeats": args.repeats,
                   "smoke": args.smoke, "bf16": args.bf16, "sections": sections,
                   "algorithms": args.algorithms, "batched_engine": engine_options(args)},
    }
    benches = {
        "profile": lambda: bench_profile(setup, args),
        "rounds": lambda: bench_rounds(setup, args),
        "bare": lambda: bench_bare(setup, args),
        "grouped_conv": lambda: bench_grouped_conv(setup, args),
        "scaffold_1000": lambda: bench_scaffold_1000(args),
    }
    for section in SECTIONS:
        if section in sections:
            result[section] = benches[section]()
    sec = {k: r["seconds_per_round"] for k, r in result.get("rounds", {}).items()}
    result["ratios"] = {}
    if "fedavg/batched" in sec and "bare" in result:
        result["ratios"]["batched fedavg throughput / bare loop (target >= 0.7)"] = (
            result["bare"]["seconds_per_round"] / sec["fedavg/batched"])
    result["ratios"].update({
        f"{a}: sequential / batched (speed-up)": sec[f"{a}/sequential"] / sec[f"{a}/batched"]
        for a in args.algorithms if f"{a}/batched" in sec
    })
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print_table(result)
    return result


if __name__ == "__main__":
    main()
