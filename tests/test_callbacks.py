"""Analysis callbacks: direct computations, restarts, errors, and a CLI run on digits."""

from __future__ import annotations

import csv
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from analysis_helpers import (
    FakeData,
    fake_module,
    fake_trainer,
    one_thread,  # noqa: F401  (fixture)
    round_result,
)
from torch import nn

from fl_lightning.algorithms import FedProx, FedSoL
from fl_lightning.callbacks import (
    ClassWiseAccuracy,
    GlobalOscillation,
    GradientAlignment,
    HessianEigenvalues,
    KnowledgePreservation,
    LossLandscape,
)
from fl_lightning.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_doc_example(folder) -> None:
    """Write docs/analysis.md's example callback as ``<folder>/my_callbacks.py``."""
    text = open(os.path.join(REPO, "docs", "analysis.md")).read()
    block = text.split("<!-- example: my_callbacks.py -->\n```python\n", 1)[1].split("```", 1)[0]
    with open(os.path.join(folder, "my_callbacks.py"), "w") as fh:
        fh.write(block)


def _classifier_problem(seed=0, n=60, classes=3, dim=4, clients=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    tx = torch.randn(45, dim, generator=g, dtype=torch.float64)
    ty = torch.randint(0, classes, (45,), generator=g)
    idx = torch.arange(n).chunk(clients)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(dim, 5), nn.Tanh(), nn.Linear(5, classes)).double()
    data = FakeData(x, y, idx, test=(tx, ty), num_classes=classes)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    locals_ = [{k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                for k, v in params.items()} for _ in range(clients)]
    return net, data, params, locals_


def _acc(net, params, x, y):
    logits = torch.func.functional_call(net, params, (x,))
    return logits.argmax(1) == y


def test_classwise_accuracy_equals_a_direct_count(tmp_path):
    net, data, params, _ = _classifier_problem()
    cb = ClassWiseAccuracy(batch_size=7)
    trainer = fake_trainer(str(tmp_path))
    for r in range(3):
        cb.on_round_end(trainer, fake_module(net, data), round_result(r, params, [params], [1]))
    hit = _acc(net, params, data.test_x, data.test_y)
    row = cb.history[-1]
    accs = []
    for c in range(3):
        mask = data.test_y == c
        accs.append(float(hit[mask].double().mean()))
        assert row[f"acc_{c}"] == pytest.approx(accs[-1], rel=1e-12)
    assert row["min"] == pytest.approx(min(accs))
    assert row["acc"] == pytest.approx(float(hit.double().mean()))
    cb.on_train_end(trainer, None)
    assert os.path.exists(tmp_path / "analysis" / "classwise.png")
    assert json.load(open(tmp_path / "analysis" / "classwise.json"))["history"][-1] == row


def test_knowledge_preservation_equals_a_direct_computation():
    net, data, params, locals_ = _classifier_problem()
    cb = KnowledgePreservation(max_clients=2, max_samples=30, batch_size=8)
    cb.on_round_end(fake_trainer(), fake_module(net, data),
                    round_result(0, params, locals_, [20, 20, 20]))
    x, y = data.test_x[:30], data.test_y[:30]
    accs = torch.tensor([float(_acc(net, p, x, y).double().mean()) for p in locals_[:2]],
                        dtype=torch.float64)
    start = float(_acc(net, params, x, y).double().mean())
    row = cb.history[0]
    assert row["local_acc_mean"] == pytest.approx(float(accs.mean()), rel=1e-12)
    assert row["local_acc_std"] == pytest.approx(float(accs.std(unbiased=False)), abs=1e-12)
    assert row["start_acc"] == pytest.approx(start)
    assert row["forgetting"] == pytest.approx(start - float(accs.mean()))


