"""Deprecated: the round moved to :mod:`fl_lightning.round` (:class:`FederatedRound`).

``DivergenceError`` is re-exported from there; ``RoundLoop(module).run_round(r)`` still works
for one more release and runs ``module.round.run(r)``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from fl_lightning.protocol import RoundResult
from fl_lightning.round import DivergenceError

if TYPE_CHECKING:
    from fl_lightning.module import FederatedModule

__all__ = ["DivergenceError", "RoundLoop"]


class RoundLoop:
    """Deprecated alias: use ``module.round`` (a :class:`~fl_lightning.round.FederatedRound`).

    Args:
        module: the federated module whose round to run.
    """

    def __init__(self, module: FederatedModule) -> None:
        warnings.warn(
            "fl_lightning.loop.RoundLoop is deprecated: use module.round.run(round_idx) "
            "(fl_lightning.round.FederatedRound)", DeprecationWarning, stacklevel=2,
        )
        self.module = module

    def run_round(self, round_idx: int) -> RoundResult:
        """Run round ``round_idx`` of the module's :class:`~fl_lightning.round.FederatedRound`."""
        return self.module.round.run(round_idx)
