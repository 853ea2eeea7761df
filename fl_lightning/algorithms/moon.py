"""MOON (Li et al., 2021): model-contrastive learning on penultimate features."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fl_lightning import validate
from fl_lightning.algorithms.base import (
    IGNORE_INDEX,
    ClientResult,
    LocalContext,
    Params,
    cross_entropy,
    grad_of,
)
from fl_lightning.algorithms.features import FeatureCaller
from fl_lightning.algorithms.state import StatefulAlgorithm

__all__ = ["MOON", "model_contrastive_loss"]


def model_contrastive_loss(z: Tensor, z_global: Tensor, z_prev: Tensor, tau: float,
                           y: Tensor | None = None) -> Tensor:
    """``-log( e^{s(z,z_g)/tau} / (e^{s(z,z_g)/tau} + e^{s(z,z_prev)/tau}) )``, batch mean
    (over the real samples when the labels ``y`` are given: padding samples, labelled
    :data:`~fl_lightning.algorithms.base.IGNORE_INDEX`, are left out).

    ``s`` is the cosine similarity; the global features are the positive pair, the client's
    previous local model's features the negative one.
    """
    pos = F.cosine_similarity(z, z_global, dim=-1)
    neg = F.cosine_similarity(z, z_prev, dim=-1)
    logits = torch.stack([pos, neg], dim=1) / tau
    target = torch.zeros(len(z), dtype=torch.long, device=z.device)
    if y is not None:  # class 0 (the positive pair) for real samples, ignored for padding
        target = torch.where(y == IGNORE_INDEX, y, target)
    return cross_entropy(logits, target)


class MOON(StatefulAlgorithm):
    """MOON: local loss ``CE(w) + mu * L_con(z, z_g, z_prev)``.

    ``z``, ``z_g`` and ``z_prev`` are the penultimate features (``net.forward_features``) of the
    batch under the local, the global and the client's previous local model; ``L_con`` is
    :func:`model_contrastive_loss` with temperature ``tau``. A client that never trained before
    uses the initial global model as its previous model (``first_previous="initial"``, the
    official code) or the current global model (``"global"``). Previous models are kept per
    client and saved in checkpoints. The reported loss is the cross-entropy.

    Args:
        mu: weight of the contrastive term (paper Table 4: 0.1).
        tau: temperature of the contrastive term (paper Table 4: 0.5).
        first_previous: ``initial`` or ``global``.
        state_device: where the previous local models are kept (e.g. ``cpu``).

    Raises:
        ConfigError: for a negative ``mu``, a non-positive ``tau``, or (at the first step) a
            network without ``forward_features``.

    Example:
        >>> MOON().mu, MOON().tau
        (0.1, 0.5)
    """

    name = "moon"
    client_state = ("prev",)
    server_state = ("initial",)
    batchable = True
    initial: Params | None

    def __init__(
        self,
        mu: float = 0.1,
        tau: float = 0.5,
        first_previous: Literal["initial", "global"] = "initial",
        state_device: str | None = None,
    ) -> None:
        super().__init__(state_device)
        self.mu = validate.nonnegative(mu, "--model.algorithm.mu", "the contrastive weight")
        self.tau = validate.positive(tau, "--model.algorithm.tau", "the temperature; e.g. 0.5")
        validate.choice(first_previous, "--model.algorithm.first_previous",
                        ("initial", "global"))
        self.first_previous = first_previous
        self._caller: FeatureCaller | None = None

    def _features(self, ctx: LocalContext) -> FeatureCaller:
        if self._caller is None or self._caller.net is not ctx.net:
            self._caller = FeatureCaller(ctx.net, "MOON")
        return self._caller

    def init_server(self, global_params: Params) -> None:
        """Keep a copy of the initial global model (a loaded one is kept)."""
        if self.initial is None:
            self.initial = {k: v.detach().clone() for k, v in global_params.items()}

    def client_begin(self, ctx: LocalContext) -> None:
        self._features(ctx)  # made here, outside the local step (a compiled step cannot)
        gp = ctx.global_params
        device = next(iter(gp.values())).device
        first = self.server("initial", gp) if self.first_previous == "initial" else gp
        ctx.state["prev"] = self.stored(
            ctx, lambda: {"prev": {k: v.to(device) for k, v in first.items()}}
        )["prev"]

    def _losses(self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext):
        caller = self._features(ctx)
        with torch.no_grad():
            z_g = caller.features(ctx.global_params, ctx.buffers, x)
            z_prev = caller.features(ctx.state["prev"], ctx.buffers, x)
        z = caller.features(params, ctx.buffers, x)
        ce = cross_entropy(caller.logits(params, ctx.buffers, z), y)
        return ce, model_contrastive_loss(z, z_g, z_prev, self.tau, y)

    def proximal_gradient(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        """Gradient of ``mu * L_con`` and its value."""

        def con(p: Params) -> Tensor:
            return self.mu * self._losses(p, x, y, ctx)[1]

        return grad_of(con, params)

    def direction(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        def total(p: Params) -> tuple[Tensor, Tensor]:
            ce, con = self._losses(p, x, y, ctx)
            return ce + self.mu * con, ce

        return grad_of(total, params, has_aux=True)

    def client_end(self, ctx: LocalContext, result: ClientResult) -> None:
        result.state["prev"] = result.params
