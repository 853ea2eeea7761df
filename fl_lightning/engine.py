"""The round plan types, and the client engines' names kept importable from here.

:class:`ClientPlan`, :class:`RoundPlan` and :data:`BatchTransform` are defined here; the
engines live in :mod:`fl_lightning.engines` (:mod:`~fl_lightning.engines.sequential`,
:mod:`~fl_lightning.engines.batched`, their shared :mod:`~fl_lightning.engines.base`) and are
re-exported so that ``from fl_lightning.engine import SequentialEngine, sgd_step`` keeps working.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

__all__ = [
    "ClientEngine",
    "ClientPlan",
    "RoundPlan",
    "SequentialEngine",
    "average_buffers",
    "batch_statistics_only",
    "running_stats_step",
    "sgd_step",
    "stack_losses",
    "tracked_batchnorms",
]


@dataclass
class ClientPlan:
    """One client's work in a round.

    Attributes:
        client_id: the client's id in the partition.
        num_samples: size of its training set (its aggregation weight).
        batches: one tensor of training-set indices per local step, in order.
        lrs: optional learning rate of every local step (one per batch), replacing the round's
            learning rate (and ``LocalContext.lr``) step by step, e.g. the per-epoch decay of
            LocalOnly's fine-tuning; :class:`SequentialEngine` only.
    """

    client_id: int
    num_samples: int
    batches: list[Tensor]
    lrs: list[float] | None = None


#: ``transform(x, round, client_id, step) -> x``: batch augmentation applied by the engine.
BatchTransform = Callable[[Tensor, int, int, int], Tensor]


@dataclass
class RoundPlan:
    """Which clients train in a round and which samples each sees at each local step.

    Attributes:
        round: index of the round.
        clients: the sampled clients' plans.
        transform: optional training-batch augmentation; the engine calls
            ``transform(x_all[idx], round, client_id, step)`` on every local batch (it must be a
            pure function of its arguments so that resumed runs stay exact).
        num_clients: size of the whole population (sampled or not); ``None`` when unknown.
        total_samples: training samples of the whole population; ``None`` when unknown.
            Server rules such as SCAFFOLD's and FedDyn's need these two.
    """

    round: int
    clients: list[ClientPlan]
    transform: BatchTransform | None = None
    num_clients: int | None = None
    total_samples: int | None = None


# The engines import the dataclasses above, so they are imported after them.
from fl_lightning.engines.base import ClientEngine, sgd_step  # noqa: E402
from fl_lightning.engines.sequential import (  # noqa: E402
    SequentialEngine,
    average_buffers,
    batch_statistics_only,
    running_stats_step,
    stack_losses,
    tracked_batchnorms,
)
