"""Independent references for signs the other tests let through (issue: Fidelity).

- FedSoL with SCAFFOLD's / FedDyn's proximal source (paper Table 7): the perturbation follows
  ``c - c_i`` / ``alpha (w - w_g) - h_i``, each written here from the formula;
- FedNova's server step with momentum-corrected ``a_i``, where ``a_i`` is counted by summing
  the momentum weights step by step (not the closed form).
"""

from __future__ import annotations

import torch
from helpers import context, make_problem
from torch.func import functional_call

from fl_lightning.algorithms import SCAFFOLD, FedDyn, FedNova, FedSoL
from fl_lightning.algorithms.base import ClientResult, LocalContext

RHO = 2.0


def _grad_ce_at(net, point: dict, x, y) -> dict:
    p = {k: v.detach().clone().requires_grad_(True) for k, v in point.items()}
    logits = functional_call(net, p, (x,))
    loss = -torch.log_softmax(logits, 1)[torch.arange(len(y)), y].mean()
    g = torch.autograd.grad(loss, list(p.values()))
    return dict(zip(p, g, strict=True))


def _perturbed(params: dict, gp: dict, g_p: dict) -> dict:
    norm = torch.sqrt(sum((v ** 2).sum() for v in g_p.values()))
    out = {}
    for k, w in params.items():
        d = (w - gp[k]).abs()
        lam = d / d.norm(dim=0, keepdim=True).clamp_min(1e-12)
        out[k] = w + RHO * lam * g_p[k] / (norm + 1e-12)
    return out


def _check_source(algo: FedSoL, g_p_of, seed: int) -> None:
    global_net, local_net, x, y = make_problem(seed=seed, drift=0.1)
    gp = {k: p.detach().clone() for k, p in global_net.named_parameters()}
    params = {k: p.detach().clone() for k, p in local_net.named_parameters()}
    ctx = context(global_net, gp, step=1)
    algo.client_begin(ctx)
    got, _ = algo.direction(dict(params), x, y, ctx)
    want = _grad_ce_at(global_net, _perturbed(params, gp, g_p_of(params, gp)), x, y)
    flipped = _grad_ce_at(global_net, _perturbed(
        params, gp, {k: -v for k, v in g_p_of(params, gp).items()}), x, y)
    err = max(float((got[k] - want[k]).abs().max()) for k in want)
    gap = max(float((flipped[k] - want[k]).abs().max()) for k in want)
    assert err < 1e-12 and gap > 1e-4, (err, gap)


def test_fedsol_scaffold_source_is_c_minus_c_i():
    algo = FedSoL(proximal=SCAFFOLD())
    g = torch.Generator().manual_seed(5)
    global_net, _, _, _ = make_problem(seed=40)
    shapes = {k: p.shape for k, p in global_net.named_parameters()}
    c = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    c_i = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    algo.proximal.c = c
    algo.proximal.clients.put(0, {"c_i": c_i})
    _check_source(algo, lambda params, gp: {k: c[k] - c_i[k] for k in c}, seed=40)


def test_fedsol_feddyn_source_is_alpha_drift_minus_h_i():
    algo = FedSoL(proximal=FedDyn(alpha=0.5))
    g = torch.Generator().manual_seed(6)
    global_net, _, _, _ = make_problem(seed=41)
    h = {k: 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
         for k, p in global_net.named_parameters()}
    algo.proximal.clients.put(0, {"h_i": h})
    _check_source(
        algo, lambda params, gp: {k: 0.5 * (params[k] - gp[k]) - h[k] for k in params}, seed=41
    )


def _a_by_counting(steps: int, m: float) -> float:
    # heavy-ball SGD with a constant gradient moves by lr * sum_t sum_{j<t} m^j
    total, buf = 0.0, 0.0
    for _ in range(steps):
        buf = m * buf + 1.0
        total += buf
    return total


def test_fednova_server_step_uses_momentum_corrected_steps():
    torch.manual_seed(0)
    w = {"w": torch.randn(4, dtype=torch.float64)}
    algo = FedNova()
    results = []
    for cid, (n, steps) in enumerate([(30, 3), (10, 12)]):
        params = {"w": w["w"] - 0.05 * torch.randn(4, dtype=torch.float64)}
        r = ClientResult(client_id=cid, num_samples=n, params=params, num_steps=steps,
                         loss=torch.zeros(()))
        ctx = LocalContext(net=torch.nn.Identity(), global_params=w, buffers={}, round=0,
                           client_id=cid, lr=0.01, momentum=0.9)
        algo.client_end(ctx, r)
        results.append(r)
    out = algo.aggregate(w, results)
    p = [30 / 40, 10 / 40]
    a = [_a_by_counting(3, 0.9), _a_by_counting(12, 0.9)]
    tau_eff = sum(pi * ai for pi, ai in zip(p, a, strict=True))
    want = w["w"] - tau_eff * sum(
        pi * (w["w"] - r.params["w"]) / ai for pi, ai, r in zip(p, a, results, strict=True)
    )
    assert torch.allclose(out["w"], want, atol=1e-14, rtol=0)
    fedavg = sum(pi * r.params["w"] for pi, r in zip(p, results, strict=True))
    assert float((out["w"] - fedavg).abs().max()) > 1e-4  # the normalization matters here
