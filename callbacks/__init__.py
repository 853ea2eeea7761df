"""Lightning callbacks for federated analyses (round-hook protocol: see fl_lightning.hooks).

This folder is installed and imported as ``fl_lightning.callbacks`` (``package-dir`` in
``pyproject.toml``), so it cannot collide with a ``callbacks`` module of your own project. The
old top-level name ``callbacks`` still works from a source checkout, with a
``DeprecationWarning``.

Add any of them to a run with ``--trainer.callbacks+=<Name>`` (e.g. ``+=HessianEigenvalues``,
or the full ``fl_lightning.callbacks.HessianEigenvalues``); the analysis callbacks
read what a round produced from the :class:`~fl_lightning.hooks.RoundResult` their
``on_round_end`` receives and log ``<prefix>/<quantity>`` at the step Lightning logs that
round's own metrics at (``round - 1``, the CSV's ``round`` column minus one). The formulas are
in each class's docstring; the kernels are pure functions in
:mod:`fl_lightning.callbacks.functional`
(docs/analysis.md).
"""

import sys as _sys

if __name__ == "callbacks":  # the deprecated top-level name: alias the real package
    import warnings as _warnings

    _warnings.warn(
        "the top-level package 'callbacks' is deprecated: import fl_lightning.callbacks "
        "(in configs: class_path: fl_lightning.callbacks.<Name>, or the short <Name>)",
        DeprecationWarning,
        stacklevel=2,
    )
    import fl_lightning.callbacks as _package

    for _name, _module in list(_sys.modules.items()):
        if _name.startswith("fl_lightning.callbacks."):
            _sys.modules["callbacks." + _name[len("fl_lightning.callbacks."):]] = _module
    _sys.modules["callbacks"] = _package
    globals().update({k: getattr(_package, k) for k in _package.__all__})
    __all__ = list(_package.__all__)
else:
    from fl_lightning.callbacks.alignment import GradientAlignment
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
        "WeightDivergence",
    ]
