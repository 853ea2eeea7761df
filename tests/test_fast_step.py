"""The sequential engine's cheap local step (autograd on leaves, a direct parameter swap,
foreach list ops) gives the values of the torch.func path that vmap uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyNet, context, make_problem
from torch.func import functional_call

from fl_lightning.algorithms import SCAFFOLD, FedAvg, FedNTD, FedProx, FedSAM, FedSoL
from fl_lightning.algorithms.base import (
    adaptive_radius,
    global_norm,
    grad_of,
    in_transform,
    swapped_call,
)

ALGORITHMS = {
    "fedavg": FedAvg,
    "fedprox": lambda: FedProx(mu=0.3),
    "fedsam": lambda: FedSAM(rho=0.1),
    "fedasam": lambda: FedSAM(rho=1.0, adaptive=True),
    "fedsol": lambda: FedSoL(rho=2.0),
    "fedsol_fixed": lambda: FedSoL(rho=2.0, adaptive=False),
    "fedntd": FedNTD,
}


def _params(net):
    return {k: p.detach().clone() for k, p in net.named_parameters()}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_direction_outside_vmap_equals_the_torch_func_path(name):
    global_net, local_net, x, y = make_problem(seed=3)
    gp, params = _params(global_net), _params(local_net)
    algo = ALGORITHMS[name]()
    ctx = context(global_net, gp, step=1)
    fast, loss = algo.direction(params, x, y, ctx)

    def one(p, xb, yb):
        assert in_transform()
        return algo.direction(p, xb, yb, ctx)

    batched = {k: v.unsqueeze(0) for k, v in params.items()}
    ref, ref_loss = torch.vmap(one)(batched, x.unsqueeze(0), y.unsqueeze(0))
    assert not in_transform()
    assert set(fast) == set(params)
    for k in params:
        assert float((fast[k] - ref[k][0]).abs().max()) < 1e-12
    assert float(loss) == pytest.approx(float(ref_loss[0]), abs=1e-12)
    assert all(not v.requires_grad for v in fast.values())


def test_swapped_call_equals_functional_call_and_restores_the_module():
    torch.manual_seed(0)
    net = TinyNet(4).double()
    own = {k: p for k, p in net.named_parameters()}
    other = {k: torch.randn_like(p) for k, p in own.items()}
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    assert torch.equal(swapped_call(net, other, {}, x), functional_call(net, other, (x,)))
    assert all(p is own[k] for k, p in net.named_parameters())  # put back
    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).double()
    bufs = {k: b.clone() for k, b in bn.named_buffers()}
    before = {k: b.clone() for k, b in bn.named_buffers()}
    swapped_call(bn, dict(bn.named_parameters()), bufs, x)
    assert not torch.equal(bufs["1.running_mean"], before["1.running_mean"])  # updated in place
    assert torch.equal(bn[1].running_mean, before["1.running_mean"])  # the module's untouched


def test_grad_of_on_a_subset_and_with_aux():
    global_net, _, x, y = make_problem(seed=1)
    params = _params(global_net)

    def loss_fn(p):
        return F.cross_entropy(functional_call(global_net, p, (x,)), y)

    full, loss = grad_of(loss_fn, params)
    head, loss_h = grad_of(loss_fn, params, ["head.weight"])
    assert list(head) == ["head.weight"] and torch.equal(head["head.weight"], full["head.weight"])
    assert torch.equal(loss, loss_h)
    g_aux, aux = grad_of(lambda p: (2 * loss_fn(p), loss_fn(p) + 1), params, has_aux=True)
    assert torch.allclose(g_aux["head.weight"], 2 * full["head.weight"], rtol=0, atol=1e-15)
    assert float(aux) == pytest.approx(float(loss) + 1)


def test_fedsol_foreach_scaling_is_bit_identical_to_the_per_tensor_formula():
    global_net, local_net, x, y = make_problem(seed=5)
    gp, params = _params(global_net), _params(local_net)
    g = {k: torch.randn_like(v) for k, v in params.items()}
    eps = FedSoL(rho=2.0)._scaled(g, params, context(global_net, gp))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g.values()]))
    scale = 2.0 / (norm + 1e-12)
    for k in g:
        lam = F.normalize((params[k] - gp[k]).abs(), p=2.0, dim=0)
        assert torch.equal(eps[k], lam * g[k] * scale)
    lam = adaptive_radius(list(params.values()), list(gp.values()))
    assert all(torch.equal(a, F.normalize((params[k] - gp[k]).abs(), p=2.0, dim=0))
               for a, k in zip(lam, params, strict=True))
    assert torch.equal(global_norm(list(g.values())), norm)


def test_scaffold_direction_is_gradient_plus_the_precomputed_correction():
    global_net, local_net, x, y = make_problem(seed=2)
    gp, params = _params(global_net), _params(local_net)
    algo = SCAFFOLD()
    algo.c = {k: torch.randn_like(v) for k, v in gp.items()}
    c_i = {k: torch.randn_like(v) for k, v in gp.items()}
    algo.clients.put(0, {"c_i": c_i})
    ctx = context(global_net, gp)
    algo.client_begin(ctx)
    direction, _ = algo.direction(params, x, y, ctx)
    g, _ = FedAvg().direction(params, x, y, ctx)
    for k in gp:
        assert torch.equal(direction[k], g[k] + (algo.c[k] - c_i[k]))


def test_batched_task_gradient_path_matches_sequential_and_returns_contiguous_weights():
    from fl_lightning.engine import ClientPlan, RoundPlan, SequentialEngine
    from fl_lightning.engines import BatchedEngine

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 12), torch.nn.ReLU(),
                              torch.nn.Linear(12, 4)).double()
    x = torch.randn(60, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (60,))
    plan = RoundPlan(0, [ClientPlan(c, 20, list(torch.arange(20 * c, 20 * c + 20).split(6)))
                         for c in range(3)])
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    seq = SequentialEngine().run_round(FedAvg(), net, gp, {}, plan, (x, y), 0.1, 0.9, 1e-3)
    bat = BatchedEngine().run_round(FedAvg(), net, gp, {}, plan, (x, y), 0.1, 0.9, 1e-3)
    for a, b in zip(seq, bat, strict=True):
        assert all(b.params[k].is_contiguous() for k in b.params)
        assert max(float((a.params[k] - b.params[k]).abs().max()) for k in gp) < 1e-12
        assert float(a.loss) == pytest.approx(float(b.loss), abs=1e-12)


def test_fedsol_skips_the_proximal_pass_where_the_adaptive_radius_is_zero(monkeypatch):
    global_net, _, x, y = make_problem(seed=4)
    gp = _params(global_net)
    params = {k: v.clone() for k, v in gp.items()}  # the first local step: w = w_g
    algo = FedSoL(rho=2.0)
    ctx = context(global_net, gp, step=0)
    assert algo._radius_is_zero(params, ctx)
    calls = []
    monkeypatch.setattr(algo, "perturbation", lambda *a: calls.append(1) or FedSoL.perturbation(
        algo, *a))
    fast, fast_loss = algo.direction(params, x, y, ctx)
    assert calls == []  # the KL pass was skipped
    monkeypatch.setattr(algo, "_radius_is_zero", lambda *a: False)
    full, full_loss = algo.direction(params, x, y, ctx)
    assert calls == [1]
    assert all(torch.equal(fast[k], full[k]) for k in gp) and torch.equal(fast_loss, full_loss)
    moved = {k: v + 1e-3 for k, v in gp.items()}
    assert not FedSoL(rho=2.0)._radius_is_zero(moved, ctx)
    assert not FedSoL(rho=2.0, adaptive=False)._radius_is_zero(params, ctx)


@pytest.mark.parametrize("adaptive", [True, False])
def test_fedsol_in_place_perturbation_writes_only_its_own_scratch_tensors(adaptive):
    # the perturbation is computed in place into fresh tensors: the weights, the global
    # weights and a proximal algorithm's own tensors (SCAFFOLD's c - c_i) stay as they were
    global_net, local_net, x, y = make_problem(seed=6)
    gp, params = _params(global_net), _params(local_net)
    scaffold = SCAFFOLD()
    scaffold.c = {k: torch.randn_like(v) for k, v in gp.items()}
    scaffold.clients.put(0, {"c_i": {k: torch.randn_like(v) for k, v in gp.items()}})
    algo = FedSoL(rho=2.0, adaptive=adaptive, proximal=scaffold)
    ctx = context(global_net, gp, step=1)
    algo.client_begin(ctx)
    saved = [{k: v.clone() for k, v in d.items()}
             for d in (params, gp, ctx.state["correction"])]
    direction, _ = algo.direction(params, x, y, ctx)
    for before, after in zip(saved, (params, gp, ctx.state["correction"]), strict=True):
        assert all(torch.equal(before[k], after[k]) for k in before)
    eps = algo._scaled(dict(ctx.state["correction"]), params, ctx)
    perturbed = {k: params[k] + eps[k] for k in params}  # the out-of-place formula
    ref, _ = grad_of(lambda p: F.cross_entropy(functional_call(global_net, p, (x,)), y),
                     perturbed)
    assert all(torch.equal(direction[k], ref[k]) for k in params)
