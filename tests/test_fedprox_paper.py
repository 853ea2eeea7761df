"""The FedProx paper's experiments: synthetic data, MNIST power-law devices, logistic regression,
uniform-epoch stragglers with FedAvg's drop and FedProx's partial-work rules, and the exact
global optimum (GlobalObjective)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fl_lightning.algorithms import FedAvg, FedDyn, FedProx
from fl_lightning.callbacks import GlobalObjective
from fl_lightning.callbacks.functional import exact_minimum, flatten
from fl_lightning.data.heterogeneity import datamodule_report
from fl_lightning.data.module import FederatedDataModule
from fl_lightning.data.natural import (
    powerlaw_devices,
    synthetic,
    synthetic_devices,
    synthetic_sizes,
)
from fl_lightning.engine import SequentialEngine
from fl_lightning.errors import ConfigError
from fl_lightning.grid import Setting, parse_setting
from fl_lightning.models import LogisticRegression
from fl_lightning.module import FederatedModule
from fl_lightning.systems import Participation
from fl_lightning.systems.participation import straggler_epochs
from tests.test_datasets import write_idx

# ------------------------------------------------------------------ synthetic data


def test_synthetic_sizes_lognormal_plus_50():
    sizes = synthetic_sizes(20000, np.random.default_rng(0))
    assert sizes.min() >= 50 and sizes.dtype == np.int64
    # int(lognormal(4, 2)): median e^4 = 54.6 (the floor moves it by < 1)
    assert abs(np.median(sizes - 50) - math.exp(4)) < 0.06 * math.exp(4)
    # share above e^(4 + 2): P(Z > 1) = 0.1587
    assert abs(np.mean(sizes - 50 >= math.exp(6)) - 0.1587) < 0.01


def test_synthetic_priors_and_labels():
    xs, ys, pr = synthetic_devices(0.5, 2.0, num_devices=300, seed=3)
    assert abs(pr["u"].std() - 0.5) < 0.06 and abs(pr["B"].std() - 2.0) < 0.25
    assert np.allclose(pr["b"].shape, (300, 10)) and pr["W"].shape == (300, 60, 10)
    # W_k, b_k ~ N(u_k, 1); v_k ~ N(B_k, 1)
    assert abs((pr["W"] - pr["u"][:, None, None]).std() - 1) < 0.01
    assert abs((pr["v"] - pr["B"][:, None]).std() - 1) < 0.02
    # x ~ N(v_k, diag(j^-1.2)): per-feature variance after removing each device's mean
    centered = np.concatenate([x - v for x, v in zip(xs, pr["v"], strict=True)])
    var = centered.var(0)
    expected = np.arange(1, 61) ** -1.2
    assert np.all(np.abs(var / expected - 1) < 0.05)
    for k in (0, 17, 299):  # labels: argmax of the device's own linear model
        assert np.array_equal(ys[k], np.argmax(xs[k] @ pr["W"][k] + pr["b"][k], axis=1))
        assert len(ys[k]) == pr["sizes"][k]


def test_synthetic_zero_priors_and_iid():
    _, _, pr = synthetic_devices(0, 0, num_devices=5, seed=1)
    assert np.all(pr["u"] == 0) and np.all(pr["B"] == 0)
    assert not np.allclose(pr["W"][0], pr["W"][1])  # W_k ~ N(0, 1) still differs per device
    xs, ys, pr = synthetic_devices(0, 0, iid=True, num_devices=5, seed=1)
    assert np.all(pr["W"] == pr["W"][0]) and np.all(pr["v"] == 0)
    assert np.array_equal(ys[2], np.argmax(xs[2] @ pr["W"][0] + pr["b"][0], axis=1))


def test_synthetic_deterministic_and_split():
    a, b, c = synthetic(1, 1, seed=5), synthetic(1, 1, seed=5), synthetic(1, 1, seed=6)
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.test_y, b.test_y)
    assert not np.array_equal(a.train_y[:50], c.train_y[:50])
    xs, ys, pr = synthetic_devices(1, 1, seed=5)
    assert len(a.train_parts) == 30
    for k, (tr, te) in enumerate(zip(a.train_parts, a.test_parts, strict=True)):
        n = int(pr["sizes"][k])
        assert len(tr) == int(0.9 * n) and len(te) == n - int(0.9 * n)
        got = np.concatenate([a.train_x[tr], a.test_x[te]])  # the same rows, reshuffled
        assert np.allclose(np.sort(got.sum(1)), np.sort(xs[k].sum(1)))


@pytest.mark.parametrize("option,kwargs", [
    ("synthetic_alpha", {"alpha": -1.0, "beta": 1.0}),
    ("synthetic_beta", {"alpha": 1.0, "beta": -0.5}),
])
def test_negative_prior_one_line(option, kwargs):
    with pytest.raises(ConfigError, match=f"--data.{option}=-") as err:
        synthetic(**kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=f"--data.{option}="):
        FederatedDataModule(dataset="synthetic", partition="natural", num_clients=3,
                            **{f"synthetic_{k}": v for k, v in kwargs.items()})


def test_natural_datamodule_and_partition_errors():
    dm = FederatedDataModule(dataset="synthetic", partition="natural", num_clients=7,
                             synthetic_alpha=0.5, synthetic_beta=0.5, seed=2)
    dm.setup("fit")
    ref = synthetic(0.5, 0.5, num_devices=7, seed=2)
    assert dm.input_shape == (1, 1, 60) and dm.augmentation is None
    assert dm.client_sizes == [len(p) for p in ref.train_parts]
    assert torch.allclose(dm.test_x.reshape(-1, 60).double(), torch.from_numpy(ref.test_x),
                          atol=1e-6)
    report = datamodule_report(dm)
    assert report["summary"]["size"]["max"] == max(dm.client_sizes)
    with pytest.raises(ConfigError, match="use --data.partition natural"):
        FederatedDataModule(dataset="synthetic", partition="lda")
    with pytest.raises(ConfigError, match="arrives centralized"):
        FederatedDataModule(dataset="digits", partition="natural")
    with pytest.raises(ConfigError, match="powerlaw is the FedProx paper's MNIST split"):
        FederatedDataModule(dataset="digits", partition="powerlaw")


# ------------------------------------------------------------------ MNIST power-law devices


def test_powerlaw_devices_two_classes_power_law():
    labels = np.repeat(np.arange(10), 400)
    parts = powerlaw_devices(labels, num_devices=100, seed=0)
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)  # disjoint
    for d, p in enumerate(parts):
        got = set(labels[p].tolist())
        assert got == {d % 10, (d + 1) % 10}
        assert min(np.bincount(labels[p], minlength=10)[list(got)]) >= 5
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() > 0.97 * len(labels)  # int() truncation leaves a few samples over
    assert sizes.max() > 5 * np.median(sizes)  # heavy tail
    again = powerlaw_devices(labels, num_devices=100, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = powerlaw_devices(labels, num_devices=100, seed=1)
    assert any(len(a) != len(b) for a, b in zip(parts, other, strict=True))


def test_powerlaw_too_many_devices_one_line():
    labels = np.repeat(np.arange(10), 40)
    powerlaw_devices(labels, num_devices=40)  # 40 devices x 2 classes x 5 = 40 per class
    with pytest.raises(ConfigError, match="class 0 has 40 samples but the 10 devices holding "
                                          "it need 5 each") as err:
        powerlaw_devices(labels, num_devices=50)
    assert "\n" not in str(err.value) and "at most about 40 devices" in str(err.value)


def _tiny_mnist(root: Path, per_class_train: int = 30, per_class_test: int = 10) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        write_idx(raw / f"{name}-images-idx3-ubyte", images)
        write_idx(raw / f"{name}-labels-idx1-ubyte", labels)


def test_powerlaw_datamodule_on_idx_files(tmp_path):
    _tiny_mnist(tmp_path)
    dm = FederatedDataModule(dataset="mnist", data_dir=str(tmp_path), partition="powerlaw",
                             num_clients=20, augment="none", verify_checksums=False)
    dm.setup("fit")
    assert len(dm.client_indices) == 20
    n = len(dm.train_y) + len(dm.test_y)
    assert 0.9 * 400 < n <= 400  # train and test images pooled (int() leaves a few out)
    pixels = torch.cat([dm.train_x, dm.test_x]).reshape(n, -1).double()
    # standardized per pixel over the pool (of the samples assigned: nearly all)
    assert pixels.mean(0).abs().max() < 0.15 and abs(pixels.std(0).mean() - 1) < 0.05
    for d, (tr, te) in enumerate(zip(dm.client_indices, dm.test_parts, strict=True)):
        assert set(dm.train_y[tr].tolist()) <= {d % 10, (d + 1) % 10}
        assert len(tr) == int(0.9 * (len(tr) + len(te)))
    with pytest.raises(ConfigError, match="use at most about 40 devices"):
        FederatedDataModule(dataset="mnist", data_dir=str(tmp_path), partition="powerlaw",
                            num_clients=41, augment="none", verify_checksums=False).setup("fit")


# ------------------------------------------------------------------ logistic regression


def test_logistic_regression_gradient_closed_form():
    torch.manual_seed(0)
    net = LogisticRegression(4, (1, 2, 3)).double()
    assert sum(p.numel() for p in net.parameters()) == 6 * 4 + 4
    assert torch.all(net.classifier.bias == 0)
    bound = math.sqrt(6 / (6 + 4))  # Glorot uniform
    assert net.classifier.weight.abs().max() <= bound
    x = torch.randn(9, 1, 2, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (9,))
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    xf = x.reshape(9, -1)
    p = torch.softmax(xf @ net.classifier.weight.T + net.classifier.bias, 1)
    err = (p - F.one_hot(y, 4).double()) / 9
    assert torch.allclose(net.classifier.weight.grad, err.T @ xf, atol=1e-14)
    assert torch.allclose(net.classifier.bias.grad, err.sum(0), atol=1e-14)


# ------------------------------------------------------------------ exact optimum


def _problem(n=60, d=5, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 1, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=gen)  # random labels: not separable
    net = LogisticRegression(c, (1, 1, d)).double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    return net, params, x, y


def test_exact_minimum_least_squares_closed_form():
    net, params, x, y = _problem()
    target = F.one_hot(y, 3).double()

    def half_squares(out, yy):
        return 0.5 * ((out - F.one_hot(yy, 3).double()) ** 2).sum(1).mean()

    lam = 0.1
    w, info = exact_minimum(net, params, {}, [(x[:25], y[:25]), (x[25:], y[25:])],
                            half_squares, tol=1e-10, l2=lam)
    xt = torch.cat([x.reshape(60, -1), torch.ones(60, 1, dtype=torch.float64)], 1)
    theta = torch.linalg.solve(xt.T @ xt / 60 + lam * torch.eye(6, dtype=torch.float64),
                               xt.T @ target / 60)
    assert info["converged"] == 1.0 and info["grad_norm"] < 1e-10
    assert torch.allclose(w["classifier.weight"], theta[:5].T, atol=1e-9)
    assert torch.allclose(w["classifier.bias"], theta[5], atol=1e-9)
    # equal weights for the two batches (25 and 35 samples): per-sample weights 1/50 and 1/70
    w2, _ = exact_minimum(net, params, {}, [(x[:25], y[:25]), (x[25:], y[25:])], half_squares,
                          tol=1e-10, l2=lam, weights=[0.5, 0.5])
    s = torch.cat([torch.full((25,), 0.5 / 25), torch.full((35,), 0.5 / 35)]).double()
    theta2 = torch.linalg.solve(xt.T @ (s[:, None] * xt) + lam * torch.eye(6).double(),
                                xt.T @ (s[:, None] * target))
    assert torch.allclose(w2["classifier.bias"], theta2[5], atol=1e-9)
    assert not torch.allclose(theta2, theta, atol=1e-3)


def test_exact_minimum_logistic_newton_and_lbfgs_agree():
    net, params, x, y = _problem(seed=1)
    w, info = exact_minimum(net, params, {}, [(x, y)], tol=1e-8)
    assert info["converged"] == 1.0 and info["grad_norm"] < 1e-8
    p = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    loss = F.cross_entropy(torch.func.functional_call(net, p, (x,)), y)
    grads = torch.autograd.grad(loss, list(p.values()))
    assert float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))) < 1e-8
    assert abs(float(loss.detach()) - info["loss"]) < 1e-14
    _, info2 = exact_minimum(net, params, {}, [(x, y)], tol=1e-7, newton_max_params=0,
                             max_iter=50)
    assert info2["converged"] == 1.0 and abs(info2["loss"] - info["loss"]) < 1e-12


def test_exact_minimum_separable_needs_l2():
    net, params, x, _ = _problem(seed=2)
    y = (x.reshape(60, -1)[:, 0] > 0).long()  # separable: no finite minimum without l2
    w0, info0 = exact_minimum(net, params, {}, [(x, y)], tol=1e-8, max_iter=5,
                              newton_max_params=0)
    w1, info1 = exact_minimum(net, params, {}, [(x, y)], tol=1e-8, l2=1e-3)
    # without l2 the loss runs to ~0 with huge weights (a tiny gradient certifies nothing)
    assert info0["loss"] < 1e-6
    assert float(flatten(w0).norm()) > 10 * float(flatten(w1).norm())
    assert info1["converged"] == 1.0 and info1["loss"] > 0.01


def test_global_objective_measures_gap():
    dm = FederatedDataModule(dataset="synthetic", partition="natural", num_clients=6, seed=0)
    module = FederatedModule(net=LogisticRegression, num_classes=10, input_shape=(1, 1, 60),
                             weight_decay=1e-3).attach(dm)
    dm.setup("fit")
    cb = GlobalObjective(optimum=True)
    cb.validate()
    params = {k: v.detach() for k, v in module.net.named_parameters()}
    out = cb.measure(module, params)
    x, y = dm.train_x.double(), dm.train_y
    w = {k: v.double() for k, v in params.items()}
    logits = torch.func.functional_call(module.net, w, (x,))
    ce = float(F.cross_entropy(logits, y))
    assert abs(out["ce"] - ce) < 1e-10
    assert abs(out["loss"] - (ce + 0.5e-3 * float(flatten(w) @ flatten(w)))) < 1e-10
    assert cb.opt_info["converged"] == 1.0 and out["gap"] > 0.1
    at_opt = cb.measure(module, cb.opt_params)
    assert abs(at_opt["gap"]) < 1e-12 and at_opt["grad_norm"] < 1e-8


def test_global_objective_bad_option_one_line():
    with pytest.raises(ConfigError, match=r"GlobalObjective.tail=2 is invalid"):
        GlobalObjective(tail=2).validate()


# ------------------------------------------------------------------ stragglers


def test_straggler_epochs_uniform_and_seeded():
    draws = [straggler_epochs(0, r, c, 5) for r in range(100) for c in range(40)]
    assert set(draws) == {1, 2, 3, 4}  # official: randint(1, E), upper end excluded
    freq = np.bincount(draws, minlength=5)[1:] / len(draws)
    assert np.all(np.abs(freq - 0.25) < 0.03)
    assert straggler_epochs(3, 7, 11, 20) == straggler_epochs(3, 7, 11, 20)
    assert len({straggler_epochs(3, 7, c, 20) for c in range(30)}) > 5
    assert straggler_epochs(0, 0, 0, 1) == 1


def test_drop_removes_exactly_the_clients_partial_runs_partially():
    dm = FederatedDataModule(dataset="synthetic", partition="natural", num_clients=30, seed=4)
    dm.setup("fit")
    kw = {"straggler_ratio": 0.5, "straggler_epochs": "uniform"}
    drop = Participation(straggler_policy="drop", **kw)
    part = Participation(straggler_policy="partial", **kw)
    net = LogisticRegression(10, (1, 1, 60))
    gp = {k: v.detach().clone() for k, v in net.named_parameters()}
    for r in range(3):
        plan = dm.round_plan(r, 10, 4, 200)  # batch 200: few steps, same logic
        per_epoch = {c.client_id: -(-c.num_samples // 200) for c in plan.clients}
        p_drop, dropped, slow_drop = drop.apply(plan, dm.seed)
        p_part, gone, slow = part.apply(plan, dm.seed)
        assert len(slow) == 5 and gone == [] and slow_drop == []
        assert sorted(dropped) == sorted(slow)
        assert [c.client_id for c in p_drop.clients] == [
            c.client_id for c in plan.clients if c.client_id not in slow]
        results = SequentialEngine().run_round(
            FedProx(mu=0.0), net, gp, {}, p_part, dm.train_tensors(), 0.01, 0.0, 0.0)
        steps = {res.client_id: res.num_steps for res in results}
        for c in plan.clients:
            k = c.client_id
            epochs = straggler_epochs(dm.seed, r, k, 4) if k in slow else 4
            assert steps[k] == epochs * per_epoch[k]


def test_straggler_policy_errors_one_line():
    with pytest.raises(ConfigError, match="straggler_policy='wait' is unknown"):
        Participation(straggler_policy="wait")
    with pytest.raises(ConfigError, match="straggler_epochs='poisson' is unknown"):
        Participation(straggler_epochs="poisson")
    part = Participation(straggler_ratio=0.5, straggler_policy="partial")
    with pytest.raises(ConfigError, match="cannot be used with --model.algorithm=FedDyn") as err:
        part.check(FedDyn())
    assert "\n" not in str(err.value) and "straggler_policy drop" in str(err.value)
    part.check(FedAvg())
    Participation(straggler_ratio=0.5, straggler_policy="drop").check(FedDyn(), 10)
    with pytest.raises(ConfigError, match="drops all 10 sampled clients"):
        Participation(straggler_ratio=1.0, straggler_policy="drop").check(FedAvg(), 10)


# ------------------------------------------------------------------ grid settings


def test_grid_settings_for_the_fedprox_paper():
    s = parse_setting("synthetic:0.5:1")
    assert s.options() == ["--data.dataset", "synthetic", "--data.partition", "natural",
                           "--data.synthetic_alpha", "0.5", "--data.synthetic_beta", "1"]
    assert s.label == "Synthetic(0.5,1)"
    assert parse_setting("synthetic_iid") == Setting("synthetic_iid", "natural")
    assert parse_setting("mnist:powerlaw").options() == [
        "--data.dataset", "mnist", "--data.partition", "powerlaw"]
    level = Setting("synthetic", "natural", "1:1", "0.9")
    assert level.slug == "synthetic_natural_1_1_s0.9"
    assert level.options()[-2:] == ["--model.participation.straggler_ratio", "0.9"]
    with pytest.raises(SystemExit):
        parse_setting("synthetic:-1:1")


def test_exact_client_optima_give_the_floor():
    from fl_lightning.callbacks import HeterogeneityFloor

    dm = FederatedDataModule(dataset="synthetic", partition="natural", num_clients=4, seed=1)
    module = FederatedModule(net=LogisticRegression, num_classes=10, input_shape=(1, 1, 60),
                             weight_decay=0.5).attach(dm)
    dm.setup("fit")
    # L-BFGS stalls near 1e-8 (float64 line search); 1e-7 bounds f_k*'s error by
    # g^2 / (2 l2) = 1e-14
    floor = HeterogeneityFloor(num_clients=4, exact=True, l2=0.5, grad_tol=1e-7,
                               newton_max_params=0, max_steps=200)
    objective = GlobalObjective(optimum=True)
    floor.validate()
    objective.validate()
    params = {k: v.detach() for k, v in module.net.named_parameters()}
    got = floor.measure(module, params)
    assert got["converged"] == 1.0 and got["grad_norm_max"] < 1e-7
    f_star = objective.solve(module)["loss"]
    # every f_k* <= f_k(w*), so sum p_k f_k* <= F*; distinct optima make the floor positive
    assert 0.0 < f_star - got["opt_loss"] < got["global_loss"] - got["opt_loss"]
    assert got["spread_V"] > 0
    at_opt = floor.measure(module, {k: v.float() for k, v in objective.opt_params.items()})
    assert abs(at_opt["global_loss"] - f_star) < 1e-5  # F(w*) (float32 pass) = F*
