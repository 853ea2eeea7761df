"""FedNova (Wang et al., 2020): normalized averaging removes the bias of unequal local work."""

from __future__ import annotations

import torch
from torch import Tensor

from fl_lightning.algorithms.base import ClientResult, LocalContext, Params
from fl_lightning.algorithms.scaffold import effective_steps
from fl_lightning.algorithms.state import StatefulAlgorithm
from fl_lightning.algorithms.sums import RoundSums, accumulate
from fl_lightning.errors import ConfigError

__all__ = ["FedNova"]


class FedNova(StatefulAlgorithm):
    """FedNova with momentum-corrected normalization.

    Client ``i`` takes ``tau_i = E * batches_i`` local steps (its number of steps this round)
    of momentum-``m`` SGD, which amount to ``a_i = effective_steps(tau_i, m)`` plain steps. The
    server, with ``p_i = n_i / sum_{j in S} n_j`` over the sampled clients ``S``, normalizes:

    ``w_g <- w_g - tau_eff * sum_i p_i (w_g - w_i) / a_i``,  ``tau_eff = sum_i p_i a_i``.

    When every ``a_i`` is equal this is exactly FedAvg's weighted average.

    Optional cross-client variance reduction (``ccvr``, the official config's ``nova_ccvr``):
    the direction becomes ``g + c_i`` with ``c_i = d - d_i``, where ``d_i = (w_g - w_i) /
    (lr a_i)`` is client ``i``'s normalized update from its last round and
    ``d <- (1 - P_S) d + sum_{i in S} (n_i / n) d_i`` (``P_S``: the sampled share of all ``n``
    samples). The official code never calls its ``d`` update, so there ``d = 0`` and
    ``c_i = -d_i``; ``ccvr_server_update=False`` reproduces that.

    Args:
        ccvr: add the cross-client variance reduction term to the direction.
        ccvr_server_update: update the server's ``d`` (paper-consistent) or keep it 0 (official).
        state_device: where the clients' ``d_i`` are kept between rounds (e.g. ``cpu``).

    Example:
        >>> FedNova().name
        'fednova'
    """

    name = "fednova"
    server_state = ("d",)
    server_rule = "custom"
    batchable = True
    d: Params | None

    def __init__(
        self,
        ccvr: bool = False,
        ccvr_server_update: bool = True,
        state_device: str | None = None,
    ) -> None:
        super().__init__(state_device)
        self.ccvr = bool(ccvr)
        self.ccvr_server_update = bool(ccvr_server_update)
        self.client_state = ("d_i",) if self.ccvr else ()

    def init_server(self, global_params: Params) -> None:
        """With ``ccvr``: ``d = 0`` (a loaded ``d`` is kept); without it no server state."""
        if self.ccvr and self.d is None:
            self.d = {k: torch.zeros_like(v) for k, v in global_params.items()}

    def client_begin(self, ctx: LocalContext) -> None:
        if not self.ccvr:
            return
        gp = ctx.global_params
        device = next(iter(gp.values())).device
        d = self.server("d", gp)
        d_i = self.stored(
            ctx, lambda: {"d_i": {k: torch.zeros_like(v) for k, v in gp.items()}}
        )["d_i"]
        ctx.state["c_i"] = {k: d[k].to(device) - d_i[k] for k in gp}

    def proximal_gradient(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        """The variance-reduction term ``c_i`` (gradient of ``<c_i, w>``); needs ``ccvr``."""
        del x, y
        if not self.ccvr:
            raise ConfigError(
                "--model.algorithm.proximal=FedNova has no proximal term without ccvr: set "
                "--model.algorithm.proximal.init_args.ccvr=true"
            )
        c_i = ctx.state["c_i"]
        return dict(c_i), sum((c_i[k] * params[k]).sum() for k in params)

    def direction(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        grads, loss = self.task_grad(params, x, y, ctx)
        if self.ccvr:
            c_i = ctx.state["c_i"]
            grads = {k: g + c_i[k] for k, g in grads.items()}
        return grads, loss

    def client_end(self, ctx: LocalContext, result: ClientResult) -> None:
        a_i = effective_steps(result.num_steps, ctx.momentum)
        result.extras["a"] = a_i
        if self.ccvr and a_i * ctx.lr > 0.0:
            inv = 1.0 / (ctx.lr * a_i)
            d_i = {k: (ctx.global_params[k] - result.params[k]) * inv for k in result.params}
            result.state["d_i"] = d_i
            result.extras["d_i"] = d_i

    def begin_sums(
        self,
        global_params: Params,
        *,
        num_clients: int | None = None,
        total_samples: int | None = None,
    ) -> RoundSums:
        """The default sums, with the global weights the normalized sum is taken from."""
        sums = super().begin_sums(global_params, num_clients=num_clients,
                                  total_samples=total_samples)
        sums.scalars["global"] = global_params
        return sums

    def fold(self, sums: RoundSums, result: ClientResult) -> None:
        """The weighted sum of the weights (the rule when a client took no step), the
        normalized sum ``sum_i (n_i / a_i) (w_g - w_i)`` and ``sum_i n_i a_i``, and with
        ``ccvr`` the weighted sum ``sum_i n_i d_i`` of the new ``d_i``."""
        super().fold(sums, result)
        a_i, n_i = float(result.extras.get("a", result.num_steps)), float(result.num_samples)
        if a_i <= 0.0:
            sums.scalars["no_step"] = True
        elif not sums.scalars.get("no_step"):
            gp = sums.scalars["global"]
            accumulate(sums.values.setdefault("nova", {}),
                       {k: gp[k] - result.params[k] for k in sums.names}, n_i / a_i, sums.names)
            sums.scalars["tau"] = sums.scalars.get("tau", 0.0) + n_i * a_i
        if self.ccvr and self.ccvr_server_update and "d_i" in result.extras:
            sums.scalars["d_samples"] = sums.scalars.get("d_samples", 0) + result.num_samples
            sums.add("d", result.extras["d_i"], n_i)

    def finish(self, sums: RoundSums, global_params: Params) -> Params:
        """``w_g - tau_eff sum_i (p_i / a_i) (w_g - w_i)`` with ``p_i = n_i / n`` over the
        kept clients and ``tau_eff = sum_i p_i a_i`` (the weighted mean, and no ``d``
        update, if a client took no step); with ``ccvr``: ``d <- (1 - P_S) d + sum_i (n_i /
        n) d_i``."""
        if sums.scalars.get("no_step"):  # a client took no step: nothing to normalize
            return super().finish(sums, global_params)
        n = float(sums.kept_samples)
        tau_eff, acc = sums.scalars["tau"] / n, sums.values["nova"]
        out = {k: w - tau_eff * (acc[k] / n) for k, w in global_params.items()}
        if "d" in sums.values:
            self._update_d(sums, global_params)
        return out

    def _update_d(self, sums: RoundSums, global_params: Params) -> None:
        server_d = self.server("d", global_params)
        new_samples = sums.scalars["d_samples"]
        total = float(sums.total_samples or new_samples)
        share, acc = new_samples / total, sums.values["d"]
        for k in server_d:
            server_d[k] = server_d[k] * (1.0 - share) + acc[k].to(server_d[k].device) / total
