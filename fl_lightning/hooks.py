"""The round-hook protocol through which callbacks read what a round produced.

Any Lightning ``Callback`` (or the ``FederatedModule`` itself) that defines

.. code-block:: python

    def on_round_end(self, trainer, module, result: RoundResult) -> None: ...

is called once per communication round, after the server update and before Lightning's
``on_train_batch_end`` (the publish phase of :class:`fl_lightning.round.FederatedRound`).
``result`` is only valid during the call: copy what you keep. A callback that measures every
client of a round sets ``needs_client_results = True``: under DDP every rank then receives every
client's result, not only its own share.

:class:`RoundResult` is defined in :mod:`fl_lightning.protocol` (re-exported here).
"""

from __future__ import annotations

from fl_lightning.protocol import RoundResult

__all__ = ["RoundResult"]
