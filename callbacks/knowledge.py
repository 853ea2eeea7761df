"""``KnowledgePreservation``: how much global knowledge each local model keeps."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from fl_lightning.callbacks.base import (
    RoundCallback,
    buffers_of,
    eval_batches,
)
from fl_lightning.callbacks.functional import class_accuracy
from fl_lightning.hooks import RoundResult

__all__ = ["KnowledgePreservation"]


class KnowledgePreservation(RoundCallback):
    """Test accuracy of every local model right after its local training (FedSoL, section 5).

    For each sampled client ``k`` (at most ``max_clients``, in training order), the accuracy
    ``acc(w_k)`` of its weights after local training on the global test split, next to the
    accuracy ``acc(w_g)`` of the global model it started from::

        local_acc_mean, local_acc_std   mean and population std over clients of acc(w_k)
        start_acc                       acc(w_g), the model the clients received
        forgetting                      start_acc - local_acc_mean

    A client trained on a few classes forgets the others; algorithms that preserve global
    knowledge (FedSoL's claim) keep ``local_acc_mean`` high and ``forgetting`` low.

    Cost: ``min(#clients, max_clients) + 1`` passes over ``max_samples`` test samples per
    measurement.

    Args:
        every_n_rounds: measure after every n-th round.
        max_clients: evaluate at most this many clients of the round (all when None).
        max_samples: evaluate on the first ``max_samples`` test samples only (all when None).
        batch_size: evaluation batch size.

    Example:
        >>> KnowledgePreservation(max_clients=5).max_clients
        5
    """

    prefix = "knowledge"
    needs_client_results = True

    def __init__(
        self,
        every_n_rounds: int = 1,
        max_clients: int | None = None,
        max_samples: int | None = None,
        batch_size: int = 1000,
    ) -> None:
        super().__init__(every_n_rounds)
        self.max_clients = (
            None if max_clients is None else self.check_int(max_clients, "max_clients")
        )
        self.max_samples = (
            None if max_samples is None else self.check_int(max_samples, "max_samples")
        )
        self.batch_size = self.check_int(batch_size, "batch_size")

    def _accuracy(self, module: Any, params: dict[str, torch.Tensor], batches: list) -> float:
        correct, count, _ = class_accuracy(
            module.net, params, buffers_of(module), batches, module.num_classes
        )
        return float(correct.sum() / count.sum())

    @override
    def on_round_end(self, trainer: pl.Trainer, module: Any, result: RoundResult) -> None:
        if not self.is_due(result.round):
            return
        start = time.perf_counter()
        batches = eval_batches(module, self.max_samples, self.batch_size)
        clients = result.clients[: self.max_clients]
        accs = torch.tensor([self._accuracy(module, c.params, batches) for c in clients],
                            dtype=torch.float64)
        start_acc = self._accuracy(module, result.global_before, batches)
        self.seconds += time.perf_counter() - start
        self.log_round(trainer, result.round + 1, {
            "local_acc_mean": float(accs.mean()),
            "local_acc_std": float(accs.std(unbiased=False)),
            "start_acc": start_acc,
            "forgetting": start_acc - float(accs.mean()),
        })

    def plot(self, trainer: Any) -> None:
        self.plot_series(trainer, ["local_acc_mean", "start_acc", "forgetting"], "knowledge",
                          "local models on the global test set")
