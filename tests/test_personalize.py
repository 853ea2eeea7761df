"""The personalized protocol (paper Table 5): per-client test sets, fine-tuning, kNN-Per."""

from __future__ import annotations

import copy
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from analysis_helpers import one_thread  # noqa: F401  (fixture)
from torch import nn

from fl_lightning.algorithms import FedAvg
from fl_lightning.data.augment import BatchAugment
from fl_lightning.data.module import FederatedDataModule
from fl_lightning.engine import ClientPlan, RoundPlan, SequentialEngine
from fl_lightning.engines import BatchedEngine
from fl_lightning.errors import ConfigError
from fl_lightning.models.cnn import FedAvgCNN
from fl_lightning.module import FederatedModule
from fl_lightning.personalize import (
    FINETUNE_ROUND,
    PersonalizedEvaluation,
    client_test_indices,
    finetune_client,
    knn_logits,
    personalize,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_client_test_sets_follow_the_client_label_distribution():
    test_y = torch.arange(3).repeat(50)  # 50 test samples per class
    clients = [torch.tensor([0] * 6 + [1] * 3 + [2] * 1), torch.tensor([2] * 4)]
    idx = client_test_indices(clients, test_y, 3, amount=40, seed=1)
    assert torch.bincount(test_y[idx[0]], minlength=3).tolist() == [24, 12, 4]
    assert torch.bincount(test_y[idx[1]], minlength=3).tolist() == [0, 0, 40]
    assert len(set(idx[0].tolist())) == len(idx[0])  # without replacement
    # capped by what the test split holds; reproducible per (seed, client)
    big = client_test_indices(clients, test_y, 3, amount=1000, seed=1)
    assert torch.bincount(test_y[big[1]], minlength=3).tolist() == [0, 0, 50]
    again = client_test_indices(clients, test_y, 3, amount=40, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(idx, again, strict=True))


def test_knn_vote_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    test = torch.randn(5, 4, generator=g)
    out = knn_logits(train, labels, test, 3, k=4, scale=2.0)
    for i in range(5):
        d = ((train - test[i]) ** 2).sum(1)
        nn_idx = d.argsort()[:4]
        s = torch.exp(-d[nn_idx] / (4 * 2.0))
        ref = torch.zeros(3)
        for j, w in zip(nn_idx, s, strict=True):
            ref[labels[j]] += w
        assert torch.allclose(out[i], ref / s.sum(), atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    dm = FederatedDataModule(dataset="digits", num_clients=4, partition="lda", alpha=0.5)
    dm.setup("fit")
    torch.manual_seed(0)
    net = FedAvgCNN(dm.num_classes, dm.input_shape)
    return dm, net


@pytest.mark.parametrize("method", ["finetune", "perfedavg", "knn"])
def test_personalize_reports_mean_and_std_over_clients(tiny, method):
    dm, net = tiny
    start = {k: p.detach() for k, p in net.named_parameters()}
    res = personalize(net, dm, start, epochs=1, lr=0.05, momentum=0.9, weight_decay=1e-5,
                      batch_size=50, method=method, clients=[0, 1, 2], amount=60)
    assert res["clients"] == [0, 1, 2] and len(res["acc"]) == 3
    assert res["acc_mean"] == pytest.approx(sum(res["acc"]) / 3)
    assert res["acc_std"] == pytest.approx(float(torch.tensor(res["acc"]).std(unbiased=False)))
    if method != "knn":  # fine-tuning on the client's own distribution helps from random init
        assert res["acc_mean"] > res["before_mean"]


def test_zero_learning_rate_fine_tuning_changes_nothing(tiny):
    dm, net = tiny
    start = {k: p.detach() for k, p in net.named_parameters()}
    res = personalize(net, dm, start, epochs=1, lr=0.0, momentum=0.0, weight_decay=0.0,
                      batch_size=50, clients=[1, 2], amount=100)
    assert res["acc"] == res["before"]


# --------------------------------------------------------------------- the fine-tuning protocol


def _augmented_digits(augment: bool) -> FederatedDataModule:
    dm = FederatedDataModule(dataset="digits", num_clients=8, partition="lda", alpha=1.0, seed=3)
    dm.setup("fit")
    if augment:  # digits has no paper augmentation: give it one to see it used
        dm.augmentation = BatchAugment(crop_padding=1, fill=0.0, flip=True, cutout=2)
    return dm


def _tiny_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()


def _reference_finetune(net, dm, start, client, epochs, lr, decay, momentum, wd, batch_size,
                        augment):
    """The protocol written out: one torch SGD optimizer over all epochs, StepLR(gamma=decay)
    stepped after every epoch, cross-entropy on the (augmented) client batches."""
    model = copy.deepcopy(net)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(start[k])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=decay)
    x_all, y_all = dm.train_tensors("cpu", torch.float64)
    batches = dm.client_batches(FINETUNE_ROUND, client, epochs, batch_size)
    per_epoch = len(batches) // epochs
    seen_lrs = []
    for epoch in range(epochs):
        for i in range(per_epoch):
            step = epoch * per_epoch + i
            idx = batches[step]
            x = x_all[idx]
            if augment:
                x = dm.augment_batch(x, FINETUNE_ROUND, client, step)
            opt.zero_grad()
            F.cross_entropy(model(x), y_all[idx]).backward()
            seen_lrs.append(opt.param_groups[0]["lr"])
            opt.step()
        sched.step()
    return {k: p.detach() for k, p in model.named_parameters()}, seen_lrs


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("augment", [False, True])
def test_finetuning_equals_sgd_with_a_per_epoch_step_lr(augment):
    """LocalOnly's official loop (lr decayed per epoch, momentum kept across epochs, training
    augmentation) against torch.optim.SGD + StepLR, float64."""
    dm, net = _augmented_digits(augment), _tiny_net()
    start = {k: p.detach().clone() for k, p in net.named_parameters()}
    kw = dict(epochs=3, lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=32)
    res = finetune_client(net, dm, start, 2, lr_decay=0.5, augment=augment, **kw)
    ref, lrs = _reference_finetune(net, dm, start, 2, 3, 0.05, 0.5, 0.9, 1e-3, 32, augment)
    per_epoch = -(-len(dm.client_indices[2]) // 32)
    assert lrs == [0.05] * per_epoch + [0.025] * per_epoch + [0.0125] * per_epoch
    assert res.num_steps == 3 * per_epoch
    for k in ref:
        assert torch.allclose(res.params[k], ref[k], rtol=0, atol=1e-12), k
    # the decay and the augmentation matter: without them the weights are elsewhere
    flat = torch.cat([res.params[k].flatten() for k in ref])
    const = finetune_client(net, dm, start, 2, lr_decay=1.0, augment=augment, **kw)
    assert (flat - torch.cat([const.params[k].flatten() for k in ref])).abs().max() > 1e-3
    if augment:
        plain = finetune_client(net, dm, start, 2, lr_decay=0.5, augment=False, **kw)
        assert (flat - torch.cat([plain.params[k].flatten() for k in ref])).abs().max() > 1e-3
        # bit-reproducible from the data seed
        again = finetune_client(net, _augmented_digits(True), start, 2, lr_decay=0.5, **kw)
        assert all(torch.equal(res.params[k], again.params[k]) for k in ref)
        assert personalize(net, dm, start, 1, 0.05, 0.9, 0.0, 32, clients=[2],
                           amount=20)["augment"] is True


@pytest.mark.usefixtures("one_thread")
def test_localonly_config_is_the_official_protocol_and_starts_from_the_initial_weights(
        tmp_path):
    """pers_localonly.yaml: 200 epochs from the weights before round 0 at local_lr (not the
    decayed round rate), 0.99 per epoch, with augmentation; run through fit with 1 epoch."""
    path = os.path.join(ROOT, "configs", "algorithms", "pers_localonly.yaml")
    [cb_cfg] = yaml.safe_load(open(path))["trainer"]["callbacks"]
    args = cb_cfg["init_args"]
    assert cb_cfg["class_path"] == "fl_lightning.personalize.PersonalizedEvaluation"
    assert args == {"method": "finetune", "start": "initial", "epochs": 200, "lr": "initial",
                    "lr_decay": 0.99, "augment": True}
    cb = PersonalizedEvaluation(**{**args, "epochs": 1}, num_clients=2, amount=40)
    dm = FederatedDataModule(dataset="digits", num_clients=4, partition="lda", alpha=1.0)
    pl.seed_everything(0, verbose=False)
    module = FederatedModule(num_classes=10, input_shape=(1, 8, 8), sample_ratio=0.5,
                             local_epochs=1, batch_size=20, local_lr=0.2, lr_decay=0.5)
    initial = {k: p.detach().clone() for k, p in module.net.named_parameters()}
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        accelerator="cpu", devices=1, callbacks=[cb], default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)
    trained = {k: p.detach() for k, p in module.net.named_parameters()}
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    res = cb.result
    assert res["lr"] == 0.2 and res["lr_decay"] == 0.99 and res["epochs"] == 1
    ref = personalize(module.net, dm, initial, 1, 0.2, module.momentum, module.weight_decay,
                      20, clients=[0, 1], amount=40, lr_decay=0.99)
    assert res["before"] == ref["before"] and res["acc"] == ref["acc"]
    glob_ = personalize(module.net, dm, trained, 1, 0.2, module.momentum, module.weight_decay,
                        20, clients=[0, 1], amount=40)
    assert glob_["before"] != res["before"]  # the trained global model is not where it starts


def test_finetuning_settings_are_checked():
    with pytest.raises(ConfigError, match="lr='first'"):
        PersonalizedEvaluation(lr="first")
    with pytest.raises(ConfigError, match="lr_decay=0"):
        PersonalizedEvaluation(lr_decay=0)
    with pytest.raises(ConfigError, match="lr=-1"):
        PersonalizedEvaluation(lr=-1)


def test_per_step_learning_rates_are_checked_and_sequential_only():
    net = _tiny_net()
    params = {k: p.detach() for k, p in net.named_parameters()}
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    ok = RoundPlan(0, [ClientPlan(0, 4, [torch.tensor([0, 1]), torch.tensor([2, 3])], [0.1, 0.0])])
    [res] = SequentialEngine().run_round(FedAvg(), net, params, {}, ok, (x, y), 0.5, 0.0, 0.0)
    one = RoundPlan(0, [ClientPlan(0, 4, [torch.tensor([0, 1])], [0.1])])
    [ref] = SequentialEngine().run_round(FedAvg(), net, params, {}, one, (x, y), 0.5, 0.0, 0.0)
    assert all(torch.equal(res.params[k], ref.params[k]) for k in params)  # step 2 at lr 0
    bad = RoundPlan(0, [ClientPlan(0, 4, [torch.tensor([0, 1])], [0.1, 0.2])])
    with pytest.raises(ConfigError, match="2 learning rates for 1 local steps"):
        SequentialEngine().run_round(FedAvg(), net, params, {}, bad, (x, y), 0.5, 0.0, 0.0)
    with pytest.raises(ConfigError, match="ClientPlan.lrs"):
        BatchedEngine().run_round(FedAvg(), net, params, {}, one, (x, y), 0.5, 0.0, 0.0)
