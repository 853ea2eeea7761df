"""Multi-process rounds: LPT client split, one all-reduce, the same weights as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, seed_everything
from test_cli import QUICK

from fl_lightning.algorithms import SCAFFOLD, FedAvg, FedDyn, FedNova, FedProx, FedSoL
from fl_lightning.algorithms.base import ClientResult
from fl_lightning.cli import main
from fl_lightning.distributed import (
    allreduce_average,
    check_distributed,
    local_plan,
    lpt_partition,
)
from fl_lightning.engine import ClientPlan, RoundPlan
from fl_lightning.errors import ConfigError
from fl_lightning.models.cnn import FedAvgCNN

REPO = Path(__file__).resolve().parents[1]


def test_lpt_partition_balances_deterministically():
    costs = [12, 3, 7, 7, 5, 9, 1, 12]
    shares = lpt_partition(costs, 3)
    assert shares == lpt_partition(costs, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert loads == [19, 18, 19]  # 12 | 12 | 9, then 7->r2, 7->r0, 5->r1, 3->r2, 1->r1
    # ties by client index then by rank: equal costs go round-robin from rank 0
    assert lpt_partition([1, 1, 1, 1], 2) == [[0, 2], [1, 3]]
    assert lpt_partition([4], 3) == [[0], [], []]


def test_local_plans_cover_the_round_once():
    clients = [ClientPlan(c, 10, [torch.arange(2)] * steps) for c, steps in
               zip([5, 2, 9, 4], [3, 8, 2, 4], strict=True)]
    plan = RoundPlan(7, clients, num_clients=10, total_samples=100)
    parts = [local_plan(plan, r, 2) for r in range(2)]
    assert sorted(c.client_id for p in parts for c in p.clients) == [2, 4, 5, 9]
    assert [[c.client_id for c in p.clients] for p in parts] == [[2], [5, 9, 4]]
    assert all(p.round == 7 and p.num_clients == 10 for p in parts)
    assert local_plan(plan, 0, 1) is plan


@pytest.mark.parametrize(
    "algorithm,why",
    [
        (SCAFFOLD(), "per-client state"),
        (FedDyn(), "per-client state"),
        (FedNova(), "server rule"),  # tau_i travels in the result's extras: no state
        (FedNova(ccvr=True), "per-client state"),
        (FedSoL(proximal=SCAFFOLD()), "per-client state"),
    ],
)
def test_ddp_rejects_algorithms_it_cannot_split_in_one_line(algorithm, why):
    with pytest.raises(ConfigError) as err:
        check_distributed(algorithm, 2)
    message = str(err.value)
    assert why in message and "--trainer.devices" in message and "\n" not in message
    check_distributed(algorithm, 1)  # one process runs anything


def test_ddp_accepts_stateless_mean_rule_algorithms():
    for algorithm in (FedAvg(), FedProx(), FedSoL(), FedSoL(proximal=FedProx())):
        check_distributed(algorithm, 4)


class CommHookCounter(Callback):
    """Counts DDP gradient all-reduce buckets (a comm hook sees every one) per rank."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.calls = 0

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        model = trainer.strategy.model
        assert isinstance(model, DistributedDataParallel)

        def counting(state, bucket):
            self.calls += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting)

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.out, f"comm_calls_rank{trainer.global_rank}.json").write_text(
            json.dumps({"calls": self.calls, "world": trainer.world_size})
        )


ARGS = ["--config", QUICK, "--trainer.max_steps", "2", "--checkpoint_every_n_rounds", "2",
        "--model.local_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false"]


def _weights(root: Path) -> dict[str, torch.Tensor]:
    [ckpt] = (root / "lightning_logs/fl/version_0/checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net.")}


def _fit_ddp(tmp_path: Path, devices: int, extra: list[str]) -> dict[str, torch.Tensor]:
    root = tmp_path / f"ddp{devices}"
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
           "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "fl_lightning.cli", "fit", *ARGS, "--trainer.strategy", "ddp",
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), *extra,
    ]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _weights(root)


def test_two_gloo_processes_give_the_weights_of_one(tmp_path, monkeypatch):
    root = tmp_path / "single"
    root.mkdir()
    monkeypatch.chdir(root)
    main(["fit", *ARGS])  # one process, no DDP: the reference
    one = _weights(root)
    counter = ["--trainer.callbacks+=test_ddp.CommHookCounter",
               f"--trainer.callbacks.out={tmp_path}"]
    two = _fit_ddp(tmp_path, 2, counter)
    assert one.keys() == two.keys()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-6
    seed_everything(0)  # the CLI's seed: the same initial network as the runs'
    init = {f"net.{k}": v for k, v in FedAvgCNN(10, (1, 8, 8)).state_dict().items()}
    assert max(float((one[k] - init[k]).abs().max()) for k in one) > 1e-3  # it trained
    # the clients' torch.func steps never went through DDP's gradient all-reduce
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"comm_calls_rank{rank}.json").read_text())
        assert calls == {"calls": 0, "world": 2}


@pytest.fixture
def gloo_group(tmp_path):
    """A one-process gloo group (all_reduce is then the identity on the buffer)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_flat_allreduce_average_matches_the_server_rule(gloo_group):
    gen = torch.Generator().manual_seed(0)
    gp = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)}
    results = [
        ClientResult(c, n, {k: v + torch.randn(v.shape, generator=gen) for k, v in gp.items()},
                     4, torch.tensor(float(c)))
        for c, n in [(0, 10), (1, 30), (2, 7)]
    ]
    aggregate, loss, diverged, clients = allreduce_average(gp, results, num_diverged=2)
    expected = FedAvg().aggregate(gp, results)
    for k in gp:
        torch.testing.assert_close(aggregate[k], expected[k], rtol=0, atol=1e-6)
        assert aggregate[k].shape == gp[k].shape
    assert float(loss) == pytest.approx(1.0) and (diverged, clients) == (2, 5)
    none, _, diverged, clients = allreduce_average(gp, [], num_diverged=3)
    assert none is None and (diverged, clients) == (3, 3)


def test_every_rank_takes_the_same_divergence_decision():
    from fl_lightning.loop import DivergenceError
    from fl_lightning.module import FederatedModule

    module = FederatedModule(num_classes=10, input_shape=(1, 8, 8))
    # this rank's clients are fine, another rank's client diverged: stop on every rank
    with pytest.raises(DivergenceError, match="of another rank produced non-finite"):
        module.round_loop._drop_diverged([], 3, num_bad=1, num_all=4)
    module.on_nonfinite = "skip_client"
    assert module.round_loop._drop_diverged([], 3, num_bad=1, num_all=4) == ([], [])
    with pytest.raises(DivergenceError, match="every client diverged"):
        module.round_loop._drop_diverged([], 3, num_bad=4, num_all=4)


def test_ddp_rejects_systems_mechanisms_in_one_line():
    """Dropouts, attacks, DP... need every client's update in one process: one line, at setup."""
    from lightning.pytorch import Trainer

    from fl_lightning.data.module import FederatedDataModule
    from fl_lightning.module import FederatedModule
    from fl_lightning.systems import Participation

    dm = FederatedDataModule(dataset="digits", num_clients=4)
    module = FederatedModule(
        num_classes=dm.num_classes, input_shape=dm.input_shape,
        participation=Participation(dropout_ratio=0.25),
    ).attach(dm)
    module.trainer = Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False)
    with pytest.raises(ConfigError) as err:
        module.setup("fit")
    message = str(err.value)
    assert "--model.participation" in message and "--trainer.devices 1" in message
    assert "\n" not in message
