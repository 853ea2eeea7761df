"""Client engines beyond the sequential reference (:mod:`fl_lightning.engine`).

Select one with ``--model.engine fl_lightning.engines.BatchedEngine``.
"""

from fl_lightning.engines.batched import BatchedEngine, unbatchable_reason

__all__ = ["BatchedEngine", "unbatchable_reason"]
