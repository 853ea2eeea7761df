"""Streamed aggregation (``fl_lightning.stream``): a round folds each client's result as it
finishes, holds O(1) results at a time, and ends where the round that holds every result ends.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from fl_lightning.algorithms import SCAFFOLD, FedAvg, FedDyn, FedNova
from fl_lightning.data.module import FederatedDataModule
from fl_lightning.engine import SequentialEngine
from fl_lightning.engines import BatchedEngine
from fl_lightning.models.mlp import MLP2NN
from fl_lightning.module import FederatedModule
from fl_lightning.protocol import ClientResult
from fl_lightning.stream import Released


class _Watch:
    """Wraps a round's sink: before each hand-over, counts the results handed over before that
    are still alive (a weak reference: no memory measurement), plus the new ones."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []
        self.peak = 0
        self.calls = 0

    def wrap(self, sink):
        def watched(results: list[ClientResult]) -> None:
            alive = sum(ref() is not None for ref in self.refs)
            self.peak = max(self.peak, alive + len(results))
            self.refs.extend(weakref.ref(r) for r in results)
            self.calls += 1
            sink(results)

        return watched


class _WatchedSequential(SequentialEngine):
    def __init__(self, watch: _Watch) -> None:
        self.watch = watch

    def run_round(self, *args, sink=None):
        return super().run_round(*args, sink=None if sink is None else self.watch.wrap(sink))


class _WatchedBatched(BatchedEngine):
    def __init__(self, watch: _Watch, **kwargs) -> None:
        super().__init__(**kwargs)
        self.watch = watch

    def run_round(self, *args, sink=None):
        return super().run_round(*args, sink=None if sink is None else self.watch.wrap(sink))


