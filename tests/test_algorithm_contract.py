"""The algorithm contract and its conformance kit: the project's algorithms pass
:func:`fl_lightning.testing.check_algorithm`, and each of its checks fails, naming its
property, on an algorithm that breaks that property."""

from __future__ import annotations

import pytest
import torch

from fl_lightning.algorithms import (
    MOON,
    SCAFFOLD,
    Algorithm,
    FedAvg,
    FedBABU,
    FedDyn,
    FedNova,
    FedNTD,
    FedProx,
    FedSAM,
    FedSoL,
    PerFedAvg,
    StatefulAlgorithm,
)
from fl_lightning.algorithms.base import ProximalTerm, proximal_sources
from fl_lightning.errors import ConfigError
from fl_lightning.testing import ConformanceError, check_algorithm

#: every algorithm of the project (stateful ones keep their store on the CPU, as
#: ``--model.algorithm.state_device cpu`` does), and FedSoL over a stateful source
PROJECT = {
    "fedavg": (FedAvg, {}),
    "fedprox": (FedProx, {"mu": 0.1}),
    "fedsam": (FedSAM, {"adaptive": True}),
    "fedntd": (FedNTD, {}),
    "fedbabu": (FedBABU, {}),
    "perfedavg": (PerFedAvg, {}),
    "scaffold": (SCAFFOLD, {"state_device": "cpu"}),
    "feddyn": (FedDyn, {"state_device": "cpu"}),
    "fednova_ccvr": (FedNova, {"ccvr": True, "state_device": "cpu"}),
    "moon": (MOON, {"state_device": "cpu"}),
    "fedsol": (FedSoL, {}),
    "fedsol_prox_scaffold": (FedSoL, {"proximal": SCAFFOLD()}),
}


@pytest.mark.parametrize("name", list(PROJECT))
def test_the_project_algorithms_pass_the_conformance_kit(name):
    cls, args = PROJECT[name]
    report = check_algorithm(cls, args)
    assert report["declarations"] == "ok"
    assert report["engines"] < 1e-12
    assert report["resume"] == 0.0 and report["skipped_client"] == 0.0
    assert report["proximal"] == ("ok" if isinstance(cls(**args), ProximalTerm)
                                  else "not a ProximalTerm")


class _ForgetsServerState(SCAFFOLD):
    """Saves its client store but not its server state ``c``."""

    def state_dict(self):
        return {"clients": self.clients.state_dict()}


class _CountsClients(StatefulAlgorithm):
    """FedAvg that counts the clients it trained in client_end: a skipped one leaves a trace."""

    name = "counts"
    server_state = ("seen",)

    def init_server(self, global_params):
        if self.seen is None:
            self.seen = {"n": torch.zeros(())}

    def direction(self, params, x, y, ctx):
        return self.task_grad(params, x, y, ctx)

    def client_end(self, ctx, result):
        self.seen["n"] += 1


class _MeanOverPadding(FedAvg):
    """Its loss averages over the whole batch, the batched engine's padding samples included."""

    def task_loss(self, ctx, params, x, y):
        return (ctx.forward(params, x) ** 2).mean()


@pytest.mark.parametrize("cls,check", [
    (_ForgetsServerState, "resume"),
    (_CountsClients, "skipped_client"),
    (_MeanOverPadding, "engines"),
])
def test_each_check_names_the_property_that_broke(cls, check):
    with pytest.raises(ConformanceError, match=rf"check_algorithm\({cls.__name__}\): {check}"):
        check_algorithm(cls)


def test_algorithm_is_abstract_and_fedavg_is_a_subclass():
    with pytest.raises(TypeError, match="abstract"):
        Algorithm()
    assert issubclass(FedAvg, Algorithm) and FedAvg is not Algorithm
    assert issubclass(FedBABU, FedAvg)


def test_server_rule_is_checked_when_the_class_is_defined():
    with pytest.raises(ConfigError, match=r"Median\.server_rule='median' is invalid") as err:
        class Median(FedAvg):
            server_rule = "median"
    assert "\n" not in str(err.value)


def test_fast_paths_are_declared_and_reset_by_an_override():
    assert FedAvg.plain_gradient and FedBABU.plain_gradient
    assert not FedSoL.plain_gradient and not SCAFFOLD.plain_gradient
    assert all(c.cross_entropy_task for c in (FedAvg, FedSoL, SCAFFOLD))
    assert not _MeanOverPadding.cross_entropy_task  # overrides task_loss, keeps the gradient
    assert _MeanOverPadding.plain_gradient

    class Declared(FedAvg):
        plain_gradient = True

        def direction(self, params, x, y, ctx):
            return super().direction(params, x, y, ctx)

    assert Declared.plain_gradient


def test_proximal_sources_are_derived_from_the_registered_classes():
    assert proximal_sources() == ["FedDyn", "FedNTD", "FedNova", "FedProx", "FedSoL", "MOON",
                                  "SCAFFOLD"]
    with pytest.raises(ConfigError, match="proximal='FedBABU' is invalid: .*one of FedDyn, "
                       "FedNTD, FedNova, FedProx"):
        FedSoL(proximal=FedBABU())


def test_state_dict_separates_server_and_clients_and_loads_the_old_layout():
    gp = {"w": torch.ones(3)}
    algo = SCAFFOLD()
    algo.init_server(gp)
    algo.clients.put(4, {"c_i": {"w": torch.full((3,), 2.0)}})
    algo.c["w"] += 1
    state = algo.state_dict()
    assert sorted(state) == ["clients", "server"] and sorted(state["server"]) == ["c"]
    assert algo.server_state_dict() == {"c": algo.c}
    # a checkpoint written before: server entries beside "clients"
    old = {"c": {"w": torch.full((3,), 1.0)}, "clients": state["clients"]}
    loaded = SCAFFOLD()
    loaded.load_state_dict(old)
    loaded.init_server(gp)  # after a resume: keeps the loaded c
    assert loaded.c["w"].tolist() == [1.0, 1.0, 1.0]
    assert loaded.clients.get(4, dict)["c_i"]["w"].tolist() == [2.0, 2.0, 2.0]
