"""Deprecated: the private names of :mod:`fl_lightning.callbacks.base` from earlier releases.

``_RoundCallback`` is :class:`~fl_lightning.callbacks.base.RoundCallback` and the ``_``-prefixed
helpers are its public batch helpers; import those instead.
"""

from __future__ import annotations

from fl_lightning.callbacks.base import Criterion, RoundCallback
from fl_lightning.callbacks.base import as_input as _as_input
from fl_lightning.callbacks.base import buffers_of as _buffers
from fl_lightning.callbacks.base import client_batches as _client_batches
from fl_lightning.callbacks.base import eval_batches as _eval_batches
from fl_lightning.callbacks.base import fixed_batches as _fixed_batches
from fl_lightning.callbacks.base import split_tensors as _split_tensors

#: deprecated alias of :class:`~fl_lightning.callbacks.base.RoundCallback`
_RoundCallback = RoundCallback

__all__ = [
    "Criterion",
    "_RoundCallback",
    "_as_input",
    "_buffers",
    "_client_batches",
    "_eval_batches",
    "_fixed_batches",
    "_split_tensors",
]
