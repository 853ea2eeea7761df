"""The round object (``fl_lightning.round``): its phases, run outside any trainer."""

from __future__ import annotations

import pytest
import torch

from fl_lightning.data.module import FederatedDataModule
from fl_lightning.engine import SequentialEngine
from fl_lightning.models.mlp import MLP2NN
from fl_lightning.module import FederatedModule
from fl_lightning.protocol import RoundPlan
from fl_lightning.round import DivergenceError, FederatedRound
from fl_lightning.systems import Participation


class _LosingEngine(SequentialEngine):
    """The sequential engine, except that client ``lost`` never reports (a node gone)."""

    def __init__(self, lost: int) -> None:
        self.lost = lost

    def run_round(self, algorithm, net, global_params, buffers, plan: RoundPlan, *args):
        results = super().run_round(algorithm, net, global_params, buffers, plan, *args)
        return [r for r in results if r.client_id != self.lost]


class _Drops(Participation):
    """Planned dropouts of the given clients in every round, nothing else."""

    def __init__(self, dropped: list[int]) -> None:
        super().__init__()
        self.dropped = dropped

    def split(self, seed, round_idx, client_ids):
        return [c for c in client_ids if c in self.dropped], []


def _module(**kwargs) -> FederatedModule:
    torch.manual_seed(0)
    dm = FederatedDataModule(dataset="digits", num_clients=4, partition="lda", alpha=0.5)
    return FederatedModule(
        net=MLP2NN, num_classes=10, input_shape=(1, 8, 8), sample_ratio=0.75, local_epochs=1,
        batch_size=32, local_lr=0.05, **kwargs,
    ).attach(dm)


def test_a_client_the_engine_loses_is_a_dropout_like_a_planned_one():
    lossy = _module()
    lost = lossy.datamodule.sample_clients(0, 3)[1]
    seen = []
    fl_round = lossy.build_round(
        engine=_LosingEngine(lost), optimizer=lossy.configure_optimizers()
    )
    fl_round.context.on_round_end = seen.append
    result = fl_round.run(0)
    assert result.dropped == [lost] and lost not in result.client_ids
    assert len(result.client_ids) == 2 and seen == [result]
    planned = _module(participation=_Drops([lost]))
    other = planned.build_round(optimizer=planned.configure_optimizers()).run(0)
    assert other.dropped == [lost] and other.client_ids == result.client_ids
    for name, p in planned.net.named_parameters():  # the same round, bit for bit
        assert torch.equal(p, dict(lossy.net.named_parameters())[name]), name


class _Poisoning(SequentialEngine):
    """The sequential engine, except that the clients in ``bad`` report non-finite weights
    (``what="weights"``) or an infinite loss (``what="loss"``)."""

    def __init__(self, bad: set[int], what: str = "weights") -> None:
        self.bad, self.what = bad, what

    def _train_client(self, algorithm, ctx, client, *args):
        result = super()._train_client(algorithm, ctx, client, *args)
        if client.client_id in self.bad and self.what == "weights":
            result.params = {k: v * float("nan") for k, v in result.params.items()}
        elif client.client_id in self.bad:
            result.loss = torch.tensor(float("inf"))
        return result


class _ListPoisoning(_Poisoning):
    """The same engine without a ``sink``: it returns its list, which the round folds."""

    def run_round(self, *args):
        return super().run_round(*args)


@pytest.mark.parametrize("path", ["sink", "list engine", "held results"])
def test_the_screen_skips_a_nonfinite_client_and_stops_when_all_are(path):
    module = _module(on_nonfinite="skip_client")
    first = module.datamodule.sample_clients(0, 3)[0]
    engine = (_ListPoisoning if path == "list engine" else _Poisoning)({first})
    fl_round: FederatedRound = module.build_round(engine=engine,
                                                  optimizer=module.configure_optimizers())
    fl_round.context.needs_client_results = path == "held results"
    assert fl_round.streams() is (path != "held results")
    result = fl_round.run(0)
    assert result.skipped_clients == [first] and len(result.client_ids) == 2
    assert first not in result.client_ids and torch.isfinite(result.train_loss)
    assert all(torch.isfinite(v).all() for v in result.aggregate.values())
    engine.bad, engine.what = set(range(4)), "loss"
    with pytest.raises(DivergenceError, match="every client diverged in round 2"):
        fl_round.run(1)


def test_the_raise_policy_names_the_first_nonfinite_client():
    module = _module()
    second = module.datamodule.sample_clients(0, 3)[1]
    fl_round = module.build_round(engine=_Poisoning({second}),
                                  optimizer=module.configure_optimizers())
    with pytest.raises(DivergenceError, match=f"client {second} produced non-finite weights "
                                               "in round 1"):
        fl_round.run(0)
