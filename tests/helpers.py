"""Small shared pieces for tests: a tiny network, client data, running one engine client."""

from __future__ import annotations

import copy
import os
import signal

import torch
from lightning.pytorch import Callback
from torch import nn

from fl_lightning.algorithms.base import Algorithm, LocalContext
from fl_lightning.engine import ClientPlan, RoundPlan, SequentialEngine


class TinyNet(nn.Module):
    """Conv body + linear head, small enough for float64 checks."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 8),
            nn.ReLU(),
        )
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def make_problem(seed: int = 0, n: int = 40, num_classes: int = 4, drift: float = 0.05):
    """A float64 global net, a drifted local net, and data."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    global_net = TinyNet(num_classes).double()
    local_net = copy.deepcopy(global_net)
    with torch.no_grad():
        for p in local_net.parameters():
            p.add_(drift * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return global_net, local_net, x, y


def run_engine_client(algorithm: Algorithm, global_net: nn.Module, x, y, batches, lr,
                      momentum=0.9, weight_decay=1e-5):
    """Train one client with the sequential engine; returns its weights."""
    global_params = {k: p.detach().clone() for k, p in global_net.named_parameters()}
    plan = RoundPlan(round=0, clients=[ClientPlan(0, len(y), batches)])
    [result] = SequentialEngine().run_round(
        algorithm, global_net, global_params, {}, plan, (x, y), lr, momentum, weight_decay
    )
    return result.params


def context(net: nn.Module, global_params, step: int = 0) -> LocalContext:
    return LocalContext(net=net, global_params=global_params, buffers={}, round=0, client_id=0,
                        lr=0.01, step=step)


class SigtermCallback(Callback):
    """Test callback: sends ``signal`` (SIGTERM, or SIGKILL: the process dies at once) to its
    own process when ``trainer.global_step == at_round``: as round ``at_round + 1`` starts, so
    the signal arrives while that round is in flight, or (``during="evaluation"``) as the first
    batch of the evaluation after round ``at_round`` starts."""

    def __init__(self, at_round: int = 2, signal: str = "SIGTERM",
                 during: str = "round") -> None:
        self.at_round = at_round
        self.signal = signal
        self.during = during

    def _send(self, trainer, during: str) -> None:
        if trainer.global_step == self.at_round and during == self.during:
            os.kill(os.getpid(), getattr(signal, self.signal))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._send(trainer, "round")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx,
                                  dataloader_idx=0):
        if batch_idx == 0 and not trainer.sanity_checking:
            self._send(trainer, "evaluation")


class CrashCallback(Callback):
    """Test callback: the run fails (RuntimeError) as round ``at_round`` (from 0) starts."""

    def __init__(self, at_round: int = 2) -> None:
        self.at_round = at_round

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_round:
            raise RuntimeError(f"test crash as round {self.at_round + 1} starts")


class SigintCallback(Callback):
    """Test callback: presses Ctrl-C ``times`` times (SIGINT to its own process) as round
    ``at_round`` starts."""

    def __init__(self, at_round: int = 2, times: int = 1) -> None:
        self.at_round = at_round
        self.times = times

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_round:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


class NaNForClient(Algorithm):
    """Test algorithm: FedAvg, except that client ``client_id`` returns a NaN direction."""

    name = "nan_for_client"

    def __init__(self, client_id: int = 0) -> None:
        self.client_id = client_id

    def direction(self, params, x, y, ctx):
        grads, loss = super().direction(params, x, y, ctx)
        if ctx.client_id == self.client_id or self.client_id < 0:
            grads = {k: g * float("nan") for k, g in grads.items()}
        return grads, loss
