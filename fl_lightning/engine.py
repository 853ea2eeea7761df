"""The client engines' names, and the round plan types, kept importable from here.

The plan types (:class:`ClientPlan`, :class:`RoundPlan`, :data:`BatchTransform`) live in
:mod:`fl_lightning.protocol`; the engines in :mod:`fl_lightning.engines`
(:mod:`~fl_lightning.engines.sequential`, :mod:`~fl_lightning.engines.batched`, their shared
:mod:`~fl_lightning.engines.base`). Both are re-exported so that
``from fl_lightning.engine import SequentialEngine, sgd_step, RoundPlan`` keeps working.
"""

from __future__ import annotations

from fl_lightning.engines.base import ClientEngine, sgd_step
from fl_lightning.engines.sequential import (
    SequentialEngine,
    average_buffers,
    batch_statistics_only,
    running_stats_step,
    stack_losses,
    tracked_batchnorms,
)
from fl_lightning.protocol import BatchTransform, ClientPlan, RoundPlan

__all__ = [
    "BatchTransform",
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
