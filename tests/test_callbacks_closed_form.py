"""Analysis callbacks against closed forms on quadratic clients and dense Hessians."""

from __future__ import annotations

import itertools

import pytest
import torch
from analysis_helpers import (
    fake_module,
    fake_trainer,
    half_mse,
    half_sse,
    linear_net,
    local_gd_map,
    one_thread,  # noqa: F401  (fixture)
    quadratic_clients,
    quadratic_data,
    round_result,
    subsets_maps,
)
from torch import nn

from fl_lightning.algorithms.base import Algorithm
from fl_lightning.callbacks import (
    ClientOptimaProbe,
    ClientUpdateDispersion,
    GlobalOscillation,
    HessianEigenvalues,
    HeterogeneityFloor,
    WeightDivergence,
)
from fl_lightning.callbacks.functional import flatten, hessian_eigenvalues, lanczos, unflatten
from fl_lightning.engine import ClientPlan, RoundPlan, SequentialEngine

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------- Hessian spectrum
def test_hessian_eigenvalues_of_quadratic_clients_equal_eig_of_weighted_sum():
    a, b = quadratic_clients(dim=7, rows=(9, 8, 12, 10))
    sizes = [len(v) for v in b]
    p = [n / sum(sizes) for n in sizes]
    net = linear_net(7, torch.randn(7, dtype=torch.float64))
    params = {k: v.detach() for k, v in net.named_parameters()}
    h = sum(pk * ak.T @ ak for pk, ak in zip(p, a, strict=True))
    expected = torch.linalg.eigvalsh(h).flip(0)[:5]
    evals, evecs = hessian_eigenvalues(net, params, {}, list(zip(a, b, strict=True)), k=5,
                                       num_iter=7, criterion=half_sse, weights=p)
    assert _rel(evals, expected) < 1e-6
    # Ritz vectors are eigenvectors: H v = lambda v
    assert torch.allclose(h @ evecs, evecs * evals, atol=1e-8 * float(expected[0]))


def test_hessian_callback_on_quadratic_clients_uses_the_mean_loss_of_all_samples():
    a, b = quadratic_clients(dim=6, rows=(9, 8, 12, 11))
    data = quadratic_data(a, b)  # 40 samples
    net = linear_net(6)
    module = fake_module(net, data)
    cb = HessianEigenvalues(every_n_rounds=2, k=5, num_iter=6, num_batches=4, batch_size=10,
                            criterion=half_mse)
    params = {k: v.detach() for k, v in net.named_parameters()}
    trainer = fake_trainer()
    for r in range(4):
        cb.on_round_end(trainer, module, round_result(r, params, [params], [1]))
    # f = 1/N sum_i 1/2 (a_i w - b_i)^2 = sum_k p_k f_k with A_k scaled by 1/sqrt(n_k)
    h = data.x.T @ data.x / len(data.y)
    expected = torch.linalg.eigvalsh(h).flip(0)[:5]
    assert [row["round"] for row in cb.history] == [2.0, 4.0]
    got = torch.tensor([cb.history[-1][f"lambda_{i}"] for i in range(1, 6)])
    assert _rel(got, expected) < 1e-6
    assert cb.history[-1]["ratio_1_5"] == pytest.approx(float(expected[0] / expected[4]),
                                                        rel=1e-6)


def test_hessian_eigenvalues_of_a_tiny_network_agree_with_the_dense_hessian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(20, 5, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (20,), generator=g)) for _ in range(2)]
    x_all = torch.cat([x for x, _ in batches])
    y_all = torch.cat([y for _, y in batches])

    def loss_of_vector(vec):
        return nn.functional.cross_entropy(
            torch.func.functional_call(net, unflatten(vec, params), (x_all,)), y_all)

    dense = torch.autograd.functional.hessian(loss_of_vector, flatten(params))
    expected = torch.linalg.eigvalsh(dense).flip(0)[:5]
    dim = dense.shape[0]  # 57
    evals, _ = hessian_eigenvalues(net, params, {}, batches, k=5, num_iter=dim)
    assert _rel(evals, expected) < 1e-6
    # fewer Lanczos steps still resolve the top eigenvalue
    top, _ = hessian_eigenvalues(net, params, {}, batches, k=1, num_iter=30)
    assert float(top[0]) == pytest.approx(float(expected[0]), rel=1e-6)


