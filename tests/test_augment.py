"""Batched on-device augmentation: shapes, ranges, per-sample randomness, reproducibility, and
its seeding through the data module and the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fl_lightning.algorithms import FedAvg
from fl_lightning.algorithms.base import Algorithm
from fl_lightning.data.augment import BatchAugment, paper_augmentation
from fl_lightning.data.counters import AUGMENT_STREAM, counter_bits
from fl_lightning.data.module import FederatedDataModule
from fl_lightning.engine import ClientPlan, RoundPlan, SequentialEngine
from fl_lightning.errors import ConfigError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(aug: BatchAugment, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Counter-based draws for the batch ``x`` (as the data module makes them)."""
    bits = counter_bits(seed, AUGMENT_STREAM, np.arange(len(x))[:, None], np.arange(5))
    return torch.from_numpy(aug.draw(bits, x.shape[-2], x.shape[-1]))


def batch(n: int = 16, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=gen(seed)) * 2 - 0.5


def test_shapes_dtype_and_reproducibility():
    x = batch()
    for aug in (paper_augmentation("cifar10"), paper_augmentation("cinic10"),
                paper_augmentation("svhn"), paper_augmentation("pathmnist")):
        a = aug(x, draws(aug, x, 1))
        assert a.shape == x.shape and a.dtype == x.dtype
        assert torch.equal(a, aug(x, draws(aug, x, 1)))
        assert not torch.equal(a, aug(x, draws(aug, x, 2)))
        assert torch.equal(aug(x, aug.random_draws(x, gen(3))), aug(x, aug.random_draws(x, gen(3))))
    x64 = batch().double()
    cifar = paper_augmentation("cifar10")
    assert cifar(x64, draws(cifar, x64, 0)).dtype == torch.float64
    assert torch.equal(x, batch())  # input untouched


def test_crop_matches_per_sample_reference():
    x = batch(n=12)
    fill = (-0.3, 0.1, 0.7)
    aug = BatchAugment(crop_padding=4, fill=fill)
    d = draws(aug, x, 5)
    out = aug(x, d)
    i, j = d[:, 0], d[:, 1]  # row and column offsets, each in {0, ..., 8}
    assert int(d[:, :2].min()) >= 0 and int(d[:, :2].max()) <= 8
    assert len(set(zip(i.tolist(), j.tolist(), strict=True))) > 1  # per-sample offsets
    for b in range(12):
        padded = torch.stack([F.pad(x[b, c], (4, 4, 4, 4), value=fill[c]) for c in range(3)])
        ref = padded[:, i[b]: i[b] + 32, j[b]: j[b] + 32]
        assert torch.equal(out[b], ref)


def test_reflect_crop_keeps_values_of_the_image():
    x = batch(n=8)
    aug = BatchAugment(crop_padding=4, padding_mode="reflect")
    d = draws(aug, x, 3)
    out = aug(x, d)
    for b in range(8):
        assert set(out[b].flatten().tolist()) <= set(x[b].flatten().tolist())
        i, j = int(d[b, 0]), int(d[b, 1])
        ref = F.pad(x[b:b + 1], (4, 4, 4, 4), mode="reflect")[0, :, i:i + 32, j:j + 32]
        assert torch.equal(out[b], ref)


