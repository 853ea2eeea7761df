"""fl-lightning against Flower's simulation and pfl-research on the same federated workloads.

Workloads (MNIST, 100 IID clients of the same partition, 10 sampled per round, E = 1, no
augmentation, the global model evaluated on the 10,000 test images after every round):

- ``W1``: McMahan et al.'s 2NN (784-200-200-10), B = 10, local SGD lr 0.05, no momentum;
  a small model, where a simulator's own cost per client and per step shows;
- ``W2``: FedAvgCNN, B = 50, local SGD lr 0.01, momentum 0.9; compute-bound.

Frameworks:

- ``fl_lightning``: the ``fl-lightning fit`` command line (``LightningCLI``), sequential
  engine, validation every round (``--trainer.val_check_interval 1``);
- ``flower``: Flower's simulation runtime (``flwr.simulation.run_simulation`` with a
  ``ServerApp`` running the message-API ``FedAvg`` strategy and a ``ClientApp`` whose train
  function is the usual PyTorch loop: ``DataLoader(shuffle=True)``, ``loss.backward()``,
  ``torch.optim.SGD``); one client actor (``client_resources.num_cpus`` = all CPUs) and one
  torch thread, so every framework computes on one core; central evaluation through
  ``evaluate_fn``;
- ``pfl``: pfl-research's simulation (``SimulatedBackend``, ``FederatedAveraging``,
  ``PyTorchModel``), central evaluation in a callback;
- ``fl_lightning_fedsol``: fl-lightning with ``--model.algorithm FedSoL`` (rho 2, adaptive) on
  the same workload, for FedSoL's cost per round relative to FedAvg's.

Each (framework, workload) is one fresh process; the processes run in turn and the sequence is
repeated (``--repeats``), so a drifting machine affects all alike. Reported per framework:
s/round, wall clock (min and median over the rounds after the first of every repeat; a round
is training plus aggregation plus the central evaluation) and CPU seconds per round of the
whole process tree (Ray's processes included; robust to other jobs on a shared machine),
start-up (process start to the first round), peak memory (the largest sum of the resident
sets of the process and all its descendants, sampled every 0.1 s; pages shared between
processes, e.g. Ray's object store, count once per process), the test accuracy after the
last round and the machine's 1-minute load average during the run (lowest and highest of
samples every 5 s), since on a shared machine that says what the wall clock means.

Flower and pfl are not dependencies of fl-lightning: install them into a separate environment
and pass its interpreter with ``--peer-python``. The peers' runs also use the project (its data
partition and models), so that environment needs the project's dependencies too: install the
project itself there with the ``peers`` extra (``/path/to/venv/bin/pip install -e ".[peers]"``
from the repository root). Before any run, the script imports in ``--peer-python`` what the
selected peers need and stops with one line naming the missing module and this command.

Example:
    OMP_NUM_THREADS=1 python benchmarks/peers.py --data-dir ../shared/data --rounds 5 \
        --repeats 2 --peer-python /path/to/venv/bin/python --json runs/bench/peers.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKLOADS = {
    "W1": {"net": "mlp2nn", "batch": 10, "lr": 0.05, "momentum": 0.0},
    "W2": {"net": "cnn", "batch": 50, "lr": 0.01, "momentum": 0.9},
}
FRAMEWORKS = ("fl_lightning", "flower", "pfl", "fl_lightning_fedsol")
CLIENTS, PER_ROUND, EVAL_BATCH = 100, 10, 1000
MARK = "PEERS_RESULT "


# ---------------------------------------------------------------------------- shared pieces
def _threads() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def _net(name: str):
    from fl_lightning.models import MLP2NN, FedAvgCNN

    return MLP2NN(10, (1, 28, 28)) if name == "mlp2nn" else FedAvgCNN(10, (1, 28, 28))


_DATA: dict = {}


def _data(data_dir: str):
    """MNIST (normalized tensors) and the same IID partition fl-lightning uses (seed 0)."""
    if "dm" not in _DATA:
        from fl_lightning.data.module import FederatedDataModule

        dm = FederatedDataModule(dataset="mnist", data_dir=data_dir, num_clients=CLIENTS,
                                 partition="iid", augment="none", seed=0)
        dm.setup("fit")
        _DATA["dm"] = dm
    return _DATA["dm"]


def _accuracy(net, x, y) -> float:
    import torch

    net.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(y), EVAL_BATCH):
            correct += int((net(x[s:s + EVAL_BATCH]).argmax(1) == y[s:s + EVAL_BATCH]).sum())
    net.train()
    return correct / len(y)


def _local_train(net, x, y, w: dict, seed: int) -> None:
    """The usual PyTorch client loop (what a Flower user writes in a ClientApp)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    opt = torch.optim.SGD(net.parameters(), lr=w["lr"], momentum=w["momentum"])
    loader = DataLoader(TensorDataset(x, y), batch_size=w["batch"], shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    net.train()
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        opt.step()


def _proc_tree(pid: int) -> tuple[int, float]:
    """Resident bytes and CPU seconds (user + system) of ``pid`` and all its descendants
    (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[int, float]] = {}
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            stats[int(entry)] = (int(fields[21]) * page,
                                 (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, IndexError, ValueError):
            continue
    rss, cpu, todo = 0, 0.0, [pid]
    while todo:
        p = todo.pop()
        r, c = stats.get(p, (0, 0.0))
        rss, cpu = rss + r, cpu + c
        todo.extend(children.get(p, []))
    return rss, cpu


def _mark() -> list[float]:
    """``[wall time, CPU seconds of the child's process tree]`` at a round boundary."""
    return [time.time(), _proc_tree(int(os.environ["PEERS_ROOT_PID"]))[1]]


def _emit(**result) -> None:
    print(MARK + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------- fl-lightning
if os.environ.get("PEERS_CHILD") == "fl_lightning":  # Lightning only where it is used
    import lightning.pytorch as pl

    class RoundClock(pl.Callback):
        """Time of the first round's start and of the end of every round's validation."""

        def __init__(self) -> None:
            self.start = None
            self.ends: list[list[float]] = []
            self.acc: float | None = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if self.start is None:
                self.start = _mark()

        def on_validation_end(self, trainer, module) -> None:
            if trainer.sanity_checking:
                return
            self.ends.append(_mark())
            self.acc = float(trainer.callback_metrics["val_acc"])

        def on_train_end(self, trainer, module) -> None:
            _emit(start=self.start, ends=self.ends, accuracy=self.acc)


def child_fl_lightning(w: dict, args, fedsol: bool = False) -> None:
    _threads()
    from fl_lightning.cli import main

    net = "MLP2NN" if w["net"] == "mlp2nn" else "FedAvgCNN"
    with tempfile.TemporaryDirectory() as tmp:
        main(args=[
            "fit", "--config", os.path.join(ROOT, "configs", "mnist", "systems_2nn.yaml"),
            "--model.net", f"fl_lightning.models.{net}",
            "--model.batch_size", str(w["batch"]), "--model.local_lr", str(w["lr"]),
            "--model.momentum", str(w["momentum"]),
            "--trainer.max_steps", str(args.rounds), "--trainer.val_check_interval", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", tmp,
            "--trainer.callbacks+=peers.RoundClock",
            "--data.data_dir", args.data_dir,
            *(["--model.algorithm", "fl_lightning.algorithms.FedSoL"] if fedsol else []),
        ])


# ---------------------------------------------------------------------------- Flower
def child_flower(w: dict, args) -> None:
    _threads()
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    data_dir, workload = args.data_dir, dict(w)
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        _threads()
        dm = _data(data_dir)
        cid = int(context.node_config["partition-id"])
        idx = dm.client_indices[cid]
        net = _net(workload["net"])
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x_all, y_all = dm.train_tensors()
        rnd = int(msg.content["config"]["server-round"])
        _local_train(net, x_all[idx], y_all[idx], workload, 1000 * rnd + cid)
        content = RecordDict({
            "arrays": ArrayRecord(net.state_dict()),
            "metrics": MetricRecord({"num-examples": len(idx)}),
        })
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()
    clock: dict = {"ends": [], "acc": None}

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _threads()
        dm = _data(data_dir)
        x_test, y_test = dm.test_tensors()
        net = _net(workload["net"])
        torch.manual_seed(0)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            net.load_state_dict(arrays.to_torch_state_dict())
            acc = _accuracy(net, x_test, y_test)
            clock["ends"].append(_mark())
            clock["acc"] = acc
            return MetricRecord({"accuracy": acc})

        strategy = FedAvg(fraction_train=PER_ROUND / CLIENTS, fraction_evaluate=0.0,
                          min_train_nodes=PER_ROUND, min_available_nodes=CLIENTS)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(net.state_dict()),
                       num_rounds=args.rounds, evaluate_fn=evaluate)

    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=CLIENTS,
        backend_config={"client_resources": {"num_cpus": os.cpu_count(), "num_gpus": 0.0},
                        "init_args": {"num_cpus": os.cpu_count(), "include_dashboard": False}},
    )
    # evaluate_fn runs before round 1 (its end is the first round's start) and after each round
    _emit(start=clock["ends"][0], ends=clock["ends"][1:], accuracy=clock["acc"])


# ---------------------------------------------------------------------------- pfl-research
def child_pfl(w: dict, args) -> None:
    _threads()
    import torch
    import torch.nn.functional as F
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    dm = _data(args.data_dir)
    x_all, y_all = dm.train_tensors()
    x_test, y_test = dm.test_tensors()
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net(w["net"])

        def forward(self, x):
            return self.net(x)

        def loss(self, x, y, eval=False):  # noqa: A002 - pfl's signature
            self.eval() if eval else self.train()
            return F.cross_entropy(self(x), y)

        def metrics(self, x, y, eval=False):  # noqa: A002
            self.eval() if eval else self.train()
            loss = F.cross_entropy(self(x), y, reduction="sum").item()
            return {"loss": Weighted(loss, len(y))}

    module = Net()
    model = PyTorchModel(
        model=module,
        local_optimizer_create=lambda params, lr: torch.optim.SGD(params, lr=lr,
                                                                  momentum=w["momentum"]),
        central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0),
    )
    users = {c: [x_all[idx], y_all[idx]] for c, idx in enumerate(dm.client_indices)}
    data = FederatedDataset.from_slices(users, get_user_sampler("random", list(users)))
    clock: dict = {"start": None, "ends": [], "acc": None}

    class Clock(TrainingProcessCallback):
        def on_train_begin(self, *, model):
            clock["start"] = _mark()
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            clock["acc"] = _accuracy(module.net, x_test, y_test)
            clock["ends"].append(_mark())
            return False, Metrics()

    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=args.rounds, evaluation_frequency=args.rounds,
            train_cohort_size=PER_ROUND, val_cohort_size=0),
        backend=SimulatedBackend(training_data=data, val_data=None),
        model=model,
        model_train_params=NNTrainHyperParams(
            local_learning_rate=w["lr"], local_num_epochs=1, local_batch_size=w["batch"]),
        model_eval_params=NNEvalHyperParams(local_batch_size=EVAL_BATCH),
        callbacks=[Clock()],
    )
    _emit(start=clock["start"], ends=clock["ends"], accuracy=clock["acc"])


