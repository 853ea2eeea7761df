"""``HeterogeneityFloor``: the part of the global loss no single model can remove."""

from __future__ import annotations

from typing import Any

import torch

from fl_lightning.callbacks._base import _buffers, _client_batches
from fl_lightning.callbacks.functional import hessian_eigenvalues, loss_and_grad, normalize_weights
from fl_lightning.callbacks.optima import ClientOptimaProbe

__all__ = ["HeterogeneityFloor"]


class HeterogeneityFloor(ClientOptimaProbe):
    """The gap ``F(w) - sum_k p_k f_k*`` and its curvature bounds (opt-in, expensive).

    Runs :class:`~callbacks.ClientOptimaProbe` (same arguments, same cost, same metrics),
    then, over the probed clients with ``p_k = n_k / sum_j n_j``::

        F(w)  = sum_k p_k f_k(w)           the global model's loss on the probed clients
        gap   = F(w) - sum_k p_k f_k(w_k*) >= 0 up to the probe's accuracy

    ``gap`` cannot reach 0 unless the clients share an optimum: every model pays at least
    ``min_w F - sum_k p_k f_k*`` (the heterogeneity floor). With ``curvature`` the extreme
    Hessian eigenvalues of every ``f_k`` at its optimum are measured (Lanczos,
    ``curvature_iter`` steps), ``mu = min_k lambda_min``, ``L = max_k lambda_max``, and for
    ``mu``-strongly convex, ``L``-smooth ``f_k``::

        bound_lower = mu/2 V  <=  gap(w)            for every w
        floor <= L/2 V = bound_upper                (the floor min_w F - sum_k p_k f_k*)

    with ``V`` the spread of the optima. For a neural network ``mu`` is usually <= 0 and the
    lower bound is vacuous; the upper bound still bounds the floor locally.

    Logs the probe's metrics plus ``global_loss``, ``gap``, and with ``curvature``
    ``mu``, ``L``, ``bound_lower``, ``bound_upper`` under ``floor/``.

    Cost: the probe's, plus one loss pass per probed client, plus with ``curvature``
    ``2 * curvature_iter`` Hessian-vector products over each probed client's data.

    Args:
        curvature: measure ``mu`` and ``L`` and log the bounds.
        curvature_iter: Lanczos steps for each extreme eigenvalue.
        **kwargs: the arguments of :class:`~callbacks.ClientOptimaProbe`.

    Example:
        >>> HeterogeneityFloor(curvature=True, clients=[1]).curvature
        True
    """

    prefix = "floor"

    def __init__(
        self,
        every_n_rounds: int = 50,
        clients: list[int] | None = None,
        num_clients: int = 3,
        lr: float = 0.05,
        momentum: float = 0.9,
        max_steps: int = 300,
        grad_tol: float = 1e-3,
        loss_tol: float = 0.0,
        batch_size: int = 1000,
        seed: int = 0,
        criterion: Any = None,
        curvature: bool = False,
        curvature_iter: int = 20,
    ) -> None:
        super().__init__(every_n_rounds, clients, num_clients, lr, momentum, max_steps,
                         grad_tol, loss_tol, batch_size, seed, criterion)
        self.curvature = bool(curvature)
        self.curvature_iter = self._int(
            curvature_iter, "--trainer.callbacks.HeterogeneityFloor.curvature_iter"
        )

    def measure(self, module: Any, params: dict[str, torch.Tensor]) -> dict[str, float]:
        metrics = self.probe(module, params)
        ids = list(self.optima)
        sizes = [len(module.datamodule.client_indices[k]) for k in ids]
        p = normalize_weights(sizes, len(ids))
        buffers = _buffers(module)
        global_loss = 0.0
        mus, ls = [], []
        with torch.enable_grad():
            for pk, k in zip(p, ids, strict=True):
                batches = _client_batches(module, k, self.batch_size)
                loss, _ = loss_and_grad(module.net, params, buffers, batches, self.criterion)
                global_loss += pk * float(loss)
                if self.curvature:
                    top, _ = hessian_eigenvalues(
                        module.net, self.optima[k], buffers, batches, 1, self.curvature_iter,
                        self.criterion, seed=self.seed,
                    )
                    low, _ = hessian_eigenvalues(
                        module.net, self.optima[k], buffers, batches, 1, self.curvature_iter,
                        self.criterion, seed=self.seed, which="smallest",
                    )
                    ls.append(float(top[0]))
                    mus.append(float(low[0]))
        metrics["global_loss"] = global_loss
        metrics["gap"] = global_loss - metrics["opt_loss"]
        if self.curvature:
            mu, big_l = min(mus), max(ls)
            metrics.update({
                "mu": mu, "L": big_l,
                "bound_lower": mu / 2 * metrics["spread_V"],
                "bound_upper": big_l / 2 * metrics["spread_V"],
            })
        return metrics

    def _plot(self, trainer: Any) -> None:
        self._plot_series(trainer, ["gap", "spread_V", "bound_upper"], self.prefix,
                          "heterogeneity floor: F(w) - sum p_k f_k*")