def test_flip_is_per_sample():
    x = batch(n=64)
    aug = BatchAugment(flip=True)
    d = draws(aug, x, 0)
    out = aug(x, d)
    assert all(torch.equal(out[b], x[b].flip(-1) if d[b, 2] else x[b]) for b in range(64))
    flipped = [torch.equal(out[b], x[b].flip(-1)) for b in range(64)]
    kept = [torch.equal(out[b], x[b]) for b in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54


def test_cutout_square_and_reference():
    x = batch(n=32) + 5.0  # no zeros in the input
    aug = BatchAugment(cutout=16)
    d = draws(aug, x, 9)
    out = aug(x, d)
    cy, cx = d[:, 3], d[:, 4]
    for b in range(32):
        y1, y2 = max(int(cy[b]) - 8, 0), min(int(cy[b]) + 8, 32)
        x1, x2 = max(int(cx[b]) - 8, 0), min(int(cx[b]) + 8, 32)
        ref = x[b].clone()
        ref[:, y1:y2, x1:x2] = 0
        assert torch.equal(out[b], ref)
        assert int((out[b] == 0).sum()) <= 3 * 16 * 16


def test_ranges_stay_within_input_and_padding():
    aug = paper_augmentation("mnist")
    x = batch(n=32, c=1, size=28)
    black = -0.1307 / 0.3081
    assert aug.fill == pytest.approx((black,))
    out = aug(x, draws(aug, x, 0))
    low = min(float(x.min()), black, 0.0)
    high = max(float(x.max()), 0.0)
    assert float(out.min()) >= low and float(out.max()) <= high
    med = paper_augmentation("pathmnist")
    medmnist = med(x.clamp(-1, 1), draws(med, x, 0))
    assert float(medmnist.min()) >= -1 and float(medmnist.max()) <= 1


def test_paper_recipes():
    mnist, cifar = paper_augmentation("mnist"), paper_augmentation("cifar10")
    for aug in (mnist, cifar):
        assert (aug.crop_padding, aug.padding_mode, aug.flip, aug.cutout) == (4, "constant",
                                                                              True, 16)
    svhn = paper_augmentation("svhn")
    assert (svhn.crop_padding, svhn.padding_mode, svhn.flip, svhn.cutout) == (4, "constant",
                                                                              True, 0)
    cinic = paper_augmentation("cinic10")
    assert (cinic.crop_padding, cinic.padding_mode, cinic.flip, cinic.cutout) == (4, "reflect",
                                                                                  True, 0)
    med = paper_augmentation("tissuemnist")
    assert (med.crop_padding, med.flip, med.cutout) == (0, True, 0)
    assert paper_augmentation("digits") is None
    with pytest.raises(ValueError):
        BatchAugment(padding_mode="edge")


def test_datamodule_seeds_augmentation_per_round_client_step():
    dm = FederatedDataModule(dataset="digits", num_clients=4, partition="iid")
    assert dm.augmentation is None and dm.round_plan(0, 2, 1, 8).transform is None
    dm.augmentation = BatchAugment(crop_padding=2, flip=True)
    plan = dm.round_plan(3, 2, 1, 8)
    assert plan.transform is not None
    x = batch(n=8, c=1, size=8)
    a = plan.transform(x, 3, 1, 0)
    assert torch.equal(a, dm.augment_batch(x, 3, 1, 0))  # pure function of its arguments
    assert not torch.equal(a, dm.augment_batch(x, 3, 1, 1))
    assert not torch.equal(a, dm.augment_batch(x, 4, 1, 0))
    assert not torch.equal(a, dm.augment_batch(x, 3, 2, 0))
    other_seed = FederatedDataModule(dataset="digits", num_clients=4, partition="iid", seed=1)
    other_seed.augmentation = dm.augmentation
    assert not torch.equal(a, other_seed.augment_batch(x, 3, 1, 0))
    assert FederatedDataModule(dataset="mnist", augment="none").augmentation is None
    assert FederatedDataModule(dataset="mnist").augmentation.cutout == 16
    with pytest.raises(ConfigError, match="--data.augment='flip'"):
        FederatedDataModule(dataset="mnist", augment="flip")


def test_engine_applies_the_plan_transform():
    seen = []

    class Spy(Algorithm):
        def direction(self, params, x, y, ctx):
            seen.append((ctx.round, ctx.client_id, ctx.step, x.clone()))
            return super().direction(params, x, y, ctx)

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x = torch.arange(24.0).reshape(6, 1, 2, 2)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    batches = [torch.tensor([0, 1]), torch.tensor([2, 3, 4])]

    def transform(xb, rnd, client, step):
        return xb + 1000 * rnd + 100 * client + 10 * step

    plan = RoundPlan(round=2, clients=[ClientPlan(5, 6, batches)], transform=transform)
    params = {k: p.detach().clone() for k, p in net.named_parameters()}
    SequentialEngine().run_round(Spy(), net, params, {}, plan, (x, y), 0.1, 0.0, 0.0)
    assert [(r, c, s) for r, c, s, _ in seen] == [(2, 5, 0), (2, 5, 1)]
    assert torch.equal(seen[0][3], x[:2] + 2500)
    assert torch.equal(seen[1][3], x[2:5] + 2510)


def _dm_with_augmentation(**kw) -> FederatedDataModule:
    dm = FederatedDataModule(dataset="digits", num_clients=6, partition="iid", **kw)
    dm.augmentation = BatchAugment(crop_padding=2, flip=True, cutout=4)
    dm.setup("fit")
    return dm


def test_round_plan_is_one_tensor_of_per_epoch_permutations():
    dm = _dm_with_augmentation(seed=3)
    plan = dm.round_plan(4, 3, 2, 32)
    storage = {b.untyped_storage().data_ptr() for c in plan.clients for b in c.batches}
    assert len(storage) == 1  # every batch is a view of the round's one index tensor
    assert plan.transform.draws.untyped_storage().data_ptr() in storage  # and the draws too
    for c in plan.clients:
        own = sorted(dm.client_indices[c.client_id].tolist())
        n = len(own)
        flat = torch.cat(c.batches).tolist()
        assert [len(b) for b in c.batches] == [32] * (n // 32) + [n % 32] * (n % 32 > 0) + \
            [32] * (n // 32) + [n % 32] * (n % 32 > 0)
        assert sorted(flat[:n]) == own and sorted(flat[n:]) == own  # each epoch a permutation
        assert flat[:n] != flat[n:]  # a fresh order per epoch
        # a pure function of (seed, round, client): the same as planning that client alone
        alone = dm.client_batches(4, c.client_id, 2, 32)
        assert [b.tolist() for b in alone] == [b.tolist() for b in c.batches]
    assert dm.round_plan(4, 3, 2, 32).clients[0].batches[0].tolist() == \
        plan.clients[0].batches[0].tolist()
    assert dm.round_plan(5, 3, 2, 32).clients[0].batches[0].tolist() != \
        dm.client_batches(4, dm.round_plan(5, 3, 2, 32).clients[0].client_id, 2, 32)[0].tolist()


def test_round_augmentation_draws_are_keyed_by_round_client_step_sample():
    dm = _dm_with_augmentation(seed=7)
    plan = dm.round_plan(2, 3, 1, 16)
    x_all, _ = dm.train_tensors()
    c = plan.clients[1]
    for step in (0, 1):
        x = x_all[c.batches[step]]
        ref = counter_bits(7, AUGMENT_STREAM, 2, c.client_id, step, np.arange(16)[:, None],
                           np.arange(5))
        expected = torch.from_numpy(dm.augmentation.draw(ref, 8, 8))
        assert torch.equal(plan.transform.step_draws(c.client_id, step, 16), expected)
        out = plan.transform(x, 2, c.client_id, step)
        assert torch.equal(out, dm.augmentation(x, expected))
        assert torch.equal(out, dm.augment_batch(x, 2, c.client_id, step))  # off-plan path
    # the stacked call of the batched engine gives each client its own draws
    xs = torch.stack([x_all[p.batches[0]] for p in plan.clients])
    many = plan.transform.many(xs, 2, [p.client_id for p in plan.clients], 0)
    for k, p in enumerate(plan.clients):
        assert torch.equal(many[k], plan.transform(xs[k], 2, p.client_id, 0))
    assert not torch.equal(many[0], many[1])


def test_batched_and_sequential_engines_see_the_same_augmented_data():
    from fl_lightning.engines import BatchedEngine

    dm = _dm_with_augmentation(seed=1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).double()
    plan = dm.round_plan(0, 4, 1, 20)
    data = dm.train_tensors(dtype=torch.float64)
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    seq = SequentialEngine().run_round(FedAvg(), net, gp, {}, plan, data, 0.1, 0.9, 0.0)
    bat = BatchedEngine().run_round(FedAvg(), net, gp, {}, plan, data, 0.1, 0.9, 0.0)
    plain = RoundPlan(plan.round, plan.clients)  # without the augmentation
    raw = SequentialEngine().run_round(FedAvg(), net, gp, {}, plain, data, 0.1, 0.9, 0.0)
    for a, b, r in zip(seq, bat, raw, strict=True):
        assert float((a.params["1.weight"] - b.params["1.weight"]).abs().max()) < 1e-12
        assert float((a.params["1.weight"] - r.params["1.weight"]).abs().max()) > 1e-4


def test_evaluation_reads_slices_of_the_test_split_on_the_device():
    dm = FederatedDataModule(dataset="digits", num_clients=4, partition="iid",
                             eval_batch_size=100)
    x, y = dm.test_tensors()
    batches = list(dm.test_dataloader())
    assert len(batches) == -(-len(y) // 100)
    assert all(bx.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
               for bx, _ in batches)  # slices, no copies
    assert torch.equal(torch.cat([by for _, by in batches]), y)


def test_a_client_holding_only_its_samples_plans_the_simulation_batches_and_draws():
    """fl_lightning.flower's clients call the pure per-client plan functions with their own
    training-set indices: same batches (as positions into their own samples) and draws."""
    from fl_lightning.data.plans import augment_batch, client_batches

    dm = _dm_with_augmentation()
    plan = dm.round_plan(3, 3, local_epochs=2, batch_size=7)
    x_all = dm.train_tensors(torch.device("cpu"), torch.float32)[0]
    for client in plan.clients:
        own = dm.client_indices[client.client_id]
        local = client_batches(own.numpy(), dm.seed, 3, client.client_id, 2, 7, positions=True)
        assert all(torch.equal(own[p], b) for p, b in zip(local, client.batches, strict=True))
        step = len(local) - 1  # the last, short batch of the second epoch
        x_own = x_all[own][local[step]]
        expected = plan.transform(x_all[client.batches[step]], 3, client.client_id, step)
        mine = augment_batch(dm.augmentation, x_own, dm.seed, 3, client.client_id, step)
        assert torch.equal(mine, expected)
