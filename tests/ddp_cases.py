"""The DDP equivalence cases: one process vs 2 gloo processes, every algorithm kind and mechanism.

Run as a script, it fits the named cases one after another inside the same two DDP processes
(Lightning starts the second process once; later fits reuse the process group), each in its own
folder ``OUT/<case>``, then checks :func:`fl_lightning.distributed.allgather_results` on crafted
results (an idle rank, mixed dtypes, plain-Python extras)::

    PYTHONPATH=$PWD:$PWD/tests python tests/ddp_cases.py OUT scaffold dp median

``tests/test_ddp.py`` runs the same cases in one process (``fit(case, root)``) and compares.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
QUICK = str(REPO / "configs" / "quickstart.yaml")
ALGO = REPO / "configs" / "algorithms"
SYS = REPO / "configs" / "systems"

BASE = [
    "--config", QUICK, "--trainer.max_steps", "2", "--checkpoint_every_n_rounds", "1",
    "--keep_last_checkpoints", "3", "--model.local_epochs", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]
DDP = ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2"]

_CB = "--trainer.callbacks"
#: every analysis callback of fl_lightning.callbacks, on cheap settings
ANALYSIS = [
    f"{_CB}+=HessianEigenvalues", f"{_CB}.every_n_rounds=1", f"{_CB}.k=2", f"{_CB}.num_iter=4",
    f"{_CB}.batch_size=100",
    f"{_CB}+=LossLandscape", f"{_CB}.every_n_rounds=1", f"{_CB}.directions=random",
    f"{_CB}.resolution=3", f"{_CB}.batch_size=100", f"{_CB}.num_batches=1",
    f"{_CB}+=WeightDivergence", f"{_CB}+=GlobalOscillation", f"{_CB}.window=2",
    f"{_CB}+=ClientUpdateDispersion", f"{_CB}.max_samples=50",
    f"{_CB}+=KnowledgePreservation", f"{_CB}.max_samples=100",
    f"{_CB}+=ClassWiseAccuracy", f"{_CB}+=HeterogeneityReport",
    f"{_CB}+=GradientAlignment", f"{_CB}.max_clients=2",
    f"{_CB}+=HeterogeneityFloor", f"{_CB}.every_n_rounds=2", f"{_CB}.num_clients=2",
    f"{_CB}.max_steps=20",
    f"{_CB}+=ClientOptimaProbe", f"{_CB}.every_n_rounds=2", f"{_CB}.num_clients=2",
    f"{_CB}.max_steps=20",
]
#: the files the analysis case must have written (rank zero) when training ended
ANALYSIS_FILES = ("hessian.json", "hessian.png", "landscape_round1.pt", "landscape_round2.png",
                  "divergence.json", "oscillation.json", "dispersion.json", "knowledge.json",
                  "classwise.png", "alignment.json", "floor.json", "optima.json")

#: case -> extra options (after BASE); quickstart = FedSoL on digits, 20 unequal LDA clients,
#: 5 per round.
CASES: dict[str, list[str]] = {
    # the stateless weighted mean: one all-reduce; a comm hook counts DDP's gradient buckets
    "fedsol": ["--trainer.callbacks+=ddp_cases.CommHookCounter"],
    # reduced sums, each client's state held by its owner rank: on disk (SCAFFOLD, resumed
    # below) and in RAM (FedDyn)
    "scaffold": ["--config", str(ALGO / "scaffold.yaml"), "--trainer.max_steps", "3",
                 "--client_state_ram_mb", "0", f"{_CB}+=ddp_cases.ShardRecorder"],
    "feddyn": ["--config", str(ALGO / "feddyn.yaml"), f"{_CB}+=ddp_cases.ShardRecorder"],
    "fednova_ccvr": ["--config", str(ALGO / "fednova.yaml"),
                     "--model.algorithm.ccvr_server_update", "true"],
    "moon": ["--config", str(ALGO / "moon.yaml")],
    "dp": ["--config", str(SYS / "dp.yaml")],
    "median": ["--config", str(SYS / "median.yaml")],
    "secure_dropouts": ["--config", str(SYS / "secure_aggregation.yaml"),
                        "--config", str(SYS / "dropouts_30.yaml")],
    "scaffold_topk_flip_stragglers": [
        "--config", str(ALGO / "scaffold.yaml"), "--config", str(SYS / "topk_10.yaml"),
        "--config", str(SYS / "label_flip_20.yaml"), "--config", str(SYS / "stragglers_30.yaml"),
    ],
    # every analysis callback (each writes files at the end, the landscape every round): the
    # steps every rank must take (trainer.log_dir is a broadcast) are taken on every rank
    "analysis": ANALYSIS,
}
#: resumed under DDP from the round-2 checkpoint of the (DDP) scaffold case, up to round 3
RESUME = ("scaffold_resume", "scaffold", 2, 3)


def resume_args(out: Path) -> list[str]:
    name, source, at, until = RESUME
    ckpt = checkpoint(out / source, at)
    return [*CASES[source], "--trainer.max_steps", str(until), "--ckpt_path", str(ckpt)]


def checkpoint(root: Path, round_: int) -> Path:
    return root / "lightning_logs" / "fl" / "version_0" / "checkpoints" / f"round={round_}.ckpt"


def fit(args: list[str], root: Path) -> None:
    from fl_lightning.cli import main

    root.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(root)
    try:
        main(["fit", *BASE, *args])
    finally:
        os.chdir(here)


class CommHookCounter(Callback):
    """Counts DDP gradient all-reduce buckets (a comm hook sees every one) per rank."""

    def __init__(self) -> None:
        self.calls = 0

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        if trainer.world_size == 1:  # the one-process reference run
            return
        model = trainer.strategy.model
        assert isinstance(model, DistributedDataParallel)

        def counting(state, bucket):
            self.calls += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting)

    def on_train_end(self, trainer, pl_module) -> None:
        Path(f"comm_calls_rank{trainer.global_rank}.json").write_text(
            json.dumps({"calls": self.calls, "world": trainer.world_size})
        )


class ShardRecorder(Callback):
    """Writes ``shards_rank<r>.json``: the clients this rank's store holds at the end and what
    each round moved between ranks (``ddp_gather_bytes``, ``ddp_reduce_bytes``)."""

    def __init__(self) -> None:
        self.costs: list[list[int]] = []

    def on_round_end(self, trainer, pl_module, result) -> None:
        cost = result.gather_cost
        self.costs.append([cost.tensor_bytes, cost.reduce_bytes] if cost is not None else [])

    def on_train_end(self, trainer, pl_module) -> None:
        Path(f"shards_rank{trainer.global_rank}.json").write_text(json.dumps({
            "world": trainer.world_size, "costs": self.costs,
            "clients": pl_module.algorithm.clients.client_ids(),
        }))


def crafted_results(rank: int):
    """Rank 0: clients 7 and 3 (plan positions 0 and 2); rank 1: client 5 (position 1)."""
    from fl_lightning.algorithms.base import ClientResult

    def one(cid: int) -> ClientResult:
        gen = torch.Generator().manual_seed(cid)
        params = {"w": torch.randn(2, 3, generator=gen), "b": torch.randn(4, generator=gen)}
        state = {"c_i": {"w": torch.randn(2, 3, generator=gen, dtype=torch.float64)}}
        extras = {"a": 1.5 * cid, "d_i": {"b": torch.randn(4, generator=gen)}}
        return ClientResult(cid, 10 * cid, params, cid + 1, torch.tensor(0.25 * cid), state,
                            extras)

    return {0: [one(7), one(3)], 1: [one(5)]}[rank], one


def check_gather(out: Path) -> None:
    """Every rank holds every rank's results bit for bit, in plan order; an idle rank too."""
    import torch.distributed as dist

    from fl_lightning.distributed import allgather_results

    rank = dist.get_rank()
    mine, one = crafted_results(rank)
    full, cost = allgather_results(mine, [[0, 2], [1]], torch.device("cpu"))
    want = [one(7), one(5), one(3)]
    assert [r.client_id for r in full] == [7, 5, 3]
    for got, ref in zip(full, want, strict=True):
        assert (got.num_samples, got.num_steps) == (ref.num_samples, ref.num_steps)
        assert got.extras["a"] == ref.extras["a"] and torch.equal(got.loss, ref.loss)
        assert all(torch.equal(got.params[k], ref.params[k]) for k in ref.params)
        assert torch.equal(got.state["c_i"]["w"], ref.state["c_i"]["w"])
        assert got.state["c_i"]["w"].dtype == torch.float64
        assert torch.equal(got.extras["d_i"]["b"], ref.extras["d_i"]["b"])
    # rank 1 idle: everything comes from rank 0
    idle, idle_cost = allgather_results(mine if rank == 0 else [], [[0, 1], []],
                                        torch.device("cpu"))
    assert [r.client_id for r in idle] == [7, 3]
    Path(out, f"gather_rank{rank}.json").write_text(json.dumps({
        "tensor_bytes": cost.tensor_bytes, "payload_bytes": cost.payload_bytes,
        "idle_tensor_bytes": idle_cost.tensor_bytes,
    }))


if __name__ == "__main__":
    sys.argv[0] = os.path.abspath(sys.argv[0])  # Lightning re-runs argv for rank 1 from OUT/<case>
    out = Path(sys.argv[1]).resolve()
    for case in sys.argv[2:]:
        if case == RESUME[0]:
            fit([*resume_args(out), *DDP], out / case)
        else:
            fit([*CASES[case], *DDP], out / case)
    check_gather(out)
