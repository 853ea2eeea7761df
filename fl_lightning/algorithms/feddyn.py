"""FedDyn (Acar et al., 2021): dynamic regularization aligns local and global stationary points."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fl_lightning.algorithms.base import (
    Algorithm,
    ClientResult,
    LocalContext,
    Params,
    check_positive,
)
from fl_lightning.algorithms.state import ClientStateStore, check_state_device

__all__ = ["FedDyn"]


class FedDyn(Algorithm):
    """FedDyn in the official FedSoL code's parametrization.

    Client ``i`` minimizes ``CE(w) - <h_i, w> + alpha/2 ||w - w_g||^2`` (direction
    ``grad CE(w) - h_i + alpha (w - w_g)``), then updates its state
    ``h_i <- h_i - alpha (w_i - w_g)``. The server keeps

    ``h <- h - (alpha / N) * sum_{i in S} (w_i - w_g)``  (``N``: all clients, ``S``: sampled)

    and sets ``w_g <- sum_{i in S} p_i w_i - h / alpha`` with ``p_i`` the data-size weights (the
    paper averages uniformly; with equal client sizes the two agree). ``h`` and every ``h_i``
    start at zero and are saved in checkpoints.

    Args:
        alpha: regularization strength (the official config uses 0.1).
        state_device: where the clients' ``h_i`` are kept between rounds (e.g. ``cpu``).

    Raises:
        ConfigError: if ``alpha`` is not a finite number > 0.

    Example:
        >>> FedDyn(alpha=0.01).alpha
        0.01
    """

    name = "feddyn"
    #: Its gradient-state update ``h_k <- h_k - alpha (w_k - w)`` is the first-order condition
    #: of an exactly solved local problem; a straggler's partial solution would enter ``h_k``
    #: for good, so ``straggler_policy partial`` is refused (use ``drop``).
    partial_work = False
    client_state = ("h_i",)
    server_rule = "custom"
    batchable = True

    def __init__(self, alpha: float = 0.1, state_device: str | None = None) -> None:
        self.alpha = check_positive(
            "the FedDyn strength alpha (FedDyn divides by it)", alpha, "--model.algorithm.alpha",
            "e.g. 0.1, or use FedAvg",
        )
        self.clients = ClientStateStore(check_state_device(state_device))
        self.h: Params | None = None

    def client_begin(self, ctx: LocalContext) -> None:
        gp = ctx.global_params
        device = next(iter(gp.values())).device
        ctx.state["h_i"] = self.clients.get(
            ctx.client_id, lambda: {"h_i": {k: torch.zeros_like(v) for k, v in gp.items()}},
            device,
        )["h_i"]

    def proximal_gradient(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        """Gradient ``-h_i + alpha (w - w_g)`` of the dynamic regularizer, and the regularizer."""
        del x, y
        h_i, a = ctx.state["h_i"], self.alpha
        diff = {k: params[k] - ctx.global_params[k] for k in params}
        value = sum(-(h_i[k] * params[k]).sum() + 0.5 * a * (diff[k] ** 2).sum() for k in params)
        return {k: a * diff[k] - h_i[k] for k in params}, value

    def direction(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        grads, loss = self.task_grad(params, x, y, ctx)
        h_i, a = ctx.state["h_i"], self.alpha
        return {
            k: g - h_i[k] + a * (params[k] - ctx.global_params[k]) for k, g in grads.items()
        }, loss

    def client_end(self, ctx: LocalContext, result: ClientResult) -> None:
        move = {k: result.params[k] - ctx.global_params[k] for k in result.params}
        h_i = ctx.state["h_i"]
        result.state["h_i"] = {k: h_i[k] - self.alpha * move[k] for k in h_i}
        result.extras["move"] = move

    def aggregate(
        self,
        global_params: Params,
        results: Sequence[ClientResult],
        *,
        num_clients: int | None = None,
        total_samples: int | None = None,
    ) -> Params:
        avg = super().aggregate(global_params, results)
        if self.h is None:
            self.h = {k: torch.zeros_like(v) for k, v in global_params.items()}
        n = float(num_clients or len(results))
        for k in self.h:
            h = self.h[k].to(global_params[k].device)
            for r in results:
                h = h - (self.alpha / n) * r.extras["move"][k]
            self.h[k] = h
        return {k: avg[k] - self.h[k] / self.alpha for k in avg}

    def state_dict(self) -> dict[str, Any]:
        return {"h": self.h, "clients": self.clients.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.h = state.get("h")
        self.clients.load_state_dict(state.get("clients", {}))
