"""The round object (``fl_lightning.round``): its phases, run outside any trainer."""

from __future__ import annotations

import pytest
import torch

from fl_lightning.data.module import FederatedDataModule
from fl_lightning.engine import SequentialEngine
from fl_lightning.models.mlp import MLP2NN
from fl_lightning.module import FederatedModule
from fl_lightning.protocol import ClientResult, RoundPlan
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


def test_the_screen_skips_a_nonfinite_client_and_stops_when_all_are():
    module = _module(on_nonfinite="skip_client")
    fl_round: FederatedRound = module.build_round(optimizer=module.configure_optimizers())
    state = fl_round.plan(0)
    fl_round.train(state)
    bad = state.results[0]
    state.results[0] = ClientResult(bad.client_id, bad.num_samples,
                                    {k: v * float("nan") for k, v in bad.params.items()},
                                    bad.num_steps, bad.loss)
    fl_round.screen(state)
    assert state.skipped == [bad.client_id] and len(state.results) == 2
    fl_round.combine(state)
    assert all(torch.isfinite(v).all() for v in state.aggregate.values())
    state = fl_round.plan(1)
    fl_round.train(state)
    state.results = [ClientResult(r.client_id, r.num_samples, r.params, r.num_steps,
                                  torch.tensor(float("inf"))) for r in state.results]
    with pytest.raises(DivergenceError, match="every client diverged in round 2"):
        fl_round.screen(state)
