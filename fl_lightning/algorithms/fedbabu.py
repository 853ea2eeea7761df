"""FedBABU (Oh et al., 2022): federated training of the body only; the head stays at init."""

from __future__ import annotations

from fl_lightning.algorithms.base import LocalContext
from fl_lightning.algorithms.fedavg import FedAvg

__all__ = ["FedBABU"]


class FedBABU(FedAvg):
    """FedBABU: FedAvg in which the classifier head (the network's last child module) is frozen
    at its initial weights during federated training. Personalization then fine-tunes the whole
    network per client (:mod:`fl_lightning.personalize`).

    The head is excluded from the local optimizer, so neither gradient, momentum nor weight decay
    moves it (as ``requires_grad=False`` does in the official code).

    Example:
        >>> FedBABU().name
        'fedbabu'
    """

    name = "fedbabu"

    def frozen(self, ctx: LocalContext) -> set[str]:
        return set(ctx.head_names())
