"""FedAvg (McMahan et al., 2017): local SGD on the cross-entropy, data-size weighted averaging."""

from __future__ import annotations

from torch import Tensor

from fl_lightning.algorithms.base import Algorithm, LocalContext, Params

__all__ = ["FedAvg"]


class FedAvg(Algorithm):
    """Federated averaging.

    Local direction: ``grad CE(w)`` (the task gradient, so it declares the ``plain_gradient``
    fast path). Server: ``w_g <- sum_k n_k w_k / sum_k n_k``, the declared ``"mean"`` rule.

    Example:
        >>> FedAvg().name, FedAvg.plain_gradient
        ('fedavg', True)
    """

    name = "fedavg"
    plain_gradient = True

    def direction(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        """The gradient of :meth:`task_loss` at ``params``, and the loss."""
        return self.task_grad(params, x, y, ctx)
