"""Multinomial logistic regression: the FedProx paper's model (``mclr``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fl_lightning.models.base import FederatedNet

__all__ = ["LogisticRegression"]


class LogisticRegression(FederatedNet):
    """``Flatten -> Linear(prod(input_shape), num_classes)``: softmax regression on any input.

    With the mean cross-entropy this is the convex multinomial logistic regression of the
    FedProx paper (Li et al., MLSys 2020; ``mclr`` in its code): 60 inputs x 10 classes = 610
    parameters on the synthetic data, 784 x 10 + 10 = 7,850 on MNIST. The weights start as the
    official TensorFlow ``dense`` layer does: Glorot-uniform kernel, zero bias (``init
    "pytorch"`` keeps ``nn.Linear``'s own initialization). The official layer declares an L2
    regularizer that its loss never adds, so there is no weight decay here either.

    Args:
        num_classes: number of output logits.
        input_shape: shape of one input (any; it is flattened).
        init: ``glorot`` (the official code's) or ``pytorch``.

    Attributes:
        classifier: the linear layer (it is also the head).

    Example:
        >>> net = LogisticRegression(10, (1, 1, 60))
        >>> sum(p.numel() for p in net.parameters())
        610
        >>> net(torch.zeros(3, 1, 1, 60)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28),
        init: str = "glorot",
    ) -> None:
        super().__init__()
        if init not in ("glorot", "pytorch"):
            raise ValueError(f"LogisticRegression init={init!r} is unknown: use glorot or pytorch")
        features = math.prod(int(v) for v in input_shape)
        if features < 1 or int(num_classes) < 1:
            raise ValueError(
                f"LogisticRegression needs a non-empty input and >= 1 class, got input_shape "
                f"{tuple(input_shape)} and num_classes {num_classes}"
            )
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(features, int(num_classes))
        if init == "glorot":
            nn.init.xavier_uniform_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened input (the model has no hidden layer)."""
        return self.flatten(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(x))
