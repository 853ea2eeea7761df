"""fl-lightning over a real Flower federation (the ``flower`` extra: ``pip install -e
".[flower]"``).

- :mod:`fl_lightning.flower.server`: the ``ServerApp`` (sampling, participation, the
  algorithm's server rule, the module's server optimizer);
- :mod:`fl_lightning.flower.client`: the ``ClientApp`` (a SuperNode's own partition, the
  algorithm's local direction through the sequential engine, client state kept on the node);
- :mod:`fl_lightning.flower.records`: what travels in the Flower messages;
- :mod:`fl_lightning.flower.federation`: a local SuperLink + SuperNodes for one machine;
  ``python -m fl_lightning.flower`` runs the Flower app in ``flower_app/`` on it.

See ``docs/deployment.md``.
"""