CHILDREN = {
    "fl_lightning": child_fl_lightning, "flower": child_flower, "pfl": child_pfl,
    "fl_lightning_fedsol": lambda w, args: child_fl_lightning(w, args, fedsol=True),
}


# ---------------------------------------------------------------------------- the parent
#: what a peer's child process imports: the project's dependencies and the peer framework
PEER_IMPORTS = {
    "flower": ["lightning", "torchvision", "fl_lightning.data.module", "flwr.simulation"],
    "pfl": ["lightning", "torchvision", "fl_lightning.data.module", "pfl.model.pytorch"],
}


def check_peer_python(frameworks: list[str], python: str) -> None:
    """Stop with one line when ``python`` cannot import what the selected peers need."""
    modules = sorted({m for f in frameworks for m in PEER_IMPORTS.get(f, [])})
    if not modules:
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE,
                                                       os.environ.get("PYTHONPATH", "")]))
    code = ("import importlib, sys\nfor m in sys.argv[1:]:\n    try:\n"
            "        importlib.import_module(m)\n    except Exception as e:\n"
            "        print(f'{m}: {type(e).__name__}: {e}'); sys.exit(1)")
    try:
        proc = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True,
                              env=env, cwd=ROOT)
        failed = proc.stdout.strip().splitlines()[-1] if proc.returncode else None
        if proc.returncode and not failed:
            failed = (proc.stderr.strip().splitlines() or ["it exited with an error"])[-1]
    except OSError as err:
        failed = f"cannot run it ({err.strerror})"
    if failed:
        pip = os.path.join(os.path.dirname(python), "pip")
        raise SystemExit(
            f"peers.py: error: --peer-python {python} cannot import what the "
            f"{' and '.join(f for f in frameworks if f in PEER_IMPORTS)} runs need ({failed}); "
            "install "
            f"the project with its peers extra there: {pip} install -e \"{ROOT}[peers]\""
        )


