"""VGG-11 without BatchNorm, as used for CIFAR-10-like inputs in the FedSoL paper."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fl_lightning.models._common import check_input_shape, to_rgb
from fl_lightning.models.base import FederatedNet

__all__ = ["VGG11"]

#: Convolution widths of VGG-11 ("M" is a 2x2 max-pool).
VGG11_LAYERS: tuple[int | str, ...] = (
    64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M",
)


class VGG11(FederatedNet):
    """VGG-11 (configuration "A" of Simonyan & Zisserman) without BatchNorm, for 32x32 inputs.

    ``features``: eight 3x3 convolutions (padding 1) with ReLU and five 2x2 max-pools, taking a
    32x32 RGB image to ``512 x 1 x 1``; ``fc``: ``Linear(512, 512) ReLU Linear(512, 512) ReLU``;
    ``classifier``: ``Linear(512, num_classes)`` (the head, the last child module). Inputs of
    another size are resized to 32x32 (nearest neighbour, as the official code does for 28x28),
    1-channel inputs are repeated to 3 channels. Convolution weights are drawn from
    ``N(0, 2 / (9 * out_channels))`` with zero biases (He et al.); linear layers keep PyTorch's
    default initialization.

    With 10 classes it has 9,750,922 parameters (9,220,480 in the convolutions).

    Args:
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one input, ``C`` in (1, 3).
        hidden: width of the two hidden linear layers (512 in the paper).

    Example:
        >>> net = VGG11(10, (3, 32, 32))
        >>> sum(p.numel() for p in net.parameters())
        9750922
    """

    def __init__(
        self, num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32), hidden: int = 512
    ) -> None:
        super().__init__()
        _, height, width = check_input_shape("VGG11", input_shape)
        self.resize = (height, width) != (32, 32)
        layers: list[nn.Module] = []
        channels = 3
        for v in VGG11_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU()]
                channels = int(v)
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Sequential(
            nn.Linear(512, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.classifier = nn.Linear(hidden, int(num_classes))
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Penultimate features (after the second hidden linear layer)."""
        x = to_rgb(x)
        if self.resize:
            x = F.interpolate(x, size=(32, 32), mode="nearest")
        return self.fc(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))
