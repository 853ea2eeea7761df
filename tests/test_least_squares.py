"""Closed forms on least-squares clients ``f_k(w) = 1/2 ||A_k w - b_k||^2``.

The algorithms run unchanged (their ``direction`` / ``client_end`` / ``aggregate`` and the
sequential engine); only the task loss is swapped for the least-squares one by a test subclass.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fl_lightning.algorithms import SCAFFOLD, FedAvg, FedDyn, FedNova, FedProx
from fl_lightning.algorithms.base import finish_round
from fl_lightning.engine import ClientPlan, RoundPlan, SequentialEngine

D, K_CLIENTS, ROWS = 5, 4, 8


class _LeastSquares:
    def task_loss(self, ctx, params, x, y):
        r = ctx.forward(params, x).squeeze(-1) - y
        return 0.5 * (r * r).sum()


def ls(cls, **kwargs):
    return type(f"LS{cls.__name__}", (_LeastSquares, cls), {})(**kwargs)


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(K_CLIENTS, ROWS, D, generator=g, dtype=torch.float64)
    # different optima per client
    w_k = torch.randn(K_CLIENTS, D, generator=g, dtype=torch.float64) * 3
    b = torch.einsum("krd,kd->kr", a, w_k) + 0.1 * torch.randn(K_CLIENTS, ROWS, generator=g,
                                                                 dtype=torch.float64)
    net = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        net.weight.zero_()
    x, y = a.reshape(-1, D), b.reshape(-1)
    # global objective sum_k f_k: normal equations
    w_star = torch.linalg.solve(x.T @ x, x.T @ y)
    return net, x, y, w_star


def run(algo, net, x, y, rounds, steps, lr, momentum=0.0, steps_per_client=None):
    engine = SequentialEngine()
    w = {"weight": net.weight.detach().clone()}
    for r in range(rounds):
        clients = []
        for k in range(K_CLIENTS):
            idx = torch.arange(k * ROWS, (k + 1) * ROWS)
            n = steps if steps_per_client is None else steps_per_client[k]
            clients.append(ClientPlan(k, ROWS, [idx] * n))
        plan = RoundPlan(r, clients, num_clients=K_CLIENTS, total_samples=K_CLIENTS * ROWS)
        res = engine.run_round(algo, net, w, {}, plan, (x, y), lr, momentum, 0.0)
        w = finish_round(algo, w, res, num_clients=plan.num_clients,
                         total_samples=plan.total_samples)
    return w["weight"].reshape(-1)


def grad_global(w, x, y):
    return x.T @ (x @ w - y)


def test_fedavg_one_full_batch_step_is_gradient_descent_on_the_global_objective():
    net, x, y, _ = problem()
    lr = 0.01
    w = run(ls(FedAvg), net, x, y, rounds=3, steps=1, lr=lr)
    ref = torch.zeros(D, dtype=torch.float64)
    for _ in range(3):  # equal client sizes: the average of local gradients is 1/K of the sum
        ref = ref - lr * grad_global(ref, x, y) / K_CLIENTS
    assert torch.allclose(w, ref, atol=1e-12, rtol=0)


def test_several_local_steps_bias_fedavg_but_not_scaffold_or_feddyn():
    net, x, y, w_star = problem()
    lr, steps = 0.02, 10
    # rounds to converge to 1e-8: FedAvg and SCAFFOLD ~60 (at 80: |dw| ~1e-13 from their
    # fixed points), FedDyn (alpha=1) ~250
    w_avg = run(ls(FedAvg), net, x, y, 80, steps, lr)
    w_scaffold = run(ls(SCAFFOLD), net, x, y, 80, steps, lr)
    w_dyn = run(ls(FedDyn, alpha=1.0), net, x, y, 300, steps, lr)
    # FedAvg's fixed point with K > 1 local steps is not the global optimum ...
    assert float((w_avg - w_star).norm()) > 1e-2
    # ... SCAFFOLD's and FedDyn's are (full participation, equal sizes): tolerance 1e-8
    assert float((w_scaffold - w_star).norm()) < 1e-8
    assert float((w_dyn - w_star).norm()) < 1e-8


def test_scaffold_with_momentum_correction_still_reaches_the_optimum():
    net, x, y, w_star = problem(1)
    w = run(ls(SCAFFOLD, momentum_corrected=True), net, x, y, 300, 5, 0.005, momentum=0.5)
    assert float((w - w_star).norm()) < 1e-8


def test_fedprox_with_huge_mu_barely_leaves_the_global_model():
    net, x, y, _ = problem()
    w0 = torch.zeros(D, dtype=torch.float64)
    mu = 1e4
    lr = 0.5 / mu  # lr * mu < 1: the proximal pull is a stable contraction
    w_prox = run(ls(FedProx, mu=mu), net, x, y, 1, 200, lr)
    w_avg = run(ls(FedAvg), net, x, y, 1, 200, lr)
    # each client stays within ||grad f_k(w_g)|| / mu of w_g (the proximal point's bound) ...
    bound = max(
        float((x[k * ROWS:(k + 1) * ROWS].T @ y[k * ROWS:(k + 1) * ROWS]).norm())
        for k in range(K_CLIENTS)
    ) / mu
    assert float((w_prox - w0).norm()) <= bound * 1.01
    # ... while FedAvg with the same steps moves ~100x farther
    assert float((w_prox - w0).norm()) < 0.05 * float((w_avg - w0).norm())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fednova_equals_fedavg_when_all_clients_take_the_same_steps(momentum):
    net, x, y, _ = problem()
    w_nova = run(ls(FedNova), net, x, y, 5, 7, 0.01, momentum)
    w_avg = run(ls(FedAvg), net, x, y, 5, 7, 0.01, momentum)
    assert torch.allclose(w_nova, w_avg, atol=1e-12, rtol=0)


def test_fednova_normalizes_unequal_local_work():
    net, x, y, _ = problem()
    steps = [1, 2, 4, 8]
    algo = ls(FedNova)
    w = run(algo, net, x, y, 1, 0, 0.01, steps_per_client=steps)
    # closed form: w_g - tau_eff * sum_i p_i (w_g - w_i) / tau_i, with w_i from plain GD
    w_g = torch.zeros(D, dtype=torch.float64)
    acc = torch.zeros(D, dtype=torch.float64)
    for k, n in enumerate(steps):
        a, b = x[k * ROWS:(k + 1) * ROWS], y[k * ROWS:(k + 1) * ROWS]
        wk = w_g.clone()
        for _ in range(n):
            wk = wk - 0.01 * a.T @ (a @ wk - b)
        acc = acc + 0.25 * (w_g - wk) / n
    ref = w_g - sum(0.25 * n for n in steps) * acc
    assert torch.allclose(w, ref, atol=1e-12, rtol=0)
