"""Federated algorithms. Select one in a config by class path, e.g.
``--model.algorithm fl_lightning.algorithms.FedSoL --model.algorithm.rho 2.0``.

The contract every algorithm follows is :class:`Algorithm`'s docstring; algorithms with state
between rounds derive from :class:`StatefulAlgorithm`; FedSoL's perturbation sources implement
:class:`~fl_lightning.algorithms.base.ProximalTerm`; ``docs/extending.md`` writes a new one and
:func:`fl_lightning.testing.check_algorithm` checks it.
"""

from fl_lightning.algorithms.base import Algorithm, ClientResult, LocalContext
from fl_lightning.algorithms.fedavg import FedAvg
from fl_lightning.algorithms.fedbabu import FedBABU
from fl_lightning.algorithms.feddyn import FedDyn
from fl_lightning.algorithms.fednova import FedNova
from fl_lightning.algorithms.fedntd import FedNTD
from fl_lightning.algorithms.fedprox import FedProx
from fl_lightning.algorithms.fedsam import FedSAM
from fl_lightning.algorithms.fedsol import FedSoL
from fl_lightning.algorithms.moon import MOON
from fl_lightning.algorithms.perfedavg import PerFedAvg
from fl_lightning.algorithms.scaffold import SCAFFOLD
from fl_lightning.algorithms.state import StatefulAlgorithm

__all__ = [
    "MOON",
    "SCAFFOLD",
    "Algorithm",
    "ClientResult",
    "FedAvg",
    "FedBABU",
    "FedDyn",
    "FedNTD",
    "FedNova",
    "FedProx",
    "FedSAM",
    "FedSoL",
    "LocalContext",
    "PerFedAvg",
    "StatefulAlgorithm",
]
