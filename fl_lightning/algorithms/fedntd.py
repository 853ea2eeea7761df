"""FedNTD (Lee et al., 2022): distill the global model's not-true class predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fl_lightning import validate
from fl_lightning.algorithms.base import (
    Algorithm,
    LocalContext,
    Params,
    cross_entropy,
    grad_of,
    kl_batchmean,
)

__all__ = ["FedNTD", "not_true_logits", "ntd_loss"]


def not_true_logits(logits: Tensor, y: Tensor) -> Tensor:
    """The ``C - 1`` logits of the classes other than the true one, in class order (a padding
    sample's label :data:`~fl_lightning.algorithms.base.IGNORE_INDEX` reads as class 0)."""
    b, c = logits.shape
    y = y.clamp_min(0)
    # column j keeps class j, or j + 1 from the true class on (no data-dependent shapes, so
    # it also runs under torch.vmap)
    keep = torch.arange(c - 1, device=logits.device).expand(b, c - 1)
    keep = keep + (keep >= y.view(-1, 1)).long()
    return torch.gather(logits, 1, keep)


def ntd_loss(logits: Tensor, global_logits: Tensor, y: Tensor, tau: float) -> Tensor:
    """``tau^2 * KL(softmax(nt(g)/tau) || softmax(nt(l)/tau))``, batch mean over the real
    samples (``nt``: not-true)."""
    local = F.log_softmax(not_true_logits(logits, y) / tau, dim=1)
    target = torch.softmax(not_true_logits(global_logits.detach(), y) / tau, dim=1)
    return tau**2 * kl_batchmean(local, target, y)


class FedNTD(Algorithm):
    """FedNTD: local loss ``CE(w) + beta * ntd_loss(f(w; x), f(w_g; x), y, tau)``.

    The reported loss is the cross-entropy.

    Args:
        tau: softening temperature of the not-true distillation (paper Table 4: 1).
        beta: weight of the distillation term (paper Table 4: 1).

    Example:
        >>> FedNTD().beta
        1.0
    """

    name = "fedntd"

    def __init__(self, tau: float = 1.0, beta: float = 1.0) -> None:
        self.tau = validate.positive(tau, "--model.algorithm.tau", "the temperature; e.g. 1.0")
        self.beta = validate.nonnegative(beta, "--model.algorithm.beta",
                                         "the distillation weight")

    def proximal_gradient(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        """Gradient of ``beta * ntd_loss`` and its value."""
        with torch.no_grad():
            g_logits = ctx.forward(ctx.global_params, x)

        def prox(p: Params) -> Tensor:
            return self.beta * ntd_loss(ctx.forward(p, x), g_logits, y, self.tau)

        return grad_of(prox, params)

    def direction(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        with torch.no_grad():
            g_logits = ctx.forward(ctx.global_params, x)

        def total(p: Params) -> tuple[Tensor, Tensor]:
            logits = ctx.forward(p, x)
            ce = cross_entropy(logits, y)
            return ce + self.beta * ntd_loss(logits, g_logits, y, self.tau), ce

        return grad_of(total, params, has_aux=True)
