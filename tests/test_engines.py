"""The batched (vmap) client engine agrees with the sequential reference engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TinyNet
from test_cli import QUICK, _run
from torch import nn

from fl_lightning.algorithms import (
    MOON,
    SCAFFOLD,
    FedAvg,
    FedBABU,
    FedDyn,
    FedNova,
    FedNTD,
    FedProx,
    FedSAM,
    FedSoL,
    PerFedAvg,
)
from fl_lightning.engine import ClientPlan, RoundPlan, SequentialEngine
from fl_lightning.engines import BatchedEngine
from fl_lightning.errors import ConfigError
from fl_lightning.models.cnn import FedAvgCNN

#: client sizes: with batch 10 and 2 epochs they take 6, 10, 2 and 8 steps, and three of them
#: end each epoch on a smaller batch (3, 7 and 1 samples)
SIZES = (23, 50, 7, 31)


def _plan(round_idx: int = 0, sizes=SIZES, batch: int = 10, epochs: int = 2, n: int = 200,
          transform=None) -> RoundPlan:
    clients = []
    for cid, size in enumerate(sizes):
        gen = torch.Generator().manual_seed(100 * round_idx + cid)
        own = torch.randperm(n, generator=gen)[:size]
        batches = []
        for _ in range(epochs):
            batches.extend(own[torch.randperm(size, generator=gen)].split(batch))
        clients.append(ClientPlan(cid, size, batches))
    return RoundPlan(round_idx, clients, transform=transform, num_clients=len(sizes),
                     total_samples=sum(sizes))


def _shift(x, round_idx, client_id, step):
    """A pure per-(round, client, step) augmentation, as the data module's."""
    gen = torch.Generator().manual_seed(1000 * round_idx + 10 * client_id + step)
    return x + 0.1 * torch.randn(x.shape, generator=gen, dtype=x.dtype)


def _both(algorithm, net, x, y, plan, lr=0.05, momentum=0.9, weight_decay=1e-3):
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    seq = SequentialEngine().run_round(algorithm, net, gp, {}, plan, (x, y), lr, momentum,
                                       weight_decay)
    bat = BatchedEngine().run_round(algorithm, net, gp, {}, plan, (x, y), lr, momentum,
                                    weight_decay)
    return gp, seq, bat


def _max_diff(seq, bat) -> float:
    return max(
        float((a.params[k] - b.params[k]).abs().max()) for a, b in zip(seq, bat, strict=True)
        for k in a.params
    )


ALGORITHMS = {
    "fedavg": FedAvg,
    "fedprox": lambda: FedProx(mu=0.1),
    "fedsam": lambda: FedSAM(rho=0.1),
    "fedasam": lambda: FedSAM(rho=1.0, adaptive=True),
    "fedsol": lambda: FedSoL(rho=2.0),
    "fedsol_head": lambda: FedSoL(rho=2.0, perturb_body=False),
    "fedsol_prox_fedprox": lambda: FedSoL(rho=2.0, proximal=FedProx()),
    "fedntd": FedNTD,
    "perfedavg": PerFedAvg,
    "fedbabu": FedBABU,
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_batched_equals_sequential_in_float64(name):
    torch.manual_seed(0)
    net = TinyNet(4).double()
    x = torch.randn(200, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (200,))
    plan = _plan(transform=_shift)
    gp, seq, bat = _both(ALGORITHMS[name](), net, x, y, plan)
    assert [r.num_steps for r in bat] == [6, 10, 2, 8]  # unequal steps are masked
    assert [r.client_id for r in bat] == [0, 1, 2, 3]
    assert _max_diff(seq, bat) < 1e-12
    for a, b in zip(seq, bat, strict=True):
        assert float(a.loss) == pytest.approx(float(b.loss), abs=1e-12)
    moved = max(float((bat[1].params[k] - gp[k]).abs().max()) for k in gp)
    assert moved > 1e-3  # the clients really trained
    if name == "fedbabu":  # the frozen head stays at its global weights
        assert all(torch.equal(r.params["head.weight"], gp["head.weight"]) for r in bat)


def test_fixed_radius_fedsol_agrees_up_to_its_amplified_rounding():
    # With adaptive=False the first step perturbs along the normalized KL gradient, which is
    # rounding noise (DESIGN.md §6.5): the engines agree only as well as that noise does.
    torch.manual_seed(0)
    net = TinyNet(4).double()
    x = torch.randn(200, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (200,))
    _, seq, bat = _both(FedSoL(rho=2.0, adaptive=False), net, x, y, _plan())
    assert _max_diff(seq, bat) < 1e-4


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_batched_equals_sequential_fp32_on_the_paper_cnn(name):
    torch.manual_seed(0)
    net = FedAvgCNN(10, (1, 8, 8))
    x = torch.randn(120, 1, 8, 8)
    y = torch.randint(0, 10, (120,))
    _, seq, bat = _both(ALGORITHMS[name](), net, x, y, _plan(sizes=(25, 12, 40), n=120),
                        lr=0.01)
    assert _max_diff(seq, bat) < 1e-5


def test_a_client_trains_the_same_alone_and_beside_longer_clients():
    torch.manual_seed(0)
    net = TinyNet(4).double()
    x = torch.randn(200, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (200,))
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    together = _plan(sizes=(7, 50))
    alone = RoundPlan(0, [together.clients[0]])
    engine = BatchedEngine()
    [solo] = engine.run_round(FedSoL(), net, gp, {}, alone, (x, y), 0.05, 0.9, 0.0)
    short, long = engine.run_round(FedSoL(), net, gp, {}, together, (x, y), 0.05, 0.9, 0.0)
    assert (short.num_steps, long.num_steps) == (2, 10)
    assert max(float((solo.params[k] - short.params[k]).abs().max()) for k in gp) < 1e-12


class _BNNet(nn.Module):
    def __init__(self, track: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=track),
                                  nn.Flatten())
        self.head = nn.Linear(2 * 4 * 4, 4)

    def forward(self, x):
        return self.head(self.body(x))


