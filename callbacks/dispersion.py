"""``ClientUpdateDispersion``: how much the clients' updates disagree."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from fl_lightning.callbacks.base import (
    Criterion,
    RoundCallback,
    buffers_of,
    client_batches,
)
from fl_lightning.callbacks.functional import (
    b_local_dissimilarity,
    flatten,
    loss_and_grad,
    normalize_weights,
    update_dispersion,
)
from fl_lightning.hooks import RoundResult

__all__ = ["ClientUpdateDispersion"]


class ClientUpdateDispersion(RoundCallback):
    """Spread and cosines of the client updates, and FedProx's B-local dissimilarity.

    With ``u_k = w_k - w_g`` the update of sampled client ``k`` and ``p_k = n_k / sum_j n_j``
    over the sampled clients::

        u_bar                = sum_k p_k u_k
        dispersion           = sqrt(sum_k p_k ||u_k - u_bar||^2)
        relative_dispersion  = dispersion / ||u_bar||
        cos_pairwise_mean/min, cos_to_mean, update_norm_mean

    and, with ``b_local``, at the global weights ``w`` after the round, with ``f_k`` the mean
    loss over client ``k``'s whole training set (at most ``max_samples`` samples)::

        B(w) = sqrt(sum_k p_k ||grad f_k(w)||^2) / ||sum_k p_k grad f_k(w)||      (>= 1)

    (Li et al., FedProx, Definition 3; 1 when all clients agree). Logged as
    ``dispersion/<name>`` and ``dispersion/b_local``.

    Cost: the dispersion is free; ``B`` takes one gradient over each sampled client's data.

    Args:
        every_n_rounds: measure after every n-th round.
        b_local: also compute ``B(w)``.
        max_samples: cap on each client's samples used for ``grad f_k``.
        batch_size: chunk size of the gradient computation.
        criterion: loss ``criterion(logits, y)`` (default: mean cross-entropy).

    Example:
        >>> ClientUpdateDispersion(b_local=False).b_local
        False
    """

    prefix = "dispersion"
    needs_client_results = True

    def __init__(
        self,
        every_n_rounds: int = 1,
        b_local: bool = True,
        max_samples: int | None = None,
        batch_size: int = 500,
        criterion: Criterion | None = None,
    ) -> None:
        super().__init__(every_n_rounds, criterion)
        self.b_local = bool(b_local)
        self.max_samples = (
            None if max_samples is None else self.check_int(max_samples, "max_samples")
        )
        self.batch_size = self.check_int(batch_size, "batch_size")

    def client_gradient(self, module: Any, client_id: int,
                        params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``grad f_k(w)`` of one client's mean loss, flat."""
        batches = client_batches(module, client_id, self.batch_size)
        if self.max_samples is not None:
            kept, total = [], 0
            for x, y in batches:
                if total >= self.max_samples:
                    break
                take = min(len(y), self.max_samples - total)
                kept.append((x[:take], y[:take]))
                total += take
            batches = kept
        _, g = loss_and_grad(module.net, params, buffers_of(module), batches, self.criterion)
        return g

    @override
    def on_round_end(self, trainer: pl.Trainer, module: Any, result: RoundResult) -> None:
        if not self.is_due(result.round):
            return
        start = time.perf_counter()
        p = normalize_weights(result.client_sizes, len(result.clients))
        g0 = flatten(result.global_before)
        updates = torch.stack([flatten(c.params) - g0 for c in result.clients])
        metrics = update_dispersion(updates, p)
        if self.b_local:
            with torch.enable_grad():
                grads = torch.stack([
                    self.client_gradient(module, c.client_id, result.global_after)
                    for c in result.clients
                ])
            metrics["b_local"] = b_local_dissimilarity(grads, p)
        self.seconds += time.perf_counter() - start
        self.log_round(trainer, result.round + 1, metrics)

    def plot(self, trainer: Any) -> None:
        self.plot_series(trainer, ["relative_dispersion", "cos_pairwise_mean", "b_local"],
                          "dispersion", "client update dispersion")
