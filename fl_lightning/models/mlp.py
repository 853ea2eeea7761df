"""The "2NN" multilayer perceptron of McMahan et al. (FedAvg, 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fl_lightning.models._common import check_input_shape
from fl_lightning.models.base import FederatedNet
from fl_lightning.validate import integer

__all__ = ["MLP2NN"]


class MLP2NN(FederatedNet):
    """``Flatten -> FC(hidden) ReLU -> FC(hidden) ReLU -> FC(num_classes)``.

    With 28x28 grayscale inputs and ``hidden=200`` it is the paper's MNIST 2NN: 199,210
    parameters, about 8x fewer than :class:`~fl_lightning.models.FedAvgCNN` and far cheaper per
    step on a CPU (used for the systems tables in ``docs/systems.md``).

    Args:
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one input (``C`` in 1 or 3).
        hidden: width of the two hidden layers.

    Attributes:
        features: the two hidden layers (the penultimate features).
        classifier: the last linear layer (the head).

    Example:
        >>> net = MLP2NN(10, (1, 28, 28))
        >>> sum(p.numel() for p in net.parameters())
        199210
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28), hidden: int = 200
    ) -> None:
        super().__init__()
        c, h, w = check_input_shape("MLP2NN", input_shape)
        integer(int(hidden), "--model.net.hidden", 1, hint="MLP2NN's hidden width; e.g. 200")
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(hidden, int(num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (after the second hidden layer's ReLU)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
