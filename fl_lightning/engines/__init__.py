"""Client engines (``--model.engine``): the sequential reference and the batched engine.

- :mod:`~fl_lightning.engines.base`: the :class:`ClientEngine` protocol, the one SGD update,
  the compile helper and the batch-transform protocols;
- :mod:`~fl_lightning.engines.sequential`: :class:`SequentialEngine` (any model) and the
  BatchNorm helpers;
- :mod:`~fl_lightning.engines.batched`: :class:`BatchedEngine` (every client at once with
  ``torch.vmap``), its step in :mod:`~fl_lightning.engines.vmapped` and its per-round data in
  :mod:`~fl_lightning.engines.stacked`.

Select one with ``--model.engine BatchedEngine`` (or the class path).
"""

from fl_lightning.engines.base import ClientEngine as ClientEngine
from fl_lightning.engines.batched import BatchedEngine, unbatchable_reason
from fl_lightning.engines.sequential import SequentialEngine

# ClientEngine stays out of __all__: the short names of --model.engine are the engines' own
__all__ = ["BatchedEngine", "SequentialEngine", "unbatchable_reason"]
