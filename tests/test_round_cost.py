"""Per-round work is O(sampled clients): what is population-wide is computed once."""

from __future__ import annotations

import torch

from fl_lightning.data.module import FederatedDataModule


class _CountingList(list):
    """A list that counts how often it is walked through in full."""

    walks = 0

    def __iter__(self):
        type(self).walks += 1
        return super().__iter__()


def test_the_round_plan_walks_the_population_once_not_every_round():
    dm = FederatedDataModule(dataset="digits", num_clients=50, partition="iid")
    dm.setup("fit")
    dm.client_indices = _CountingList(dm.client_indices)
    first = dm.round_plan(0, 5, 1, 16)
    walks = _CountingList.walks
    for r in range(1, 6):
        plan = dm.round_plan(r, 5, 1, 16)
        assert plan.total_samples == first.total_samples == sum(dm.client_sizes)
    assert _CountingList.walks == walks + 5  # only the five sum(dm.client_sizes) above
    dm.client_indices = [torch.arange(3), torch.arange(3, 10)]  # a new partition: summed again
    assert dm.total_samples == 10