def _flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def test_gradient_alignment_fedprox_l2_equals_a_direct_computation():
    net, data, params, locals_ = _classifier_problem()
    mu = 0.7
    module = fake_module(net, data, FedProx(mu=mu))
    cb = GradientAlignment(max_clients=2, num_batches=1, batch_size=10)
    cb.on_round_end(fake_trainer(), module, round_result(0, params, locals_, [20, 20, 20]))
    row = cb.history[0]
    cos_up, cos_ce, prox = [], [], []
    for k in range(2):
        w = {n: v.clone().requires_grad_(True) for n, v in locals_[k].items()}
        x, y = data.x[data.client_indices[k][:10]], data.y[data.client_indices[k][:10]]
        loss = F.cross_entropy(torch.func.functional_call(net, w, (x,)), y)
        g_ce = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(w.values()))])
        diff = _flat(locals_[k]) - _flat(params)
        g_up = g_ce + mu * diff
        cos_up.append(float(F.cosine_similarity(g_up, diff, dim=0)))
        cos_ce.append(float(F.cosine_similarity(g_ce, diff, dim=0)))
        prox.append(0.5 * float(diff @ diff))
    assert row["cos_update_prox"] == pytest.approx(sum(cos_up) / 2, rel=1e-9)
    assert row["cos_ce_prox"] == pytest.approx(sum(cos_ce) / 2, rel=1e-9)
    assert row["prox_loss"] == pytest.approx(sum(prox) / 2, rel=1e-12)


def test_gradient_alignment_fedsol_uses_the_kl_proximal_gradient():
    net, data, params, locals_ = _classifier_problem()
    module = fake_module(net, data, FedSoL(rho=0.5, temperature=2.0))
    cb = GradientAlignment(max_clients=1, batch_size=10)
    cb.on_round_end(fake_trainer(), module, round_result(0, params, locals_, [20, 20, 20]))
    row = cb.history[0]
    w = {n: v.clone().requires_grad_(True) for n, v in locals_[0].items()}
    x, y = data.x[:10], data.y[:10]
    target = torch.softmax(torch.func.functional_call(net, params, (x,)) / 2.0, 1)
    log_p = torch.log_softmax(torch.func.functional_call(net, w, (x,)) / 2.0, 1)
    kl = (target * (target.log() - log_p)).sum(1).mean()
    g_prox = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, list(w.values()))])
    loss = F.cross_entropy(torch.func.functional_call(net, w, (x,)), y)
    g_ce = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(w.values()))])
    assert row["prox_loss"] == pytest.approx(float(kl), rel=1e-9)
    assert row["cos_ce_prox"] == pytest.approx(float(F.cosine_similarity(g_ce, g_prox, dim=0)),
                                               rel=1e-9)


def test_global_oscillation_resumes_from_its_state_dict_exactly():
    g = torch.Generator().manual_seed(0)
    traj = [{"w": torch.randn(6, generator=g, dtype=torch.float64)} for _ in range(12)]

    def feed(cb, rounds):
        for r in rounds:
            cb.on_round_end(fake_trainer(), None,
                            round_result(r, traj[r], [traj[r + 1]], [1], global_after=traj[r + 1]))

    full = GlobalOscillation(window=4)
    feed(full, range(11))
    first = GlobalOscillation(window=4)
    feed(first, range(6))
    resumed = GlobalOscillation(window=4)
    resumed.load_state_dict(first.state_dict())
    feed(resumed, range(6, 11))
    assert resumed.history == full.history
    # radius of the last window by hand: 4 models w_8..w_11
    w = torch.stack([traj[i]["w"] for i in range(8, 12)])
    radius = float(((w - w.mean(0)) ** 2).sum(1).mean().sqrt())
    assert full.history[-1]["radius"] == pytest.approx(radius, rel=1e-12)


