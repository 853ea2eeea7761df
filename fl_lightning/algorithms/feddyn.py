"""FedDyn (Acar et al., 2021): dynamic regularization aligns local and global stationary points."""

from __future__ import annotations

import torch
from torch import Tensor

from fl_lightning import validate
from fl_lightning.algorithms.base import ClientResult, LocalContext, Params
from fl_lightning.algorithms.state import StatefulAlgorithm
from fl_lightning.algorithms.sums import RoundSums

__all__ = ["FedDyn"]


class FedDyn(StatefulAlgorithm):
    """FedDyn in the official FedSoL code's parametrization.

    Client ``i`` minimizes ``CE(w) - <h_i, w> + alpha/2 ||w - w_g||^2`` (direction
    ``grad CE(w) - h_i + alpha (w - w_g)``), then updates its state
    ``h_i <- h_i - alpha (w_i - w_g)``. The server keeps

    ``h <- h - (alpha / N) * sum_{i in S} (w_i - w_g)``  (``N``: all clients, ``S``: sampled)

    and sets ``w_g <- sum_{i in S} p_i w_i - h / alpha`` with ``p_i`` the data-size weights (the
    paper averages uniformly; with equal client sizes the two agree). ``h`` and every ``h_i``
    start at zero (``h`` is created by :meth:`init_server`) and are saved in checkpoints.

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
    server_state = ("h",)
    server_rule = "custom"
    batchable = True
    h: Params | None

    def __init__(self, alpha: float = 0.1, state_device: str | None = None) -> None:
        super().__init__(state_device)
        self.alpha = validate.positive(
            alpha, "--model.algorithm.alpha",
            "the FedDyn strength, which FedDyn divides by; e.g. 0.1, or use FedAvg",
        )

    def init_server(self, global_params: Params) -> None:
        """``h = 0`` (a loaded ``h`` is kept)."""
        if self.h is None:
            self.h = {k: torch.zeros_like(v) for k, v in global_params.items()}

    def client_begin(self, ctx: LocalContext) -> None:
        gp = ctx.global_params
        ctx.state["h_i"] = self.stored(
            ctx, lambda: {"h_i": {k: torch.zeros_like(v) for k, v in gp.items()}}
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

    def fold(self, sums: RoundSums, result: ClientResult) -> None:
        """The weighted sum of the weights and ``sum_i (w_i - w_g)`` (plain sums: under DDP
        one all-reduce adds every rank's)."""
        super().fold(sums, result)
        sums.add("move", result.extras["move"])

    def finish(self, sums: RoundSums, global_params: Params) -> Params:
        """``h <- h - (alpha / N) sum_i (w_i - w_g)`` (``N``: the population; the number of kept
        clients when it is unknown), then ``w_g <- sum_i p_i w_i - h / alpha``. (Before DDP
        reduced the sums, ``h`` moved client after client: float32 results differ in the last
        bits.)"""
        avg = super().finish(sums, global_params)
        server_h = self.server("h", global_params)
        if "move" in sums.values:
            n, total = float(sums.num_clients or sums.kept), sums.values["move"]
            for k in server_h:
                server_h[k] = server_h[k].to(global_params[k].device) - (self.alpha / n) * total[k]
        return {k: avg[k] - server_h[k] / self.alpha for k in avg}
