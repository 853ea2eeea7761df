"""FedSAM / FedASAM (Caldarola et al., 2022): sharpness-aware local steps."""

from __future__ import annotations

import torch
from torch import Tensor

from fl_lightning import validate
from fl_lightning.algorithms.base import (
    Algorithm,
    LocalContext,
    Params,
    global_norm,
    grad_of,
)

__all__ = ["FedSAM"]


class FedSAM(Algorithm):
    """FedSAM: the cross-entropy gradient taken at adversarially perturbed weights.

    With ``g = grad CE(w)`` on the batch, the perturbation is

    - SAM (``adaptive=False``): ``eps = rho * g / (||g||_2 + 1e-12)``
    - ASAM (``adaptive=True``): ``eps = rho * w^2 * g / (||w * g||_2 + 1e-12)``

    with norms over all perturbed parameters, and the direction is ``grad CE(w + eps)`` on the
    same batch; the optimizer then steps from the unperturbed ``w``. The reported loss is
    ``CE(w)`` of the first pass.

    Args:
        rho: perturbation radius (paper Table 4: 0.1 for FedSAM, 1.0 for FedASAM).
        adaptive: ASAM's scale-invariant perturbation.
        perturb_head: perturb the classifier head (the network's last child module).
        perturb_body: perturb every other parameter.

    Example:
        >>> FedSAM(rho=0.05).rho
        0.05
    """

    name = "fedsam"

    def __init__(
        self,
        rho: float = 0.1,
        adaptive: bool = False,
        perturb_head: bool = True,
        perturb_body: bool = True,
    ) -> None:
        self.rho = validate.nonnegative(rho, "--model.algorithm.rho", "the perturbation radius")
        self.adaptive = bool(adaptive)
        self.perturb_head = bool(perturb_head)
        self.perturb_body = bool(perturb_body)

    def direction(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        names = ctx.select(params, self.perturb_head, self.perturb_body)
        if not names:
            return self.task_grad(params, x, y, ctx)
        g, loss = grad_of(lambda p: self.task_loss(ctx, p, x, y), params, names)
        if self.adaptive:
            norm = global_norm([params[k].abs() * g[k] for k in names])
        else:
            norm = global_norm(list(g.values()))
        scale = self.rho / (norm + 1e-12)
        perturbed = dict(params)
        for k in names:
            e = (torch.pow(params[k], 2) * g[k] if self.adaptive else g[k]) * scale
            perturbed[k] = params[k] + e
        direction, _ = grad_of(lambda p: self.task_loss(ctx, p, x, y), perturbed, list(params))
        return direction, loss
