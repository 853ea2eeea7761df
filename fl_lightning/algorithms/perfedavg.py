"""Per-FedAvg (Fallah et al., 2020), first-order variant: a MAML-style local step."""

from __future__ import annotations

import torch
from torch import Tensor

from fl_lightning import validate
from fl_lightning.algorithms.base import (
    IGNORE_INDEX,
    Algorithm,
    LocalContext,
    Params,
    real_samples,
)

__all__ = ["PerFedAvg"]


class PerFedAvg(Algorithm):
    """Per-FedAvg (FO): ``w <- w - beta * grad f(w - alpha grad f(w; D); D')``.

    Each local step splits its mini-batch into two halves ``D`` and ``D'`` (a batch of one
    sample is used for both), takes the inner step ``w' = w - alpha g(w; D)`` with plain SGD and
    returns ``(beta / lr) g(w'; D')``, so that the engine's SGD step of size ``lr`` moves by
    ``beta g(w'; D')`` (momentum and weight decay are applied on top, as the official code's
    shared optimizer does).

    In a padded batch (``ctx.padded``: the batched engine's static shapes, padding samples
    labelled ``IGNORE_INDEX`` at the end) the halves are those of the ``n`` real samples,
    ``n // 2`` and the rest, given as label masks on the whole padded batch, which is the
    same for a network without cross-sample operations (the batched engine pads only
    those).

    Note:
        The official code draws ``D`` and ``D'`` as two consecutive mini-batches and runs
        ``ceil(batches / E)`` such double steps per epoch; here every planned mini-batch is one
        double step on its two halves, so a round sees each sample once per epoch.

    Args:
        beta: outer (meta) step size (the official config uses 0.01).
        alpha: inner step size; ``None`` uses the round's local learning rate.

    Example:
        >>> PerFedAvg().beta
        0.01
    """

    name = "perfedavg"

    def __init__(self, beta: float = 0.01, alpha: float | None = None) -> None:
        self.beta = validate.nonnegative(beta, "--model.algorithm.beta", "the meta step size")
        self.alpha = (
            None if alpha is None
            else validate.nonnegative(alpha, "--model.algorithm.alpha", "the inner step size")
        )

    def direction(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        if ctx.padded:
            x1 = x2 = x
            y1, y2 = _real_halves(y)
        else:
            half = max(len(y) // 2, 1)
            x1, y1 = x[:half], y[:half]
            x2, y2 = (x[half:], y[half:]) if len(y) > 1 else (x, y)
        alpha = ctx.lr if self.alpha is None else self.alpha
        g1, loss = self.task_grad(params, x1, y1, ctx)
        inner = {k: params[k] - alpha * g1[k] for k in params}
        g2, _ = self.task_grad(inner, x2, y2, ctx)
        scale = _meta_scale(self.beta, ctx.lr)
        return {k: g * scale for k, g in g2.items()}, loss


def _meta_scale(beta: float, lr: float | Tensor) -> float | Tensor:
    """``beta / lr``, 0 for ``lr = 0``. The batched engine passes ``lr`` as a 0-d tensor:
    then no Python branch on its value, so a compiled step serves every learning rate."""
    if isinstance(lr, Tensor):
        return torch.where(lr > 0, beta / lr, torch.zeros_like(lr))
    return beta / lr if lr > 0 else 0.0


def _real_halves(y: Tensor) -> tuple[Tensor, Tensor]:
    """The labels of the first ``max(n // 2, 1)`` real samples and of the others (or of all
    ``n`` when ``n = 1``), the rest relabelled ``IGNORE_INDEX``; padding sits at the end."""
    real = real_samples(y)
    n = real.sum()
    half = torch.clamp(n // 2, min=1)
    pos = torch.arange(y.shape[-1], device=y.device)
    ignore = torch.full_like(y, IGNORE_INDEX)
    first = torch.where(pos < half, y, ignore)
    second = torch.where(real & ((pos >= half) | (n == 1)), y, ignore)
    return first, second
