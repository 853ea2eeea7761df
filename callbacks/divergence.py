"""``WeightDivergence``: how far local training takes the clients from the global model."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from fl_lightning.callbacks.base import RoundCallback
from fl_lightning.callbacks.functional import weight_divergence
from fl_lightning.hooks import RoundResult

__all__ = ["WeightDivergence"]


class WeightDivergence(RoundCallback):
    """Distances between the global model a round started from and the clients' local models.

    With ``w_g`` the weights sent to the clients (``RoundResult.global_before``) and ``w_k`` the
    weights client ``k`` returned::

        d_k = ||w_g - w_k||_2            over the sampled clients
        div_mean, div_std, div_max       mean, population std and max of d_k
        pairwise_mean                    mean over pairs i < j of ||w_i - w_j||_2

    and with ``per_layer`` the mean over clients of ``||w_g[l] - w_k[l]||`` for every parameter
    tensor ``l`` (``divergence/div/<name>``). Logged as ``divergence/<name>``; cheap (no
    forward pass).

    Args:
        every_n_rounds: measure after every n-th round.
        per_layer: also log the per-layer distances.

    Example:
        >>> WeightDivergence(per_layer=True).per_layer
        True
    """

    prefix = "divergence"
    needs_client_results = True

    def __init__(self, every_n_rounds: int = 1, per_layer: bool = False) -> None:
        super().__init__(every_n_rounds)
        self.per_layer = bool(per_layer)

    @override
    def on_round_end(self, trainer: pl.Trainer, module: Any, result: RoundResult) -> None:
        if not self.is_due(result.round):
            return
        metrics = weight_divergence(
            result.global_before, [c.params for c in result.clients], self.per_layer
        )
        self.log_round(trainer, result.round + 1, metrics)

    def plot(self, trainer: Any) -> None:
        self.plot_series(trainer, ["div_mean", "div_max", "pairwise_mean"], "divergence",
                          "client weight divergence ||w_g - w_k||")
