"""CIFAR-style ResNet-18 with BatchNorm without running statistics, or GroupNorm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from fl_lightning.models._common import check_input_shape, to_rgb
from fl_lightning.models.base import FederatedNet
from fl_lightning.validate import choice, invalid

__all__ = ["ResNet18"]


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "bn":
        # Batch statistics in training *and* evaluation; no running buffers to average.
        return nn.BatchNorm2d(channels, track_running_stats=False)
    return nn.GroupNorm(groups, channels)


class _BasicBlock(nn.Module):
    """``relu(norm(conv3x3(relu(norm(conv3x3(x))))) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.norm2 = _norm(norm, cout, groups)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout, groups)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(FederatedNet):
    """ResNet-18 for small images (He et al. 2016, CIFAR variant).

    A 3x3 stem convolution (64 channels, stride 1, no max-pool), four stages of two basic blocks
    with 64, 128, 256 and 512 channels (stride 2 at the start of stages 2-4, 1x1 projection
    shortcuts where the shape changes), global average pooling and ``classifier`` =
    ``Linear(512, num_classes)`` (the head, the last child module). Any input size of at least
    8x8 works; 1-channel inputs are repeated to 3 channels.

    ``norm="bn"`` uses ``BatchNorm2d(track_running_stats=False)`` as the official FedSoL code: the
    statistics of the current batch are used in training and evaluation, so the model has no
    buffers and the server averages only parameters. ``norm="gn"`` uses
    ``GroupNorm(groups, C)`` instead (independent of the batch). Both have 11,173,962 parameters
    with 10 classes.

    Args:
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one input, ``C`` in (1, 3).
        norm: ``"bn"`` or ``"gn"``.
        groups: number of groups of GroupNorm (2 by default).

    Raises:
        ValueError: for an unknown ``norm`` or a ``groups`` that does not divide 64.

    Example:
        >>> net = ResNet18(10, (3, 32, 32))
        >>> sum(p.numel() for p in net.parameters()), len(list(net.buffers()))
        (11173962, 0)
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (3, 32, 32),
        norm: Literal["bn", "gn"] = "bn",
        groups: int = 2,
    ) -> None:
        super().__init__()
        check_input_shape("ResNet18", input_shape, min_size=8)
        choice(norm, "--model.net.norm", ("bn", "gn"), "ResNet18's normalization layers")
        if norm == "gn" and (int(groups) < 1 or 64 % int(groups)):
            raise invalid("--model.net.groups", groups, "a divisor of 64",
                          "ResNet18's GroupNorm groups; e.g. 2")
        groups = int(groups)
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False), _norm(norm, 64, groups), nn.ReLU()
        )
        stages: list[nn.Module] = []
        cin = 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(
                    _BasicBlock(cin, cout, stride, norm, groups),
                    _BasicBlock(cout, cout, 1, norm, groups),
                )
            )
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(512, int(num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        """512-d pooled features."""
        return self.pool(self.layers(self.stem(to_rgb(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))
