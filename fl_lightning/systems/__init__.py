"""Systems heterogeneity, privacy and robustness mechanisms that compose with any algorithm.

Each is a small class wrapping a pure functional kernel, selected in configs by ``class_path``
under ``--model.participation``, ``--model.attack``, ``--model.compressor``,
``--model.privacy``, ``--model.secure_aggregation`` and ``--model.aggregator``.
"""

from fl_lightning.systems.attacks import Attack, GaussianUpdate, LabelFlip, Scaling, SignFlip
from fl_lightning.systems.compression import Compressor, StochasticQuantizer, TopK
from fl_lightning.systems.participation import Participation
from fl_lightning.systems.pipeline import RoundSystems, Systems
from fl_lightning.systems.privacy import DPFedAvg
from fl_lightning.systems.robust import (
    CoordinateMedian,
    Krum,
    NormBounding,
    RobustAggregator,
    TrimmedMean,
)
from fl_lightning.systems.secure_agg import SecureAggregation

__all__ = [
    "Attack",
    "Compressor",
    "CoordinateMedian",
    "DPFedAvg",
    "GaussianUpdate",
    "Krum",
    "LabelFlip",
    "NormBounding",
    "Participation",
    "RobustAggregator",
    "RoundSystems",
    "Scaling",
    "SecureAggregation",
    "SignFlip",
    "StochasticQuantizer",
    "Systems",
    "TopK",
    "TrimmedMean",
]
