"""The "simple CNN" of pfl-research's CIFAR-10 benchmark (Granqvist et al., 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fl_lightning.models._common import check_input_shape
from fl_lightning.models.base import FederatedNet
from fl_lightning.validate import share

__all__ = ["PflSimpleCNN"]


class PflSimpleCNN(FederatedNet):
    """``Conv(C,32,3) ReLU Conv(32,64,3) ReLU MaxPool2 Dropout(0.25) FC(128) ReLU Dropout(0.5)
    FC(num_classes)``: the CIFAR-10 model of pfl-research's benchmarks (the Keras MNIST CNN).

    The convolutions have no padding, so a 32x32 input gives ``64 * 14 * 14 = 12544`` features
    before the first linear layer (1,626,442 parameters with 3 channels and 10 classes) and a
    28x28 input ``64 * 12 * 12 = 9216``. The input's own channels are used (no repetition to
    RGB).

    Its two dropout layers draw random numbers in training: the batched engine runs it with
    ``randomness="different"`` (per-client masks, see ``docs/engines.md``).

    Args:
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one input (``C`` in 1 or 3, ``H, W >= 6``).
        dropout1: drop probability after the pooling (0.25).
        dropout2: drop probability after the hidden linear layer (0.5).

    Attributes:
        features: the convolutional body, ``FC(128)``, ReLU and the second dropout (the
            penultimate features).
        classifier: the last linear layer (the head).

    Example:
        >>> net = PflSimpleCNN(10, (3, 32, 32))
        >>> sum(p.numel() for p in net.parameters())
        1626442
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (3, 32, 32),
        dropout1: float = 0.25,
        dropout2: float = 0.5,
    ) -> None:
        super().__init__()
        c, h, w = check_input_shape("PflSimpleCNN", input_shape, min_size=6)
        for name, p in (("dropout1", dropout1), ("dropout2", dropout2)):
            share(p, f"--model.net.{name}", "PflSimpleCNN's dropout probability; e.g. 0.25")
        flat = 64 * ((h - 4) // 2) * ((w - 4) // 2)
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(float(dropout1)),
            nn.Flatten(),
            nn.Linear(flat, 128),
            nn.ReLU(),
            nn.Dropout(float(dropout2)),
        )
        self.classifier = nn.Linear(128, int(num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate 128-d features (after the second dropout)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
