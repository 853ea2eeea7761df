"""Quadratic clients and light stand-ins for the module, data module and trainer.

Client ``k`` has ``f_k(w) = 1/2 ||A_k w - b_k||^2``; the model is ``nn.Linear(d, 1,
bias=False)`` so ``f_k`` is ``half_sse(net(A_k), b_k)``.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fl_lightning.algorithms.base import ClientResult
from fl_lightning.callbacks.functional import flatten
from fl_lightning.hooks import RoundResult


def half_sse(out, y):
    return 0.5 * ((out.squeeze(-1) - y) ** 2).sum()


def half_mse(out, y):
    return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()


class FakeData:
    """What the callbacks read from a FederatedDataModule."""

    def __init__(self, x, y, client_indices, test=None, num_classes=1):
        self.x, self.y = x, y
        self.client_indices = [torch.as_tensor(c, dtype=torch.long) for c in client_indices]
        self.num_clients = len(self.client_indices)
        self.test_x, self.test_y = test if test is not None else (x, y)
        self.num_classes = num_classes

    def train_tensors(self, device="cpu"):
        return self.x, self.y

    def setup(self, stage=None):
        pass


def fake_module(net, data, algorithm=None):
    return SimpleNamespace(net=net, datamodule=data, device=torch.device("cpu"),
                           dtype=next(net.parameters()).dtype, num_classes=data.num_classes,
                           algorithm=algorithm)


def fake_trainer(log_dir=None):
    return SimpleNamespace(loggers=[], global_step=0, log_dir=log_dir, is_global_zero=True)


def quadratic_clients(seed=0, num_clients=4, dim=5, rows=(6, 8, 7, 9)):
    """``A_k`` (rows[k] x dim), ``b_k``; each ``A_k^T A_k`` positive definite."""
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(rows[k], dim, generator=g, dtype=torch.float64) for k in range(num_clients)]
    b = [torch.randn(rows[k], generator=g, dtype=torch.float64) * 3 for k in range(num_clients)]
    return a, b


def quadratic_data(a, b):
    x = torch.cat(a)
    y = torch.cat(b)
    bounds = torch.cumsum(torch.tensor([0] + [len(v) for v in b]), 0)
    idx = [torch.arange(int(bounds[k]), int(bounds[k + 1])) for k in range(len(a))]
    return FakeData(x, y, idx)


def linear_net(dim, weight=None):
    net = nn.Linear(dim, 1, bias=False).double()
    if weight is not None:
        with torch.no_grad():
            net.weight.copy_(weight.view(1, -1))
    return net


def round_result(round_idx, global_before, client_params, sizes, global_after=None):
    clients = [ClientResult(client_id=i, num_samples=n, params=p, num_steps=1,
                            loss=torch.zeros(()))
               for i, (p, n) in enumerate(zip(client_params, sizes, strict=True))]
    return RoundResult(round=round_idx, lr=0.1, client_ids=list(range(len(clients))),
                       client_sizes=list(sizes), clients=clients, global_before=global_before,
                       aggregate=global_after or global_before,
                       global_after=global_after or global_before, train_loss=torch.zeros(()))


def local_gd_map(a_k, b_k, lr, steps):
    """``E`` steps of GD on ``f_k`` are the affine map ``w -> M_k w + c_k``."""
    h = a_k.T @ a_k
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    m = torch.linalg.matrix_power(eye - lr * h, steps)
    w_star = torch.linalg.solve(h, a_k.T @ b_k)
    return m, (eye - m) @ w_star


def subsets_maps(maps, sizes, m):
    """All ``m``-subsets S with the FedAvg round map ``w -> M_S w + c_S`` (size weights)."""
    out = []
    for s in itertools.combinations(range(len(maps)), m):
        tot = sum(sizes[k] for k in s)
        ms = sum(sizes[k] / tot * maps[k][0] for k in s)
        cs = sum(sizes[k] / tot * maps[k][1] for k in s)
        out.append((s, ms, cs))
    return out


def flat(params):
    return flatten(params)


@pytest.fixture
def one_thread():
    """These tests run many tiny ops: with 2 threads on a busy 2-core machine they are 10-50x
    slower (thread hand-off dominates), so they run on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
