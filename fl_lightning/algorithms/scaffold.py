"""SCAFFOLD (Karimireddy et al., 2020): control variates correct the client drift."""

from __future__ import annotations

import torch
from torch import Tensor

from fl_lightning.algorithms.base import ClientResult, LocalContext, Params, foreach_add
from fl_lightning.algorithms.state import StatefulAlgorithm
from fl_lightning.algorithms.sums import RoundSums

__all__ = ["SCAFFOLD", "effective_steps"]


def effective_steps(steps: int, momentum: float) -> float:
    """Number of plain-SGD steps that ``steps`` momentum-SGD steps amount to.

    ``K' = (K - m (1 - m^K) / (1 - m)) / (1 - m)`` (the sum over steps of the accumulated
    momentum weights, as in FedNova and the official FedSoL code); ``K' = K`` when ``m = 0``.

    Example:
        >>> effective_steps(10, 0.0)
        10.0
        >>> round(effective_steps(2, 0.5), 6)  # 1 + (1 + 0.5)
        2.5
    """
    k, m = float(steps), float(momentum)
    if m == 0.0:
        return k
    return (k - m * (1.0 - m**k) / (1.0 - m)) / (1.0 - m)


class SCAFFOLD(StatefulAlgorithm):
    """SCAFFOLD with option-II control variates.

    Local direction (every step): ``g + (c - c_i)`` with ``g = grad CE(w)``, the client's control
    variate ``c_i`` and the server's ``c``. After the client's ``K`` local steps:

    ``c_i+ = c_i - c + (w_g - w_i) / (K' * lr)``

    where ``K' = effective_steps(K, momentum)`` (the official code's momentum correction,
    ``momentum_corrected=True``) or ``K' = K`` (the paper's option II). The server averages the
    weights as FedAvg does and updates

    ``c <- c + (|S| / N) * mean_{i in S} (c_i+ - c_i)``

    with ``S`` the sampled clients and ``N`` the population size. Both ``c`` and every ``c_i``
    start at zero (``c`` is created by :meth:`init_server`) and are saved in checkpoints.

    Args:
        momentum_corrected: divide by the momentum-corrected ``K'`` (official code) instead of
            ``K`` (paper).
        state_device: where the clients' ``c_i`` are kept between rounds (e.g. ``cpu``); unset
            keeps them with the model.

    Example:
        >>> SCAFFOLD().name
        'scaffold'
    """

    name = "scaffold"
    client_state = ("c_i",)
    server_state = ("c",)
    server_rule = "custom"
    batchable = True
    c: Params | None

    def __init__(self, momentum_corrected: bool = True, state_device: str | None = None) -> None:
        super().__init__(state_device)
        self.momentum_corrected = bool(momentum_corrected)

    def _zeros(self, like: Params) -> Params:
        return {k: torch.zeros_like(v) for k, v in like.items()}

    def init_server(self, global_params: Params) -> None:
        """``c = 0`` (a loaded ``c`` is kept, moved to the global weights' device)."""
        if self.c is None:
            self.c = self._zeros(global_params)
        self.c = {k: v.to(global_params[k].device) for k, v in self.c.items()}

    def client_begin(self, ctx: LocalContext) -> None:
        gp = ctx.global_params
        c = self.server("c", gp)
        c_i = self.stored(ctx, lambda: {"c_i": self._zeros(gp)})["c_i"]
        ctx.state["c"], ctx.state["c_i"] = c, c_i
        ctx.state["correction"] = {k: self.c[k] - c_i[k] for k in gp}

    def proximal_gradient(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        """The drift correction ``c - c_i`` (the gradient of ``<c - c_i, w>``) and that term."""
        del x, y
        corr = ctx.state["correction"]
        return dict(corr), sum((corr[k] * params[k]).sum() for k in params)

    def direction(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        grads, loss = self.task_grad(params, x, y, ctx)
        corr = ctx.state["correction"]  # c - c_i, computed once per client
        names = list(grads)
        moved = foreach_add([grads[k] for k in names], [corr[k] for k in names])
        return dict(zip(names, moved, strict=True)), loss

    def client_end(self, ctx: LocalContext, result: ClientResult) -> None:
        steps = result.num_steps
        k_eff = effective_steps(steps, ctx.momentum) if self.momentum_corrected else float(steps)
        c, c_i = ctx.state["c"], ctx.state["c_i"]
        if k_eff * ctx.lr <= 0.0:  # no step taken: the client learned nothing about its drift
            result.extras["delta_c"] = self._zeros(c)
            return
        inv = 1.0 / (k_eff * ctx.lr)
        c_plus = {
            k: c_i[k] - c[k] + (ctx.global_params[k] - result.params[k]) * inv for k in c_i
        }
        result.state["c_i"] = c_plus
        result.extras["delta_c"] = {k: c_plus[k] - c_i[k] for k in c_i}

    def fold(self, sums: RoundSums, result: ClientResult) -> None:
        """The weighted sum of the weights and ``sum_i (c_i+ - c_i)``."""
        super().fold(sums, result)
        if "delta_c" in result.extras:
            sums.add("delta_c", result.extras["delta_c"])

    def finish(self, sums: RoundSums, global_params: Params) -> Params:
        """The weighted mean; ``c <- c + (|S| / N) mean_i (c_i+ - c_i)``. The mean of the
        ``delta_c`` is their left-to-right sum over their count (before streaming:
        ``torch.stack(...).mean(0)``, whose float32 rounding may differ in the last bits)."""
        out = super().finish(sums, global_params)
        count = sums.counts.get("delta_c", 0)
        if count:
            c, total = self.server("c", global_params), sums.values["delta_c"]
            share = count / float(sums.num_clients or count)
            for k in c:
                c[k] = c[k] + share * (total[k] / count)
        return out
