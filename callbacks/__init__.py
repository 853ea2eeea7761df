"""Lightning callbacks for federated analyses (round-hook protocol: see fl_lightning.hooks).

This folder is installed and imported as ``fl_lightning.callbacks`` (see the comment in
``fl_lightning/__init__.py``), so it cannot collide with a ``callbacks`` module of your own
project. The old top-level name ``callbacks`` still works, with a ``DeprecationWarning``, for
one more release.

Write your own analysis by subclassing :class:`~fl_lightning.callbacks.base.RoundCallback`
(docs/analysis.md, "Writing your own analysis callback").

Add any of them to a run with ``--trainer.callbacks+=<Name>`` (e.g. ``+=HessianEigenvalues``,
or the full ``fl_lightning.callbacks.HessianEigenvalues``); the analysis callbacks
read what a round produced from the :class:`~fl_lightning.hooks.RoundResult` their
``on_round_end`` receives and log ``<prefix>/<quantity>`` at the step Lightning logs that
round's own metrics at (``round - 1``, the CSV's ``round`` column minus one). The formulas are
in each class's docstring; the kernels are pure functions in
:mod:`fl_lightning.callbacks.functional`
(docs/analysis.md).
"""

if __name__ == "callbacks":  # the old name imported before fl_lightning: its finder serves it
    import importlib as _importlib
    import sys as _sys

    del _sys.modules["callbacks"]
    import fl_lightning  # noqa: F401  (installs the finder)

    _sys.modules["callbacks"] = _importlib.import_module("callbacks")
else:
    from fl_lightning.callbacks.alignment import GradientAlignment
    from fl_lightning.callbacks.base import (
        RoundCallback,
        as_input,
        buffers_of,
        client_batches,
        eval_batches,
        fixed_batches,
        split_tensors,
    )
    from fl_lightning.callbacks.classwise import ClassWiseAccuracy
    from fl_lightning.callbacks.dispersion import ClientUpdateDispersion
    from fl_lightning.callbacks.divergence import WeightDivergence
    from fl_lightning.callbacks.floor import GlobalObjective, HeterogeneityFloor
    from fl_lightning.callbacks.hessian import HessianEigenvalues
    from fl_lightning.callbacks.heterogeneity import HeterogeneityReport
    from fl_lightning.callbacks.knowledge import KnowledgePreservation
    from fl_lightning.callbacks.landscape import LossLandscape
    from fl_lightning.callbacks.optima import ClientOptimaProbe
    from fl_lightning.callbacks.oscillation import GlobalOscillation

    __all__ = [
        "ClassWiseAccuracy",
        "ClientOptimaProbe",
        "ClientUpdateDispersion",
        "GlobalObjective",
        "GlobalOscillation",
        "GradientAlignment",
        "HessianEigenvalues",
        "HeterogeneityFloor",
        "HeterogeneityReport",
        "KnowledgePreservation",
        "LossLandscape",
        "RoundCallback",
        "WeightDivergence",
        "as_input",
        "buffers_of",
        "client_batches",
        "eval_batches",
        "fixed_batches",
        "split_tensors",
    ]