def test_global_oscillation_spread_of_the_last_evaluations():
    cb = GlobalOscillation(tail=0.2)
    cb.evaluations = [(float(r), 0.5 + 0.01 * r, 1.0 - 0.01 * r) for r in range(1, 21)]
    s = cb.spread()  # last 4 of 20 evaluations: rounds 17..20
    assert s["tail_evals"] == 4.0
    assert s["acc_range"] == pytest.approx(0.03)
    accs = torch.tensor([0.5 + 0.01 * r for r in range(17, 21)], dtype=torch.float64)
    assert s["acc_std"] == pytest.approx(float(accs.std(unbiased=False)))


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: HessianEigenvalues(k=5, num_iter=3), "HessianEigenvalues.num_iter=3"),
        (lambda: HessianEigenvalues(every_n_rounds=0), "HessianEigenvalues.every_n_rounds=0"),
        (lambda: LossLandscape(directions="pca"), "LossLandscape.directions='pca'"),
        (lambda: GlobalOscillation(tail=1.5), "GlobalOscillation.tail=1.5"),
        (lambda: GradientAlignment(proximal="l1"), "GradientAlignment.proximal='l1'"),
    ],
)
def test_bad_options_raise_one_line_config_errors_in_init(make, needle):
    with pytest.raises(ConfigError) as err:
        make()
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_docs_example_callback_measures_logs_and_checks(tmp_path, monkeypatch, capsys):
    import importlib

    from fl_lightning.callbacks import RoundCallback
    from fl_lightning.cli import main

    _write_doc_example(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_callbacks", raising=False)
    UpdateNorm = importlib.import_module("my_callbacks").UpdateNorm
    assert issubclass(UpdateNorm, RoundCallback)
    zero = {"w": torch.zeros(2, dtype=torch.float64)}
    cb = UpdateNorm(p=1)
    cb.on_round_end(fake_trainer(), None, round_result(
        0, zero, [{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.5, 0.0])}], [3, 4],
        global_after={"w": torch.tensor([3.0, 4.0])}))
    assert cb.history == [{"round": 1.0, "server": 7.0, "client_max": 3.0}]
    assert cb.summary() == {"p": 1.0}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:  # a bad value: one line, before training
        main(["fit", "--config", os.path.join(REPO, "configs", "quickstart.yaml"),
              "--trainer.callbacks+=my_callbacks.UpdateNorm", "--trainer.callbacks.p=0"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err
    assert err == ("fl-lightning: error: --trainer.callbacks.UpdateNorm.p=0.0 is invalid: it "
                   "must be a finite number > 0")
    assert not (tmp_path / "lightning_logs").exists()


def test_cli_run_on_digits_logs_the_analyses(tmp_path, monkeypatch, capsys):
    from fl_lightning.cli import main

    root = REPO
    monkeypatch.chdir(tmp_path)
    _write_doc_example(tmp_path)  # docs/analysis.md's own callback, from the current folder
    cb = "--trainer.callbacks"
    main([
        "fit", "--config", os.path.join(root, "configs", "quickstart.yaml"),
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
        "--model.sample_ratio", "0.15",
        f"{cb}+=HessianEigenvalues", f"{cb}.every_n_rounds=1", f"{cb}.k=3",
        f"{cb}.num_iter=6", f"{cb}.batch_size=100",
        f"{cb}+=LossLandscape", f"{cb}.every_n_rounds=3", f"{cb}.directions=random",
        f"{cb}.resolution=3", f"{cb}.batch_size=100", f"{cb}.num_batches=1",
        f"{cb}+=WeightDivergence",
        f"{cb}+=GlobalOscillation", f"{cb}.window=3",
        f"{cb}+=ClientUpdateDispersion", f"{cb}.max_samples=50",
        f"{cb}+=KnowledgePreservation", f"{cb}.max_samples=200",
        f"{cb}+=my_callbacks.UpdateNorm",
    ])
    sys.modules.pop("my_callbacks", None)
    log_dir = tmp_path / "lightning_logs" / "fl" / "version_0"
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    by_step: dict[int, dict[str, str]] = {}
    for r in rows:
        by_step.setdefault(int(r["step"]), {}).update({k: v for k, v in r.items() if v})
    assert sorted(by_step) == [0, 1, 2]
    for step, got in by_step.items():  # analyses share the step of the round's own metrics
        assert float(got["round"]) == step + 1
        for key in ("hessian/lambda_1", "hessian/ratio_1_3", "divergence/div_mean",
                    "update_norm/server", "update_norm/client_max",
                    "oscillation/step_norm", "dispersion/b_local", "knowledge/local_acc_mean"):
            assert key in got, (step, key)
        assert float(got["hessian/lambda_1"]) >= float(got["hessian/lambda_3"])
    assert "oscillation/acc_std" in by_step[2] and "landscape/center_loss" in by_step[2]
    for name in ("hessian.png", "divergence.png", "oscillation.png", "landscape_round3.png",
                 "hessian.json", "landscape_round3.pt", "update_norm.png"):
        assert (log_dir / "analysis" / name).exists(), name
    written = json.loads((log_dir / "analysis" / "update_norm.json").read_text())
    assert [r["round"] for r in written["history"]] == [1.0, 2.0, 3.0] and written["p"] == 2.0