class _DropNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.body.append(nn.Dropout(0.5))


class _Unbatchable(FedAvg):
    batchable = False


@pytest.mark.parametrize(
    "algorithm,net,reason",
    [
        (_Unbatchable(), TinyNet(), "_Unbatchable declares batchable = False"),
        (FedAvg(), _DropNet(), "dropout 'body.5' draws random numbers"),
    ],
)
def test_batched_engine_rejects_what_it_cannot_run_in_one_line(algorithm, net, reason):
    with pytest.raises(ConfigError) as err:
        BatchedEngine().check(algorithm, net)
    message = str(err.value)
    assert reason in message and "--model.engine" in message and "SequentialEngine" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "algorithm", [SCAFFOLD(), FedDyn(), MOON(), FedNova(), FedSoL(proximal=SCAFFOLD())]
)
def test_batched_engine_accepts_the_stateful_algorithms_and_batchnorm_statistics(algorithm):
    assert algorithm.batchable
    BatchedEngine().check(algorithm, TinyNet())
    BatchedEngine().check(FedAvg(), _BNNet(track=True))


def test_batchnorm_without_running_stats_is_batched_exactly():
    torch.manual_seed(0)
    net = _BNNet(track=False).double()
    x = torch.randn(200, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (200,))
    _, seq, bat = _both(FedSAM(rho=0.1), net, x, y, _plan(sizes=(23, 50)))
    assert _max_diff(seq, bat) < 1e-12


def test_cli_batched_engine_matches_sequential_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--config", QUICK, "--trainer.max_steps", "2", "--trainer.precision", "64-true",
            "--checkpoint_every_n_rounds", "2"]
    _run(base)
    _run([*base, "--model.engine", "fl_lightning.engines.BatchedEngine"])
    ckpts = [
        torch.load(next((tmp_path / f"lightning_logs/fl/version_{v}/checkpoints").glob("*.ckpt")),
                   weights_only=True)["state_dict"]
        for v in (0, 1)
    ]
    assert ckpts[0].keys() == ckpts[1].keys()
    diff = max(float((ckpts[0][k] - ckpts[1][k]).abs().max()) for k in ckpts[0]
               if k.startswith("net."))
    assert 0.0 <= diff < 1e-10
    moved = max(float(v.abs().max()) for k, v in ckpts[0].items() if k.startswith("net."))
    assert moved > 0.0


class _GeneralPathFedSoL(FedSoL):
    """Overriding the task loss (with the same loss) turns the head-only shortcut off."""

    def task_loss(self, ctx, params, x, y):
        return super().task_loss(ctx, params, x, y)


def test_head_only_fedsol_shortcut_equals_the_general_path():
    from fl_lightning.algorithms.base import LocalContext

    torch.manual_seed(0)
    net = FedAvgCNN(10, (1, 8, 8)).double()
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    params = {k: v + 0.01 * torch.randn_like(v) for k, v in gp.items()}
    x, y = torch.randn(20, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (20,))
    ctx = LocalContext(net=net, global_params=gp, buffers={}, round=0, client_id=0, lr=0.01)
    fast = FedSoL(rho=2.0, perturb_body=False)
    slow = _GeneralPathFedSoL(rho=2.0, perturb_body=False)
    assert fast._head_only_fast(ctx) is not None and slow._head_only_fast(ctx) is None
    a, loss_a = fast.direction(params, x, y, ctx)
    b, loss_b = slow.direction(params, x, y, ctx)
    assert list(a) == list(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-12
    assert float(loss_a) == pytest.approx(float(loss_b), abs=1e-12)
    # the perturbation matters: without it the direction is the plain CE gradient
    plain, _ = FedAvg().direction(params, x, y, ctx)
    assert max(float((a[k] - plain[k]).abs().max()) for k in a) > 1e-6


def test_batched_head_only_fedsol_shortcut_on_the_paper_cnn_in_float64():
    torch.manual_seed(0)
    net = FedAvgCNN(10, (1, 8, 8)).double()
    x = torch.randn(120, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (120,))
    _, seq, bat = _both(FedSoL(rho=2.0, perturb_body=False), net, x, y,
                        _plan(sizes=(25, 12, 40), n=120), lr=0.01)
    assert _max_diff(seq, bat) < 1e-12


def test_engine_config_fragment_selects_the_batched_engine(tmp_path, monkeypatch):
    import yaml

    from fl_lightning.cli import FederatedCLI

    monkeypatch.chdir(tmp_path)
    fragment = str(Path(QUICK).parent / "engines" / "batched.yaml")
    cli = FederatedCLI(args=["--config", QUICK, "--config", fragment], run=False)
    assert isinstance(cli.model.engine, BatchedEngine) and cli.model.engine.compile == "none"
    ddp = yaml.safe_load((Path(QUICK).parent / "engines" / "ddp_cpu2.yaml").read_text())
    assert ddp["trainer"] == {"strategy": "ddp", "accelerator": "cpu", "devices": 2}
