"""``ClientOptimaProbe``: where each client would go if it trained alone to its optimum."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from fl_lightning.callbacks.base import Criterion, RoundCallback, buffers_of, client_batches
from fl_lightning.callbacks.functional import (
    exact_minimum,
    flatten,
    normalize_weights,
    train_to_optimum,
)
from fl_lightning.hooks import RoundResult

__all__ = ["ClientOptimaProbe"]


class ClientOptimaProbe(RoundCallback):
    """Trains probed clients alone from the global model to a local optimum (opt-in, expensive).

    Every ``every_n_rounds`` rounds, from the global weights ``w`` after the round, each probed
    client ``k`` minimizes its mean loss ``f_k`` over its whole training set by full-batch
    gradient descent with heavy-ball momentum (``b = m b + grad f_k``, ``w = w - lr b``) under
    an explicit stopping rule, checked before every step and printed at the start of fit:

        stop when ||grad f_k(w)|| <= grad_tol, or f_k(w) <= loss_tol, or after max_steps steps.

    With ``w_k*`` the result and ``p_k = n_k / sum_j n_j`` over the probed clients::

        dist_mean, dist_max   of ||w_k* - w||
        spread_V              V = sum_k p_k ||w_k* - w_bar*||^2,  w_bar* = sum_k p_k w_k*
        centroid_dist         ||w_bar* - w||
        opt_loss              sum_k p_k f_k(w_k*)
        steps_mean, converged (share of clients stopped by grad_tol or loss_tol), grad_norm_max

    Distinct client optima (``V > 0``) are why no global model fits every client: the
    heterogeneity floor (:class:`~callbacks.HeterogeneityFloor`).

    With ``exact=true`` each client's optimum is instead the exact minimum of
    ``f_k(w) + l2/2 ||w||^2`` in float64 (:func:`~fl_lightning.callbacks.functional.exact_minimum`:
    L-BFGS, then Newton for up to ``newton_max_params`` parameters, until
    ``||grad|| < grad_tol``, at most ``max_steps`` iterations); for a convex model
    (``LogisticRegression`` with ``l2 > 0``) ``f_k*`` is then the true client optimum and the
    floor is exact. ``l2`` should be the run's ``weight_decay`` so that ``f_k`` is the objective
    the clients' SGD minimizes.

    Cost: per probed client up to ``max_steps`` full passes (forward + backward) over its data;
    for a 600-sample MNIST client and the CNN about 0.15 s per step on one CPU thread.

    Args:
        every_n_rounds: probe after every n-th round.
        clients: ids of the clients to probe (default: ``num_clients`` ids drawn once with
            ``seed``, the same every time).
        num_clients: how many clients to draw when ``clients`` is None.
        lr, momentum: of the full-batch descent.
        max_steps, grad_tol, loss_tol: the stopping rule.
        batch_size: chunk size of the full-batch gradient (memory only).
        seed: seed of the client draw.
        criterion: loss ``criterion(logits, y)`` (default: mean cross-entropy).
        exact: exact float64 client optima instead of the momentum descent.
        l2: L2 coefficient added to every ``f_k`` (``l2/2 ||w||^2``).
        newton_max_params: with ``exact``, Newton's method up to this many parameters.

    Attributes:
        optima: ``{client_id: w_k*}`` of the last probe.
        info: ``{client_id: {steps, loss, grad_norm, reason}}`` of the last probe
            (``reason`` 1: grad_tol, 2: loss_tol, 0: max_steps).

    Example:
        >>> ClientOptimaProbe(clients=[0, 3], max_steps=100).clients
        [0, 3]
    """

    prefix = "optima"

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
        criterion: Criterion | None = None,
        exact: bool = False,
        l2: float = 0.0,
        newton_max_params: int = 2000,
    ) -> None:
        super().__init__(every_n_rounds, criterion)
        self.clients = None if clients is None else [int(c) for c in clients]
        self.num_clients = self.check_int(num_clients, "num_clients")
        self.lr = self.check_positive(lr, "lr")
        self.momentum = self.check_positive(momentum, "momentum", allow_zero=True)
        self.max_steps = self.check_int(max_steps, "max_steps", 0)
        self.grad_tol = self.check_positive(grad_tol, "grad_tol", allow_zero=True)
        self.loss_tol = self.check_positive(loss_tol, "loss_tol", allow_zero=True)
        self.batch_size = self.check_int(batch_size, "batch_size")
        self.seed = int(seed)
        self.exact = bool(exact)
        self.l2 = self.check_positive(l2, "l2", allow_zero=True)
        self.newton_max_params = self.check_int(newton_max_params, "newton_max_params", 0)
        self.optima: dict[int, dict[str, torch.Tensor]] = {}
        self.info: dict[int, dict[str, float]] = {}

    def stopping_rule(self) -> str:
        if self.exact:
            return (f"exact float64 minimum of f_k + {self.l2}/2 ||w||^2 (L-BFGS, then Newton "
                    f"up to {self.newton_max_params} parameters) until ||grad|| < "
                    f"{self.grad_tol} or {self.max_steps} iterations")
        return (f"full-batch GD (lr={self.lr}, momentum={self.momentum}) until "
                f"||grad f_k|| <= {self.grad_tol} or f_k <= {self.loss_tol} or "
                f"{self.max_steps} steps")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(f"{type(self).__name__}: local optima by {self.stopping_rule()}")

    def probed_clients(self, module: Any) -> list[int]:
        if self.clients is not None:
            return list(self.clients)
        total = int(module.datamodule.num_clients)
        gen = torch.Generator().manual_seed(self.seed)
        n = min(self.num_clients, total)
        return sorted(int(c) for c in torch.randperm(total, generator=gen)[:n])

    def probe(self, module: Any, params: dict[str, torch.Tensor]) -> dict[str, float]:
        """Train the probed clients to their optima from ``params``; returns the metrics."""
        ids = self.probed_clients(module)
        sizes = [len(module.datamodule.client_indices[k]) for k in ids]
        p = torch.tensor(normalize_weights(sizes, len(ids)), dtype=torch.float64)
        buffers = buffers_of(module)
        self.optima, self.info = {}, {}
        with torch.enable_grad():
            for k in ids:
                batches = client_batches(module, k, self.batch_size)
                if self.exact:
                    w_k, got = exact_minimum(
                        module.net, params, buffers, batches, self.criterion, self.grad_tol,
                        max(self.max_steps, 1), self.newton_max_params, self.l2,
                    )
                    info = {"steps": got["iterations"], "loss": got["loss"],
                            "grad_norm": got["grad_norm"], "reason": got["converged"]}
                else:
                    w_k, info = train_to_optimum(
                        module.net, params, buffers, batches, self.criterion, self.lr,
                        self.momentum, self.max_steps, self.grad_tol, self.loss_tol,
                    )
                self.optima[k], self.info[k] = w_k, info
        w = flatten(params).double()
        opt = torch.stack([flatten(self.optima[k]).double() for k in ids])
        centroid = (p[:, None] * opt).sum(0)
        dist = torch.linalg.vector_norm(opt - w, dim=1)
        infos = [self.info[k] for k in ids]
        return {
            "dist_mean": float(dist.mean()),
            "dist_max": float(dist.max()),
            "spread_V": float((p * ((opt - centroid) ** 2).sum(1)).sum()),
            "centroid_dist": float(torch.linalg.vector_norm(centroid - w)),
            "opt_loss": float(sum(pk * i["loss"] for pk, i in zip(p.tolist(), infos,
                                                                  strict=True))),
            "steps_mean": sum(i["steps"] for i in infos) / len(infos),
            "converged": sum(1.0 for i in infos if i["reason"] > 0) / len(infos),
            "grad_norm_max": max(i["grad_norm"] for i in infos),
        }

    def measure(self, module: Any, params: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.probe(module, params)

    @override
    def on_round_end(self, trainer: pl.Trainer, module: Any, result: RoundResult) -> None:
        if not self.is_due(result.round):
            return
        start = time.perf_counter()
        metrics = self.measure(module, {k: v.detach() for k, v in result.global_after.items()})
        metrics["seconds"] = time.perf_counter() - start
        self.seconds += metrics["seconds"]
        self.log_round(trainer, result.round + 1, metrics)

    @override
    def plot(self, trainer: Any) -> None:
        self.plot_series(trainer, ["spread_V", "dist_mean", "centroid_dist"], self.prefix,
                          "client optima probed from the global model")