class _BNNet(nn.Module):
    """A tiny model with BatchNorm running statistics (the buffers the round averages)."""

    def __init__(self, num_classes: int = 10, input_shape: object = None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(),
                                  nn.Flatten())
        self.head = nn.Linear(2 * 6 * 6, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


ALGORITHMS = {
    "fedavg": FedAvg, "scaffold": SCAFFOLD, "feddyn": FedDyn,
    "fednova_ccvr": lambda: FedNova(ccvr=True),
}


def _mlp(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return MLP2NN(num_classes, input_shape, hidden=32)


def _module(algorithm, net=None, **kwargs) -> FederatedModule:
    torch.manual_seed(0)
    dm = FederatedDataModule(dataset="digits", num_clients=8, partition="lda", alpha=0.5)
    module = FederatedModule(
        algorithm=algorithm, num_classes=10, input_shape=(1, 8, 8), sample_ratio=0.5,
        local_epochs=1, batch_size=64, local_lr=0.05, net=net or _mlp, **kwargs,
    ).attach(dm)
    return module.double()


def _rounds(module: FederatedModule, engine, held: bool, rounds: int = 2):
    fl_round = module.build_round(engine=engine, optimizer=module.configure_optimizers())
    fl_round.context.needs_client_results = held  # a callback that reads every result
    assert fl_round.streams() is not held
    module.algorithm.init_server({k: p.detach() for k, p in module.net.named_parameters()})
    return [fl_round.run(r) for r in range(rounds)]


@pytest.mark.parametrize("name", ["fedavg", "scaffold"])
def test_a_streamed_round_holds_one_client_result_at_a_time(name):
    watch = _Watch()
    module = _module(ALGORITHMS[name]())
    results = _rounds(module, _WatchedSequential(watch), held=False)
    assert watch.calls == 8 and watch.peak == 1  # 4 clients per round, one alive at a time
    assert [len(r.client_ids) for r in results] == [4, 4]
    assert all(isinstance(c.params, Released) and c.state == {} for r in results
               for c in r.clients)
    with pytest.raises(RuntimeError, match="sets needs_client_results = True"):
        results[0].clients[0].params.items()


@pytest.mark.parametrize(("name", "bn"), [(name, False) for name in ALGORITHMS]
                         + [("scaffold", True)])
def test_streamed_rounds_equal_the_rounds_that_hold_every_result(name, bn):
    net = _BNNet if bn else None
    streamed = _module(ALGORITHMS[name](), net)
    held = _module(ALGORITHMS[name](), net)
    a = _rounds(streamed, SequentialEngine(), held=False)
    b = _rounds(held, SequentialEngine(), held=True)
    assert [r.client_ids for r in a] == [r.client_ids for r in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.train_loss, y.train_loss)
    for (k, p), q in zip(streamed.net.state_dict().items(), held.net.state_dict().values(),
                         strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-12), k
    sa, sb = streamed.algorithm.state_dict(), held.algorithm.state_dict()
    for entry in sa.get("server", {}):
        if sa["server"][entry] is not None:
            for k, v in sa["server"][entry].items():
                assert torch.allclose(v, sb["server"][entry][k], rtol=0, atol=1e-12), k


def _result(cid: int, n: int, params, **extras) -> ClientResult:
    return ClientResult(cid, n, params, num_steps=3, loss=torch.tensor(0.5), extras=extras)


def test_the_mean_is_the_size_weighted_sum_over_the_kept_clients_in_float64():
    torch.manual_seed(1)
    g = {"w": torch.randn(5, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    ws = [{k: v + torch.randn_like(v) for k, v in g.items()} for _ in range(3)]
    sizes = [7, 11, 4]
    algo = FedAvg()
    sums = algo.begin_sums(g)
    for cid, (n, w) in enumerate(zip(sizes, ws, strict=True)):
        algo.fold(sums, _result(cid, n, w))
    out = algo.finish(sums, g)
    for k in g:
        exact = sum(n * w[k] for n, w in zip(sizes, ws, strict=True)) / sum(sizes)
        assert torch.allclose(out[k], exact, rtol=0, atol=1e-14)
    listed = algo.aggregate(g, [_result(c, n, w) for c, (n, w) in
                                enumerate(zip(sizes, ws, strict=True))])
    assert all(torch.equal(out[k], listed[k]) for k in g)  # list and stream: the same code


def test_scaffold_sums_update_c_by_the_mean_delta():
    g = {"w": torch.zeros(3, dtype=torch.float64)}
    algo = SCAFFOLD()
    algo.init_server(g)
    deltas = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, -1.0])]
    sums = algo.begin_sums(g, num_clients=8)
    for cid, d in enumerate(deltas):
        algo.fold(sums, _result(cid, 5, {"w": d.double()}, delta_c={"w": d.double()}))
    out = algo.finish(sums, g)
    assert out["w"].tolist() == [2.0, 1.0, 1.0]
    assert algo.c["w"].tolist() == pytest.approx([(2 / 8) * 2.0, (2 / 8) * 1.0, (2 / 8) * 1.0])


def test_batched_engine_hands_its_results_to_the_sink():
    watch = _Watch()
    module = _module(FedAvg())
    results = _rounds(module, _WatchedBatched(watch), held=False)
    assert watch.calls == 2 and [len(r.client_ids) for r in results] == [4, 4]


@pytest.mark.parametrize(("name", "bn"), [("scaffold", False), ("fednova_ccvr", False),
                                          ("fedavg", True)])
def test_chunked_batched_rounds_equal_one_chunk_in_float64(name, bn):
    """Momentum 0.9 (the module's default), client state, BatchNorm (the grouped path)."""
    net = _BNNet if bn else None
    watch = _Watch()
    chunked, whole = _module(ALGORITHMS[name](), net), _module(ALGORITHMS[name](), net)
    engine = _WatchedBatched(watch, max_clients_per_chunk=3)
    a = _rounds(chunked, engine, held=False)
    b = _rounds(whole, BatchedEngine(memory_budget="1TiB"), held=False)
    assert watch.calls == 4 and watch.peak == 3 and engine.last_chunk_size == 3  # 3 + 1
    assert [r.client_ids for r in a] == [r.client_ids for r in b]
    for (k, p), q in zip(chunked.net.state_dict().items(), whole.net.state_dict().values(),
                         strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-12), k
    for cid in a[-1].client_ids if hasattr(chunked.algorithm, "clients") else []:
        sa = chunked.algorithm.clients.get(cid, dict)
        sb = whole.algorithm.clients.get(cid, dict)
        for entry in sa:
            for k, v in sa[entry].items():
                assert torch.allclose(v, sb[entry][k], rtol=0, atol=1e-12), (cid, entry, k)


def test_the_memory_budget_sets_the_chunk_size():
    module = _module(SCAFFOLD())
    engine = BatchedEngine(memory_budget="1B")  # below one client: one client at a time
    _rounds(module, engine, held=False, rounds=1)
    assert engine.last_chunk_size == 1
    fl_round = module.build_round(engine=engine)
    state = fl_round.plan(1)
    data = module.datamodule.train_tensors(module.device, module.dtype)
    per = engine.client_bytes(module.algorithm, module.net, state.global_before, state.plan,
                              data, 0.9)
    weights = sum(p.numel() * 8 for p in module.net.parameters())
    assert per > weights * 6  # weights, direction, new weights, momentum, c_i (x2)
    engine.memory_budget = 2 * per + 1
    assert engine.chunk_size(module.algorithm, module.net, state.global_before, state.plan,
                             data, 0.9) == 2
    with pytest.raises(Exception, match=r"memory_budget='2XB' is invalid: it must be a byte"):
        BatchedEngine(memory_budget="2XB")
