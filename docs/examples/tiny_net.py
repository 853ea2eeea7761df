"""A model of one's own for ``--model.net`` (docs/extending.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from fl_lightning.models.base import FederatedNet


class TinyMLP(FederatedNet):
    """``Flatten -> Linear(hidden) -> Tanh -> Linear(num_classes)``.

    The classifier head is the last child module (FedSoL perturbs it, FedBABU freezes it) and
    ``forward_features`` returns the penultimate features (MOON, FedSoL's head-only shortcut).

    Args:
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one input.
        hidden: width of the hidden layer.
    """

    def __init__(self, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28),
                 hidden: int = 32) -> None:
        super().__init__(num_classes, input_shape)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden),
                                  nn.Tanh())
        self.head = nn.Linear(hidden, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))