def test_lanczos_smallest_and_early_stop_on_an_invariant_subspace():
    diag = torch.tensor([5.0, 3.0, 3.0, 1.0, -2.0], dtype=torch.float64)
    low, _ = lanczos(lambda v: diag * v, 5, 2, num_iter=5, dtype=torch.float64,
                     which="smallest")
    assert low.tolist() == pytest.approx([-2.0, 1.0], abs=1e-12)
    # a rank-one operator: the Krylov space has dimension 1, Lanczos stops after one step
    u = torch.ones(5, dtype=torch.float64) / 5 ** 0.5
    evals, _ = lanczos(lambda v: 4.0 * u * (u @ v), 5, 3, num_iter=5, dtype=torch.float64)
    assert float(evals[0]) == pytest.approx(4.0, rel=1e-12)


# ---------------------------------------------------------------------- divergence, dispersion
def _random_params(g, shapes):
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


def test_weight_divergence_equals_a_direct_computation():
    g = torch.Generator().manual_seed(3)
    shapes = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 4)}
    wg = _random_params(g, shapes)
    clients = [_random_params(g, shapes) for _ in range(5)]
    cb = WeightDivergence(per_layer=True)
    cb.on_round_end(fake_trainer(), None, round_result(0, wg, clients, [10, 20, 30, 40, 50]))
    row = cb.history[0]

    def dist(u, v):
        return sum(((u[k] - v[k]) ** 2).sum() for k in shapes) ** 0.5

    d = torch.tensor([float(dist(wg, c)) for c in clients], dtype=torch.float64)
    pair = [float(dist(ci, cj)) for ci, cj in itertools.combinations(clients, 2)]
    assert row["div_mean"] == pytest.approx(float(d.mean()), rel=1e-12)
    assert row["div_std"] == pytest.approx(float(d.std(unbiased=False)), rel=1e-12)
    assert row["div_max"] == pytest.approx(float(d.max()), rel=1e-12)
    assert row["pairwise_mean"] == pytest.approx(sum(pair) / len(pair), rel=1e-12)
    for k in shapes:
        per = [float((wg[k] - c[k]).norm()) for c in clients]
        assert row[f"div/{k}"] == pytest.approx(sum(per) / 5, rel=1e-12)


def test_update_dispersion_and_b_local_dissimilarity_equal_closed_forms():
    a, b = quadratic_clients(dim=4, rows=(6, 8, 7, 9))
    data = quadratic_data(a, b)
    sizes = [len(v) for v in b]
    p = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    w = torch.randn(4, dtype=torch.float64)
    net = linear_net(4, w)
    wg = {"weight": w.view(1, -1).clone()}
    g = torch.Generator().manual_seed(5)
    clients = [{"weight": wg["weight"] + torch.randn(1, 4, generator=g, dtype=torch.float64)}
               for _ in range(4)]
    cb = ClientUpdateDispersion(criterion=half_sse, batch_size=100)
    cb.on_round_end(fake_trainer(), fake_module(net, data), round_result(0, wg, clients, sizes))
    row = cb.history[0]
    u = torch.stack([c["weight"].view(-1) - w for c in clients])
    ubar = (p[:, None] * u).sum(0)
    disp = float(torch.sqrt((p * ((u - ubar) ** 2).sum(1)).sum()))
    assert row["dispersion"] == pytest.approx(disp, rel=1e-12)
    assert row["relative_dispersion"] == pytest.approx(disp / float(ubar.norm()), rel=1e-12)
    cos = [float(torch.nn.functional.cosine_similarity(u[i], u[j], dim=0))
           for i, j in itertools.combinations(range(4), 2)]
    assert row["cos_pairwise_mean"] == pytest.approx(sum(cos) / len(cos), rel=1e-10)
    assert row["cos_pairwise_min"] == pytest.approx(min(cos), rel=1e-10)
    # B(w) with grad f_k(w) = A_k^T (A_k w - b_k), at the global weights after the round
    grads = torch.stack([ak.T @ (ak @ w - bk) for ak, bk in zip(a, b, strict=True)])
    num = torch.sqrt((p * (grads ** 2).sum(1)).sum())
    den = (p[:, None] * grads).sum(0).norm()
    assert row["b_local"] == pytest.approx(float(num / den), rel=1e-10)
    assert row["b_local"] >= 1.0