def run_one(framework: str, workload: str, args) -> dict:
    python = sys.executable if framework.startswith("fl_lightning") else args.peer_python
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
               RAY_DEDUP_LOGS="0", PEERS_CHILD=framework.split("_fedsol")[0])
    cmd = [python, os.path.abspath(__file__), "--child", framework, "--workload", workload,
           "--rounds", str(args.rounds), "--data-dir", args.data_dir]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True, cwd=ROOT)
    peak = [0]
    loads: list[float] = []
    done = threading.Event()

    def sample() -> None:
        ticks = 0
        while not done.is_set():
            peak[0] = max(peak[0], _proc_tree(proc.pid)[0])
            if ticks % 50 == 0:  # the 1-minute load average, every 5 s
                loads.append(os.getloadavg()[0])
            ticks += 1
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    lines = [ln for ln in out.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(out.splitlines()[-25:])
        raise RuntimeError(f"{framework} {workload} failed (exit {proc.returncode}):\n{tail}")
    res = json.loads(lines[-1][len(MARK):])
    marks = [res["start"], *res["ends"]]
    return {
        "round_s": [b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False)],
        "round_cpu_s": [b[1] - a[1] for a, b in zip(marks, marks[1:], strict=False)],
        "startup_s": res["start"][0] - t0,
        "peak_mib": peak[0] / 2**20,
        "accuracy": res["accuracy"],
        "total_s": time.time() - t0,
        "load_1min": [min(loads), max(loads)] if loads else None,
    }


