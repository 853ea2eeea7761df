"""Local steps and server rules of SCAFFOLD, FedDyn, FedNova, MOON, FedNTD, FedBABU, Per-FedAvg
and FedSoL's proximal sources against literal float64 references (autograd on ``nn.Module``
copies and ``torch.optim.SGD``, written from the formulas)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyNet, make_problem
from torch import nn

from fl_lightning.algorithms import (
    MOON,
    SCAFFOLD,
    FedBABU,
    FedDyn,
    FedNova,
    FedNTD,
    FedProx,
    FedSoL,
    PerFedAvg,
)
from fl_lightning.algorithms.scaffold import effective_steps
from fl_lightning.engine import ClientPlan, RoundPlan, SequentialEngine
from fl_lightning.errors import ConfigError
from fl_lightning.optim import FedYogi

LR, MOM, WD = 0.05, 0.9, 1e-5


class FeatNet(TinyNet):
    def forward_features(self, x):
        return self.body(x)


def _params(net):
    return {k: p.detach().clone() for k, p in net.named_parameters()}


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _rand_like(params, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


def _round(algo, net, gp, x, y, client_batches, lr=LR, momentum=MOM, wd=WD, num_clients=None):
    """One round of the sequential engine; client_batches: {client_id: [index tensors]}."""
    # client c has 10 + c samples (its aggregation weight)
    clients = [ClientPlan(c, 10 + c, b) for c, b in client_batches.items()]
    plan = RoundPlan(0, clients, num_clients=num_clients, total_samples=None)
    results = SequentialEngine().run_round(algo, net, gp, {}, plan, (x, y), lr, momentum, wd)
    for r in results:  # the round loop commits the kept clients' new state
        algo.commit_client(r)
    return results


def _ref_train(net, batches, x, y, loss_fn, grad_fn=None, lr=LR, momentum=MOM, wd=WD):
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    for b in batches:
        opt.zero_grad()
        loss_fn(net, x[b], y[b]).backward()
        if grad_fn is not None:
            for n, p in net.named_parameters():
                p.grad = grad_fn(n, p.grad)
        opt.step()
    return _params(net)


def test_scaffold_client_and_server_match_reference():
    global_net, _, x, y = make_problem(seed=7)
    gp = _params(global_net)
    batches = list(torch.arange(40).split(10)) * 2
    algo = SCAFFOLD()
    c, c_i = _rand_like(gp, 1), _rand_like(gp, 2)
    algo.c = {k: v.clone() for k, v in c.items()}
    algo.clients.put(3, {"c_i": c_i})
    [res] = _round(algo, global_net, gp, x, y, {3: batches}, num_clients=10)
    ref = _ref_train(copy.deepcopy(global_net), batches, x, y,
                     lambda m, xb, yb: F.cross_entropy(m(xb), yb),
                     lambda n, g: g - c_i[n] + c[n])
    assert _max_diff(res.params, ref) < 1e-10
    k_eff = effective_steps(len(batches), MOM)
    assert k_eff == pytest.approx(sum(sum(MOM**j for j in range(t + 1)) for t in range(8)))
    c_plus = {k: c_i[k] - c[k] + (gp[k] - ref[k]) / (k_eff * LR) for k in gp}
    stored = algo.clients.get(3, dict)["c_i"]
    assert _max_diff(stored, c_plus) < 1e-10
    algo.aggregate(gp, [res], num_clients=10)
    assert _max_diff(algo.c, {k: c[k] + 0.1 * (c_plus[k] - c_i[k]) for k in c}) < 1e-10


def test_feddyn_client_and_server_match_reference():
    global_net, _, x, y = make_problem(seed=8)
    gp = _params(global_net)
    alpha = 0.3
    h_i = _rand_like(gp, 3, 0.05)
    algo = FedDyn(alpha=alpha)
    algo.clients.put(0, {"h_i": h_i})
    b0, b1 = list(torch.arange(20).split(10)), list(torch.arange(20, 40).split(10)) * 2
    res = _round(algo, global_net, gp, x, y, {0: b0, 1: b1}, num_clients=5)

    def dyn_loss(h):
        def loss(m, xb, yb):
            ps = dict(m.named_parameters())
            lin = sum((h[n] * ps[n]).sum() for n in ps)
            sq = sum(((gp[n] - ps[n]) ** 2).sum() for n in ps)
            return F.cross_entropy(m(xb), yb) - lin + 0.5 * alpha * sq
        return loss

    ref0 = _ref_train(copy.deepcopy(global_net), b0, x, y, dyn_loss(h_i))
    ref1 = _ref_train(copy.deepcopy(global_net), b1, x, y,
                      dyn_loss({k: torch.zeros_like(v) for k, v in gp.items()}))
    assert _max_diff(res[0].params, ref0) < 1e-10 and _max_diff(res[1].params, ref1) < 1e-10
    assert _max_diff(algo.clients.get(0, dict)["h_i"],
                     {k: h_i[k] - alpha * (ref0[k] - gp[k]) for k in gp}) < 1e-10
    new = algo.aggregate(gp, res, num_clients=5)
    h = {k: -(alpha / 5) * ((ref0[k] - gp[k]) + (ref1[k] - gp[k])) for k in gp}
    # sizes 10 and 11 (see _round): (10 w_0 + 11 w_1) / 21, in the weights' dtype (before the
    # streamed sums the weights 10/21, 11/21 were rounded to float32 first)
    p0, p1 = 10.0 / 21.0, 11.0 / 21.0
    assert _max_diff(new, {k: p0 * ref0[k] + p1 * ref1[k] - h[k] / alpha for k in gp}) < 1e-10


def test_fednova_ccvr_direction_and_server_state():
    global_net, _, x, y = make_problem(seed=9)
    gp = _params(global_net)
    algo = FedNova(ccvr=True, ccvr_server_update=False)  # the official code: d stays 0
    d_i = _rand_like(gp, 4)
    algo.clients.put(2, {"d_i": d_i})
    batches = list(torch.arange(40).split(10))
    [res] = _round(algo, global_net, gp, x, y, {2: batches})
    ref = _ref_train(copy.deepcopy(global_net), batches, x, y,
                     lambda m, xb, yb: F.cross_entropy(m(xb), yb), lambda n, g: g - d_i[n])
    assert _max_diff(res.params, ref) < 1e-10
    a = effective_steps(4, MOM)
    d_new = {k: (gp[k] - ref[k]) / (LR * a) for k in gp}
    assert _max_diff(algo.clients.get(2, dict)["d_i"], d_new) < 1e-10


def test_moon_matches_reference():
    torch.manual_seed(0)
    global_net = FeatNet().double()
    prev_net = copy.deepcopy(global_net)
    with torch.no_grad():
        for p in prev_net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (30,), generator=g)
    gp = _params(global_net)
    algo = MOON(mu=0.7, tau=0.5)
    algo.clients.put(0, {"prev": _params(prev_net)})
    batches = list(torch.arange(30).split(10)) * 2
    [res] = _round(algo, global_net, gp, x, y, {0: batches})
    sim = nn.CosineSimilarity(dim=-1)

    def loss(m, xb, yb):
        z = m.body(xb)
        with torch.no_grad():
            zg, zp = global_net.body(xb), prev_net.body(xb)
        logits = torch.cat([sim(z, zg).reshape(-1, 1), sim(z, zp).reshape(-1, 1)], 1) / 0.5
        con = F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long))
        return F.cross_entropy(m.head(z), yb) + 0.7 * con

    ref = _ref_train(copy.deepcopy(global_net), batches, x, y, loss)
    assert _max_diff(res.params, ref) < 1e-10
    assert _max_diff(algo.clients.get(0, dict)["prev"], res.params) == 0.0  # the new previous model


def test_moon_first_previous_is_the_initial_model():
    torch.manual_seed(0)
    net = FeatNet().double()
    x, y = torch.randn(10, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (10,))
    algo = MOON()
    g0 = _params(net)
    _round(algo, net, g0, x, y, {0: [torch.arange(10)]})
    g1 = {k: v + 1.0 for k, v in g0.items()}
    from helpers import context

    ctx = context(net, g1)
    ctx.client_id = 5
    algo.client_begin(ctx)
    assert _max_diff(ctx.state["prev"], g0) == 0.0


def test_moon_needs_features():
    global_net, _, x, y = make_problem()
    with pytest.raises(ConfigError, match="forward_features") as err:
        _round(MOON(), global_net, _params(global_net), x, y, {0: [torch.arange(5)]})
    assert "\n" not in str(err.value)


def _refine(logits, targets, c):
    pos = torch.arange(c).repeat(len(logits), 1)
    pos = pos[pos != targets.view(-1, 1)].view(-1, c - 1)
    return torch.gather(logits, 1, pos)


@pytest.mark.parametrize("tau,beta", [(1.0, 1.0), (3.0, 0.5)])
def test_fedntd_matches_reference(tau, beta):
    global_net, _, x, y = make_problem(seed=10)
    gp = _params(global_net)
    batches = list(torch.arange(40).split(10)) * 2
    [res] = _round(FedNTD(tau=tau, beta=beta), global_net, gp, x, y, {0: batches})
    kl = nn.KLDivLoss(reduction="batchmean")

    def loss(m, xb, yb):
        out = m(xb)
        with torch.no_grad():
            dg = torch.softmax(_refine(global_net(xb), yb, 4) / tau, 1)
        ntd = tau**2 * kl(F.log_softmax(_refine(out, yb, 4) / tau, 1), dg)
        return F.cross_entropy(out, yb) + beta * ntd

    ref = _ref_train(copy.deepcopy(global_net), batches, x, y, loss)
    assert _max_diff(res.params, ref) < 1e-10


def test_fedbabu_keeps_the_head_at_its_initial_weights():
    global_net, _, x, y = make_problem(seed=11)
    gp = _params(global_net)
    [res] = _round(FedBABU(), global_net, gp, x, y, {0: list(torch.arange(40).split(10))})
    assert torch.equal(res.params["head.weight"], gp["head.weight"])
    assert torch.equal(res.params["head.bias"], gp["head.bias"])
    assert not torch.equal(res.params["body.0.weight"], gp["body.0.weight"])


def test_perfedavg_step_matches_reference():
    global_net, _, x, y = make_problem(seed=12)
    gp = _params(global_net)
    beta = 0.02
    [res] = _round(PerFedAvg(beta=beta), global_net, gp, x, y, {0: [torch.arange(20)]},
                   momentum=0.0, wd=0.0)
    m = copy.deepcopy(global_net)
    loss = F.cross_entropy(m(x[:10]), y[:10])
    g1 = torch.autograd.grad(loss, list(m.parameters()))
    with torch.no_grad():
        for p, g in zip(m.parameters(), g1, strict=True):
            p.sub_(LR * g)
    g2 = torch.autograd.grad(F.cross_entropy(m(x[10:20]), y[10:20]), list(m.parameters()))
    ref = {k: gp[k] - beta * g for k, g in zip(gp, g2, strict=True)}
    assert _max_diff(res.params, ref) < 1e-12


@pytest.mark.parametrize("adaptive", [True, False])
def test_fedsol_with_fedprox_source_matches_reference(adaptive):
    global_net, local_net, x, y = make_problem(seed=13)
    gp, params = _params(global_net), _params(local_net)
    mu, rho = 1.0, 0.5
    from helpers import context

    algo = FedSoL(rho=rho, adaptive=adaptive, proximal=FedProx(mu=mu))
    direction, _ = algo.direction(dict(params), x, y, context(global_net, gp, step=1))
    # reference: eps = rho * Lambda * g_p / ||g_p||, g_p = mu (w - w_g); grad CE at w + eps
    g_p = {k: mu * (params[k] - gp[k]) for k in gp}
    norm = torch.sqrt(sum((v**2).sum() for v in g_p.values()))
    m = copy.deepcopy(local_net)
    with torch.no_grad():
        for n, p in m.named_parameters():
            diff = (params[n] - gp[n]).abs()
            lam = diff / torch.sqrt((diff**2).sum(0, keepdim=True)).clamp_min(1e-12) if adaptive \
                else torch.ones_like(diff)
            p.add_(rho * lam * g_p[n] / (norm + 1e-12))
    ref = torch.autograd.grad(F.cross_entropy(m(x), y), list(m.parameters()))
    assert _max_diff(direction, dict(zip(gp, ref, strict=True))) < 1e-12


def test_fedsol_with_scaffold_source_keeps_scaffold_state():
    global_net, _, x, y = make_problem(seed=14)
    gp = _params(global_net)
    algo = FedSoL(proximal=SCAFFOLD())
    res = _round(algo, global_net, gp, x, y, {0: list(torch.arange(40).split(10))}, num_clients=4)
    algo.aggregate(gp, res, num_clients=4)
    state = algo.state_dict()
    assert 0 in state["clients"]["clients"] and state["server"]["c"] is not None
    assert float(sum(v.abs().sum() for v in state["server"]["c"].values())) > 0


@pytest.mark.parametrize("source", ["local", "proximal"])
def test_fedsol_ablation_knobs(source):
    global_net, local_net, x, y = make_problem(seed=15)
    gp, params = _params(global_net), _params(local_net)
    from helpers import context

    ctx = context(global_net, gp, step=1)
    base, _ = FedSoL(rho=0.0).direction(dict(params), x, y, ctx)
    d, _ = FedSoL(rho=0.0, proximal_in_update=2.0, source=source).direction(dict(params), x, y,
                                                                           ctx)
    prox, _ = FedSoL().proximal_gradient(dict(params), x, y, ctx)
    assert _max_diff(d, {k: base[k] + 2.0 * prox[k] for k in base}) < 1e-12


def test_fedyogi_matches_its_formula():
    torch.manual_seed(0)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ref, m, v = w.detach().clone(), torch.zeros(5, dtype=torch.float64), None
    opt = FedYogi([w], lr=0.1, betas=(0.9, 0.99), tau=1e-3)
    for _ in range(3):
        g = torch.randn(5, dtype=torch.float64)
        w.grad = g.clone()
        opt.step()
        v = torch.full_like(g, 1e-6) if v is None else v
        m = 0.9 * m + 0.1 * g
        v = v - 0.01 * g * g * torch.sign(v - g * g)
        ref = ref - 0.1 * m / (v.sqrt() + 1e-3)
    assert torch.allclose(w.detach(), ref, atol=1e-14, rtol=0)


@pytest.mark.parametrize("make,option", [
    (lambda: FedDyn(alpha=0.0), "--model.algorithm.alpha"),
    (lambda: MOON(tau=0.0), "--model.algorithm.tau"),
    (lambda: FedNTD(beta=-1.0), "--model.algorithm.beta"),
    (lambda: SCAFFOLD(state_device="nowhere"), "--model.algorithm.state_device"),
    (lambda: FedSoL(proximal=FedBABU()), "--model.algorithm.proximal"),
    (lambda: FedSoL(source="random"), "--model.algorithm.source"),
])
def test_bad_values_are_one_line_errors(make, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")) as err:
        make()
    assert "\n" not in str(err.value)


def test_fedadagrad_matches_reddi_algorithm_2():
    from fl_lightning.optim import FedAdagrad

    torch.manual_seed(1)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ref, m, v = w.detach().clone(), torch.zeros(5, dtype=torch.float64), None
    opt = FedAdagrad([w], lr=0.1, beta1=0.9, tau=1e-3)
    for _ in range(3):
        g = torch.randn(5, dtype=torch.float64)
        w.grad = g.clone()
        opt.step()
        v = torch.full_like(g, 1e-6) if v is None else v
        m = 0.9 * m + 0.1 * g
        v = v + g * g
        ref = ref - 0.1 * m / (v.sqrt() + 1e-3)
    assert torch.allclose(w.detach(), ref, atol=1e-14, rtol=0)
