"""A systems mechanism: free-riding clients (docs/extending.md)."""

from __future__ import annotations

import torch
from torch import Tensor

from fl_lightning.systems import Attack


class FreeRider(Attack):
    """Free riders: a share of the population trains nothing and sends a zero update
    (``Delta_k = 0``, i.e. the global weights back), diluting the honest clients' mean.

    Args:
        share: share of the population that free-rides, in ``[0, 1)``.
    """

    name = "free_rider"

    def corrupt(self, delta: Tensor, gen: torch.Generator) -> Tensor:
        del gen
        return torch.zeros_like(delta)