def summarize(runs: list[dict]) -> dict:
    later = [s for r in runs for s in r["round_s"][1:]] or [s for r in runs for s in r["round_s"]]
    cpu = [s for r in runs for s in r["round_cpu_s"][1:]] or [
        s for r in runs for s in r["round_cpu_s"]]
    return {
        "s_per_round_min": min(later),
        "s_per_round_median": statistics.median(later),
        "cpu_s_per_round_min": min(cpu),
        "cpu_s_per_round_median": statistics.median(cpu),
        "first_round_s_median": statistics.median(r["round_s"][0] for r in runs),
        "startup_s_median": statistics.median(r["startup_s"] for r in runs),
        "peak_mib_max": max(r["peak_mib"] for r in runs),
        "accuracy": [r["accuracy"] for r in runs],
        "load_1min": [min(r["load_1min"][0] for r in runs), max(r["load_1min"][1] for r in runs)],
        "repeats": len(runs),
    }


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data"))
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS[:3]))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peer-python", default=sys.executable,
                        help="interpreter of the environment with flwr[simulation] and pfl")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=FRAMEWORKS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.data_dir = os.path.abspath(args.data_dir)
    if args.child:
        os.environ["PEERS_ROOT_PID"] = str(os.getpid())
        # run from the importable module, not __main__: Ray then pickles the client functions
        # by reference and every actor keeps one copy of the data (_DATA) across clients
        sys.path.insert(0, HERE)
        import peers

        peers.CHILDREN[args.child](WORKLOADS[args.workload], args)
        return None
    frameworks = args.frameworks.split(",")
    check_peer_python(frameworks, args.peer_python)
    out: dict = {"workloads": WORKLOADS, "results": {}, "raw": {}}
    for workload in args.workloads.split(","):
        raw: dict[str, list[dict]] = {f: [] for f in frameworks}
        for r in range(args.repeats):
            order = frameworks[r % len(frameworks):] + frameworks[:r % len(frameworks)]
            for framework in order:
                res = run_one(framework, workload, args)
                raw[framework].append(res)
                print(f"{workload} {framework:12s} repeat {r}: s/round "
                      f"{[round(s, 3) for s in res['round_s']]} CPU s/round "
                      f"{[round(s, 3) for s in res['round_cpu_s']]} start-up "
                      f"{res['startup_s']:.1f} s peak {res['peak_mib']:.0f} MiB acc "
                      f"{res['accuracy']:.4f} load {res['load_1min']}", flush=True)
        out["raw"][workload] = raw
        out["results"][workload] = {f: summarize(raw[f]) for f in frameworks}
    out["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                      "load_average": os.getloadavg()}
    out["command"] = " ".join(["python", "benchmarks/peers.py", *(argv or sys.argv[1:])])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main()