# ---------------------------------------------------------------------- FedAvg dynamics
class _QuadraticFedAvg(Algorithm):
    """FedAvg whose client k minimizes 1/2 ||A_k w - b_k||^2 (direction = its gradient)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def direction(self, params, x, y, ctx):
        a, b = self.a[ctx.client_id], self.b[ctx.client_id]
        w = params["weight"].view(-1)
        r = a @ w - b
        return {"weight": (a.T @ r).view_as(params["weight"])}, 0.5 * (r ** 2).sum()


def test_fedavg_fixed_point_under_full_participation_equals_its_closed_form():
    a, b = quadratic_clients(dim=3, rows=(10, 12, 11, 13))
    sizes = [len(v) for v in b]
    p = [n / sum(sizes) for n in sizes]
    lr, steps = 0.02, 3
    maps = [local_gd_map(ak, bk, lr, steps) for ak, bk in zip(a, b, strict=True)]
    eye = torch.eye(3, dtype=torch.float64)
    m_bar = sum(pk * m for pk, (m, _) in zip(p, maps, strict=True))
    c_bar = sum(pk * c for pk, (_, c) in zip(p, maps, strict=True))
    w_fixed = torch.linalg.solve(eye - m_bar, c_bar)

    algo = _QuadraticFedAvg(a, b)
    net = linear_net(3)
    engine = SequentialEngine()
    dummy = (torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1))
    plan = RoundPlan(0, [ClientPlan(k, sizes[k], [torch.zeros(1, dtype=torch.long)] * steps)
                         for k in range(4)])
    cb = GlobalOscillation(window=10)
    w = {"weight": torch.zeros(1, 3, dtype=torch.float64)}
    for r in range(400):
        results = engine.run_round(algo, net, w, {}, plan, dummy, lr, 0.0, 0.0)
        new = algo.aggregate(w, results)
        cb.on_round_end(fake_trainer(), None, round_result(r, w, [c.params for c in results],
                                                           sizes, global_after=new))
        w = new
    assert torch.allclose(w["weight"].view(-1), w_fixed, atol=1e-10)
    assert cb.history[-1]["step_norm"] < 1e-10 and cb.history[-1]["radius"] < 1e-10
    # the fixed point is not the minimizer of F = sum p_k f_k: heterogeneity biases FedAvg
    h = sum(pk * ak.T @ ak for pk, ak in zip(p, a, strict=True))
    w_opt = torch.linalg.solve(h, sum(pk * ak.T @ bk for pk, ak, bk in zip(p, a, b, strict=True)))
    assert float((w_fixed - w_opt).norm()) > 1e-2


def test_stationary_oscillation_radius_under_partial_participation_equals_its_closed_form():
    """2 of 4 quadratic clients per round: w_{t+1} = M_S w_t + c_S with S uniform.

    Stationary mean mu = (I - E M_S)^-1 E c_S and second moment S2 solving
    S2 = E[M S2 M^T] + E[M mu c^T] + E[c mu^T M^T] + E[c c^T]; radius^2 = tr(S2) - |mu|^2.
    The callback's window estimate (20000 rounds, window mean as the centre) must agree to 3%
    (its sampling error here is below 1%).
    """
    a, b = quadratic_clients(seed=2, dim=3, rows=(10, 12, 11, 13))
    sizes = [len(v) for v in b]
    lr, steps = 0.02, 3
    maps = [local_gd_map(ak, bk, lr, steps) for ak, bk in zip(a, b, strict=True)]
    subsets = subsets_maps(maps, sizes, 2)
    q = 1.0 / len(subsets)
    d = 3
    eye = torch.eye(d, dtype=torch.float64)
    e_m = sum(q * m for _, m, _ in subsets)
    e_c = sum(q * c for _, _, c in subsets)
    mu = torch.linalg.solve(eye - e_m, e_c)
    e_mm = sum(q * torch.kron(m, m) for _, m, _ in subsets)
    rest = sum(q * (torch.outer(m @ mu, c) + torch.outer(c, m @ mu) + torch.outer(c, c))
               for _, m, c in subsets)
    s2 = torch.linalg.solve(torch.eye(d * d, dtype=torch.float64) - e_mm,
                            rest.reshape(-1)).reshape(d, d)
    radius = float(torch.sqrt(torch.trace(s2) - mu @ mu))
    assert radius > 0.05  # a real oscillation, not rounding

    rounds = 20000
    cb = GlobalOscillation(window=rounds, every_n_rounds=rounds)
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(subsets), (rounds + 200,), generator=g).tolist()
    w = mu.clone()
    trainer = fake_trainer()
    for t, i in enumerate(picks):
        _, m, c = subsets[i]
        new = m @ w + c
        if t >= 200:  # burn-in
            cb.on_round_end(trainer, None, round_result(
                t - 200, {"weight": w.view(1, -1)}, [{"weight": new.view(1, -1)}], [1],
                global_after={"weight": new.view(1, -1)}))
        w = new
    row = cb.history[-1]
    assert row["radius"] == pytest.approx(radius, rel=0.03)
    assert float((cb.center - mu).norm()) < 0.05 * radius
    assert row["straightness"] < 0.01  # it wanders in a region, it does not travel


# ---------------------------------------------------------------------- optima and floor
def test_heterogeneity_floor_of_quadratic_clients_equals_its_exact_value():
    a, b = quadratic_clients(seed=4, dim=3, rows=(10, 12, 11, 13))
    data = quadratic_data(a, b)
    sizes = torch.tensor([len(v) for v in b], dtype=torch.float64)
    p = sizes / sizes.sum()
    w_star = [torch.linalg.lstsq(ak, bk).solution for ak, bk in zip(a, b, strict=True)]
    f_star = [0.5 * float(((ak @ ws - bk) ** 2).sum()) for ak, bk, ws in zip(a, b, w_star,
                                                                            strict=True)]
    hs = [ak.T @ ak for ak in a]
    h = sum(pk * hk for pk, hk in zip(p, hs, strict=True))
    w_opt = torch.linalg.solve(h, sum(pk * ak.T @ bk for pk, ak, bk in zip(p, a, b,
                                                                          strict=True)))
    f_opt = sum(float(pk) * 0.5 * float(((ak @ w_opt - bk) ** 2).sum())
                for pk, ak, bk in zip(p, a, b, strict=True))
    floor = f_opt - float(sum(pk * fk for pk, fk in zip(p, f_star, strict=True)))
    centroid = sum(pk * ws for pk, ws in zip(p, w_star, strict=True))
    spread = float(sum(pk * ((ws - centroid) ** 2).sum() for pk, ws in zip(p, w_star,
                                                                           strict=True)))
    mu = min(float(torch.linalg.eigvalsh(hk)[0]) for hk in hs)
    big_l = max(float(torch.linalg.eigvalsh(hk)[-1]) for hk in hs)

    cb = HeterogeneityFloor(every_n_rounds=1, clients=[0, 1, 2, 3], lr=1.0 / big_l,
                            momentum=0.5, max_steps=20000, grad_tol=1e-11, batch_size=100,
                            criterion=half_sse, curvature=True, curvature_iter=3)
    net = linear_net(3)
    w = {"weight": w_opt.view(1, -1)}
    cb.on_round_end(fake_trainer(), fake_module(net, data), round_result(0, w, [w], [1]))
    row = cb.history[0]
    assert row["converged"] == 1.0  # every probe stopped by the gradient tolerance
    assert row["gap"] == pytest.approx(floor, rel=1e-8)
    assert row["spread_V"] == pytest.approx(spread, rel=1e-8)
    assert row["mu"] == pytest.approx(mu, rel=1e-8)
    assert row["L"] == pytest.approx(big_l, rel=1e-8)
    assert row["bound_lower"] <= row["gap"] <= row["bound_upper"]
    for k, ws in enumerate(w_star):
        assert torch.allclose(cb.optima[k]["weight"].view(-1), ws, atol=1e-9)


def test_client_optima_probe_reports_its_stopping_rule_and_max_steps_stop():
    a, b = quadratic_clients(seed=4, dim=3, rows=(10, 12, 11, 13))
    data = quadratic_data(a, b)
    cb = ClientOptimaProbe(clients=[1, 2], lr=0.001, momentum=0.0, max_steps=5,
                           grad_tol=1e-12, criterion=half_sse)
    assert "5 steps" in cb.stopping_rule() and "1e-12" in cb.stopping_rule()
    net = linear_net(3)
    w = {"weight": torch.zeros(1, 3, dtype=torch.float64)}
    cb.on_round_end(fake_trainer(), fake_module(net, data), round_result(49, w, [w], [1]))
    row = cb.history[0]
    assert row["round"] == 50.0 and row["steps_mean"] == 5.0 and row["converged"] == 0.0
    assert sorted(cb.optima) == [1, 2] and cb.info[1]["reason"] == 0.0


# ---------------------------------------------------------------------- landscape
def test_loss_landscape_along_hessian_eigenvectors_is_the_quadratic_closed_form(tmp_path):
    """F(w + a v1 + b v2) = F(w) + a g.v1 + b g.v2 + (l1 a^2 + l2 b^2) / 2 for a quadratic;
    the eigenvectors measured by HessianEigenvalues at the same round are reused."""
    from fl_lightning.callbacks import LossLandscape

    a, b = quadratic_clients(dim=4, rows=(9, 8, 12, 11))
    data = quadratic_data(a, b)
    w = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
    net = linear_net(4, w)
    module = fake_module(net, data)
    hess = HessianEigenvalues(every_n_rounds=1, k=2, num_iter=4, num_batches=1, batch_size=40,
                              criterion=half_mse)
    land = LossLandscape(every_n_rounds=1, resolution=5, span=2.0, num_iter=4, num_batches=1,
                         batch_size=40, criterion=half_mse)
    trainer = fake_trainer(str(tmp_path))
    trainer.callbacks = [hess, land]
    params = {"weight": w.view(1, -1)}
    rr = round_result(0, params, [params], [1])
    hess.on_round_end(trainer, module, rr)
    land.on_round_end(trainer, module, rr)
    g = land.grids[1]
    x, y = data.x, data.y
    h = x.T @ x / len(y)
    grad = x.T @ (x @ w - y) / len(y)
    f0 = 0.5 * float(((x @ w - y) ** 2).mean())
    evals, evecs = torch.linalg.eigh(h)
    l1, l2 = float(evals[-1]), float(evals[-2])
    v1, v2 = evecs[:, -1], evecs[:, -2]
    # eigenvector signs are arbitrary: compare with the sign the callback used
    s1 = torch.sign(hess.eigenvectors[:, 0] @ v1)
    s2 = torch.sign(hess.eigenvectors[:, 1] @ v2)
    for i, bb in enumerate(g["b"].tolist()):
        for j, aa in enumerate(g["a"].tolist()):
            expected = (f0 + aa * float(s1 * grad @ v1) + bb * float(s2 * grad @ v2)
                        + 0.5 * (l1 * aa ** 2 + l2 * bb ** 2))
            assert float(g["loss"][i, j]) == pytest.approx(expected, rel=1e-9)
    assert land.history[0]["center_loss"] == pytest.approx(f0, rel=1e-12)
    assert land._shared_eigenvectors(trainer, 1) is not None  # reused, no second Lanczos
    assert (tmp_path / "analysis" / "landscape_round1.png").exists()
