"""FedDC (Gao et al., CVPR 2022): federated learning with local drift decoupling and correction.

A worked example of an algorithm written outside the package (docs/extending.md): client state,
server state, a proximal term and a custom server rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fl_lightning import validate
from fl_lightning.algorithms import StatefulAlgorithm
from fl_lightning.algorithms.base import ClientResult, LocalContext, Params


class FedDC(StatefulAlgorithm):
    """FedDC: each client learns a local drift ``h_i`` that decouples it from the global model.

    Client ``i`` keeps its drift ``h_i`` and a gradient correction ``g_i``; the server keeps
    the mean correction ``g`` and the sum ``H`` of every client's drift. Starting from ``w_g``,
    the client minimizes

    ``CE(w) + alpha/2 ||w + h_i - w_g||^2 + <w, g - g_i>``

    (direction ``grad CE(w) + alpha (w + h_i - w_g) + (g - g_i)``). After its ``K`` local steps
    with learning rate ``lr``, with ``d_i = w_i - w_g``:

    ``h_i <- h_i + d_i``,  ``g_i <- g_i - g - d_i / (K lr)``.

    The server corrects the mean of the uploaded weights by the clients' mean drift
    (``N``: all clients):

    ``g <- g + (1/N) sum_i (g_i+ - g_i)``,  ``H <- H + sum_i d_i``,
    ``w_g <- sum_i p_i w_i + H / N``.

    Args:
        alpha: strength of the drift penalty (the paper uses 0.01 to 0.1).
        state_device: where the clients' ``h_i`` and ``g_i`` are kept (e.g. ``cpu``).

    Raises:
        ConfigError: if ``alpha`` is not a finite number > 0.
    """

    name = "feddc"
    client_state = ("h_i", "g_i")
    server_state = ("g", "drift_sum")
    server_rule = "custom"

    def __init__(self, alpha: float = 0.01, state_device: str | None = None) -> None:
        super().__init__(state_device)
        self.alpha = validate.positive(alpha, "--model.algorithm.alpha",
                                       "the drift penalty; e.g. 0.01")

    def init_server(self, global_params: Params) -> None:
        for name in self.server_state:  # zeros, unless loaded from a checkpoint
            if getattr(self, name) is None:
                setattr(self, name, {k: torch.zeros_like(v) for k, v in global_params.items()})

    def client_begin(self, ctx: LocalContext) -> None:
        gp = ctx.global_params
        g = self.server("g", gp)
        state = self.stored(ctx, lambda: {e: {k: torch.zeros_like(v) for k, v in gp.items()}
                                          for e in self.client_state})
        ctx.state.update(state)
        ctx.state["correction"] = {k: g[k] - state["g_i"][k] for k in gp}

    def proximal_gradient(
        self, params: Params, x: Tensor, y: Tensor | None, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        """Gradient of ``alpha/2 ||w + h_i - w_g||^2 + <w, g - g_i>``, and the term."""
        del x, y
        h_i, corr, gp = ctx.state["h_i"], ctx.state["correction"], ctx.global_params
        gap = {k: params[k] + h_i[k] - gp[k] for k in params}
        value = sum(0.5 * self.alpha * (gap[k] ** 2).sum() + (corr[k] * params[k]).sum()
                    for k in params)
        return {k: self.alpha * gap[k] + corr[k] for k in params}, value

    def direction(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        grads, loss = self.task_grad(params, x, y, ctx)
        prox, _ = self.proximal_gradient(params, x, y, ctx)
        return {k: g + prox[k] for k, g in grads.items()}, loss

    def client_end(self, ctx: LocalContext, result: ClientResult) -> None:
        gp, steps = ctx.global_params, result.num_steps
        drift = {k: result.params[k] - gp[k] for k in gp}
        h_i, g_i, g = ctx.state["h_i"], ctx.state["g_i"], self.server("g", gp)
        inv = 1.0 / (steps * ctx.lr) if steps * ctx.lr > 0 else 0.0
        new_g_i = {k: g_i[k] - g[k] - drift[k] * inv for k in gp}
        result.state["h_i"] = {k: h_i[k] + drift[k] for k in gp}
        result.state["g_i"] = new_g_i
        result.extras["drift"] = drift
        result.extras["delta_g"] = {k: new_g_i[k] - g_i[k] for k in gp}

    def aggregate(self, global_params, results, *, num_clients=None, total_samples=None):
        mean = super().aggregate(global_params, results)
        g, drift_sum = self.server("g", global_params), self.server("drift_sum", global_params)
        n = float(num_clients or len(results))
        for k in g:
            for r in results:
                g[k] = g[k] + r.extras["delta_g"][k] / n
                drift_sum[k] = drift_sum[k] + r.extras["drift"][k]
        return {k: mean[k] + drift_sum[k] / n for k in mean}
