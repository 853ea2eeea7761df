"""``FederatedNet``: the base class of the models that ``--model.net`` accepts."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["FederatedNet"]


class FederatedNet(nn.Module):
    """Base of every model built as ``Net(num_classes, input_shape, ...)``.

    ``--model.net`` is typed with this class, so ``fl-lightning fit --help`` lists only the
    project's models (not every ``torch.nn`` module). A model of your own subclasses it, takes
    ``num_classes`` and ``input_shape`` as its first two arguments and makes its classifier head
    its last child module (FedSoL's head/body split); pass it as ``--model.net my.module.Net``.

    Args:
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one input.

    Example:
        >>> from fl_lightning.models import MLP2NN
        >>> isinstance(MLP2NN(10, (1, 28, 28)), FederatedNet)
        True
    """

    def __init__(self, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28)) -> None:
        super().__init__()
