"""The checking module's one grammar, the shared tensor helpers, and the batch-transform
protocols the batched engine recognizes the data module's augmentation by (all in-process)."""

from __future__ import annotations

import math

import pytest
import torch

from fl_lightning.algorithms.base import ClientResult, weighted_mean
from fl_lightning.data.augment import BatchAugment
from fl_lightning.data.module import FederatedDataModule
from fl_lightning.engines.base import GroupedTransform, PlannedAugmentation
from fl_lightning.engines.stacked import PaddedRound
from fl_lightning.errors import ConfigError
from fl_lightning.tensors import data_weights, flatten_dict, unflatten_dict
from fl_lightning.tensors import weighted_mean as mean_of
from fl_lightning.validate import boolean, choice, integer, nonnegative, positive, share


@pytest.mark.parametrize("check,args,line", [
    (positive, (-1, "--model.local_lr"),
     "--model.local_lr=-1 is invalid: it must be a finite number > 0"),
    (positive, (math.nan, "--x", "e.g. 0.1"), "--x=nan is invalid: it must be a finite number > 0 "
                                             "(e.g. 0.1)"),
    (nonnegative, (-0.5, "--x"), "--x=-0.5 is invalid: it must be a finite number >= 0"),
    (share, (1.0, "--x"), "--x=1.0 is invalid: it must be in [0, 1)"),
    (share, (0.0, "--x"), None),
    (integer, (True, "--x", 1), "--x=True is invalid: it must be an integer >= 1"),
    (integer, (17, "--x", 1, 16), "--x=17 is invalid: it must be an integer in [1, 16]"),
    (choice, ("bf61", "--a", ("none", "bf16")),
     "--a='bf61' is invalid: it must be one of 'none', 'bf16' (did you mean --a bf16?)"),
    (boolean, ("yes", "--b"), "--b='yes' is invalid: it must be true or false"),
])
def test_every_checker_speaks_one_grammar(check, args, line):
    if line is None:
        assert check(*args) == args[0]
        return
    with pytest.raises(ConfigError) as err:
        check(*args)
    assert str(err.value) == line


def test_share_bounds_and_positive_share():
    assert share(1.0, "--x", low_open=True, high_open=False) == 1.0
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\]"):
        share(0.0, "--x", low_open=True, high_open=False)
    with pytest.raises(ConfigError, match=r"must be in \[0, 0.5\)"):
        share(0.5, "--x", high=0.5)


def test_one_weighted_mean_is_the_algorithms_bit_for_bit():
    torch.manual_seed(0)
    params = [{"w": torch.randn(5, 3), "b": torch.randn(3)} for _ in range(3)]
    results = [ClientResult(client_id=i, num_samples=n, params=p, num_steps=1,
                            loss=torch.zeros(()))
               for i, (n, p) in enumerate(zip((3, 10, 7), params, strict=True))]
    got = weighted_mean(params[0], results)
    weights = data_weights([3, 10, 7]).tolist()
    sizes = torch.tensor([3.0, 10.0, 7.0])
    loop_weights = (sizes / sizes.sum()).tolist()  # the algorithms' former loop, written out
    for k in params[0]:
        expected = params[0][k] * loop_weights[0]
        for w, p in zip(loop_weights[1:], params[1:], strict=True):
            expected = expected + p[k] * w
        assert torch.equal(got[k], expected)
        assert torch.equal(mean_of([p[k] for p in params], weights), expected)
    assert data_weights([1, 3], torch.float64).dtype == torch.float64
    flat = flatten_dict(params[0])
    back = unflatten_dict(flat, params[0])
    assert flat.shape == (18,) and all(torch.equal(back[k], params[0][k]) for k in params[0])


def test_the_data_modules_augmentation_is_a_planned_grouped_transform():
    dm = FederatedDataModule(dataset="digits", num_clients=4, partition="iid")
    dm.augmentation = BatchAugment(crop_padding=2, flip=True)
    plan = dm.round_plan(3, 2, 1, 8)
    assert isinstance(plan.transform, GroupedTransform)
    assert isinstance(plan.transform, PlannedAugmentation)
    _, y = dm.train_tensors()
    padded = PaddedRound.build(plan, y, torch.device("cpu"))
    assert padded.augment is dm.augmentation and padded.draws is not None  # the device path

    def plain(x, round_idx, client_id, step):
        return x

    assert not isinstance(plain, GroupedTransform)
