"""FedNova (Wang et al., 2020): normalized averaging removes the bias of unequal local work."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fl_lightning import tensors
from fl_lightning.algorithms.base import ClientResult, LocalContext, Params
from fl_lightning.algorithms.scaffold import effective_steps
from fl_lightning.algorithms.state import StatefulAlgorithm
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

    def aggregate(
        self,
        global_params: Params,
        results: Sequence[ClientResult],
        *,
        num_clients: int | None = None,
        total_samples: int | None = None,
    ) -> Params:
        a = [float(r.extras.get("a", r.num_steps)) for r in results]
        if any(v <= 0.0 for v in a):  # a client took no step: nothing to normalize
            return super().aggregate(global_params, results)
        p = tensors.data_weights(r.num_samples for r in results).tolist()
        tau_eff = sum(pi * ai for pi, ai in zip(p, a, strict=True))
        out: Params = {}
        for k, w in global_params.items():
            acc = torch.zeros_like(w)
            for pi, ai, r in zip(p, a, results, strict=True):
                acc = acc + (w - r.params[k]) * (pi / ai)
            out[k] = w - tau_eff * acc
        new_d = [(r.num_samples, r.extras["d_i"]) for r in results if "d_i" in r.extras]
        if self.ccvr and self.ccvr_server_update and new_d:
            server_d = self.server("d", global_params)
            total = float(total_samples or sum(n for n, _ in new_d))
            share = sum(n for n, _ in new_d) / total
            for k in server_d:
                d = server_d[k] * (1.0 - share)
                for n, d_i in new_d:
                    d = d + (n / total) * d_i[k].to(d.device)
                server_d[k] = d
        return out
