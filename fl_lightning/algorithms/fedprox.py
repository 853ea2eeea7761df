"""FedProx (Li et al., 2020): a proximal term keeps the local model near the global one."""

from __future__ import annotations

from torch import Tensor

from fl_lightning import validate
from fl_lightning.algorithms.base import Algorithm, LocalContext, Params

__all__ = ["FedProx"]


class FedProx(Algorithm):
    """FedProx: local loss ``CE(w) + mu/2 ||w - w_g||_2^2``.

    The direction is ``grad CE(w) + mu (w - w_g)`` (the proximal gradient in closed form); with
    ``mu = 0`` it is exactly FedAvg. The reported loss is the cross-entropy alone.

    Args:
        mu: strength of the proximal term (the FedSoL paper's Table 4 uses 1.0; the official
            code reads it from the ``rho`` field of its config).

    Raises:
        ConfigError: if ``mu`` is negative or not finite.

    Example:
        >>> FedProx(mu=0.5).mu
        0.5
    """

    name = "fedprox"

    def __init__(self, mu: float = 1.0) -> None:
        self.mu = validate.nonnegative(mu, "--model.algorithm.mu", "the proximal strength")

    def direction(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        grads, loss = self.task_grad(params, x, y, ctx)
        prox, _ = self.proximal_gradient(params, x, y, ctx)
        return {k: g + prox[k] for k, g in grads.items()}, loss

    def proximal_gradient(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        """Gradient ``mu (w - w_g)`` of the proximal term ``mu/2 ||w - w_g||^2``, and the term."""
        del x, y
        diff = {k: params[k] - ctx.global_params[k] for k in params}
        value = 0.5 * self.mu * sum((d * d).sum() for d in diff.values())
        return {k: self.mu * d for k, d in diff.items()}, value
