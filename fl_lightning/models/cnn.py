"""The two-convolution CNN of McMahan et al. (FedAvg), as used in the FedSoL paper."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fl_lightning.models._common import check_input_shape
from fl_lightning.models.base import FederatedNet

__all__ = ["FedAvgCNN"]


class FedAvgCNN(FederatedNet):
    """FedAvg CNN: ``Conv(3,32,5,p2) ReLU MaxPool2 Conv(32,64,5,p2) ReLU MaxPool2 FC512 ReLU FC``.

    A 1-channel input is repeated to 3 channels, so the same network serves MNIST and CIFAR-10.
    The first linear layer takes ``64 * (H // 4) * (W // 4)`` features: 3136 for 28x28 inputs
    (1,664,970 parameters with 10 classes) and 4096 for 32x32 inputs.

    Args:
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one input; ``C`` must be 1 or 3.

    Attributes:
        features: the convolutional body followed by ``FC512 + ReLU`` (the penultimate features).
        classifier: the last linear layer (the "head"; FedSoL can perturb it separately).

    Example:
        >>> net = FedAvgCNN(10, (1, 28, 28))
        >>> sum(p.numel() for p in net.parameters())
        1664970
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32)) -> None:
        super().__init__()
        channels, height, width = check_input_shape("FedAvgCNN", input_shape, min_size=4)
        self.num_classes = int(num_classes)
        self.input_channels = channels
        flat = 64 * (height // 4) * (width // 4)
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2, stride=2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2, stride=2),
            nn.Flatten(),
            nn.Linear(flat, 512),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(512, self.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate 512-d features (after the ReLU of the first linear layer)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
