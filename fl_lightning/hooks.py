"""The round-hook protocol through which callbacks read what a round produced.

Any Lightning ``Callback`` (or the ``FederatedModule`` itself) that defines

.. code-block:: python

    def on_round_end(self, trainer, module, result: RoundResult) -> None: ...

is called once per communication round, after the server update and before Lightning's
``on_train_batch_end``. ``result`` is only valid during the call: copy what you keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from fl_lightning.algorithms.base import ClientResult, Params

__all__ = ["RoundResult"]


@dataclass
class RoundResult:
    """What one communication round produced.

    Attributes:
        round: index of the round, from 0.
        lr: local learning rate used by the clients.
        client_ids: ids of the clients that reported, in the order they trained.
        client_sizes: their training-set sizes (aggregation weights).
        clients: their :class:`~fl_lightning.algorithms.base.ClientResult` (weights after local
            training, steps, mean loss).
        global_before: global weights sent to the clients.
        aggregate: the server rule's output (the average for FedAvg) before the server optimizer.
        global_after: global weights after the server optimizer step.
        train_loss: mean over clients of their mean local training loss.
        skipped_clients: ids of clients left out because their update was not finite
            (``--model.on_nonfinite skip_client``).
        systems: the round's systems metrics (``stragglers``, ``dropped_clients``,
            ``malicious_clients``, ``bytes_up``, ``epsilon``); empty without
            :mod:`fl_lightning.systems` options.
        sampled: ``(client_id, num_samples)`` of every client sampled in the round (all ranks,
            before dropouts).
        stragglers: ids of sampled clients that ran only part of their local steps.
        dropped: ids of sampled clients that dropped out before training.
    """

    round: int
    lr: float
    client_ids: list[int]
    client_sizes: list[int]
    clients: list[ClientResult]
    global_before: Params
    aggregate: Params
    global_after: Params
    train_loss: Tensor
    skipped_clients: list[int] = field(default_factory=list)
    systems: dict[str, float] = field(default_factory=dict)
    sampled: list[tuple[int, int]] = field(default_factory=list)
    stragglers: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
