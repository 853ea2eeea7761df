"""fl-lightning over a real Flower federation (the ``flower`` extra: ``pip install -e
".[flower]"``).

- :mod:`fl_lightning.flower.server`: the ``ServerApp``: the round of ``fl-lightning fit``
  (:class:`~fl_lightning.round.FederatedRound`: sampling, participation, the non-finite
  policy, the algorithm's server rule, the module's server optimizer) with the federation as
  its client engine;
- :mod:`fl_lightning.flower.engine`: :class:`FlowerEngine` (sends a round's messages, returns
  the clients' results; lost nodes are dropouts) and :class:`NodePopulation`;
- :mod:`fl_lightning.flower.client`: the ``ClientApp`` (a SuperNode's own partition, the
  algorithm's local direction through the sequential engine, client state kept on the node);
- :mod:`fl_lightning.flower.records`: what travels in the Flower messages;
- :mod:`fl_lightning.flower.federation`: a local SuperLink + SuperNodes for one machine;
  ``python -m fl_lightning.flower`` runs the Flower app in ``flower_app/`` on it.

See ``docs/deployment.md``.
"""

__all__ = ["FlowerEngine", "NodePopulation"]


def __getattr__(name: str):
    # imported on first use: a ClientApp process imports this package without PyTorch
    if name in __all__:
        from fl_lightning.flower import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'fl_lightning.flower' has no attribute {name!r}")
