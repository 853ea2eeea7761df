"""The batched engine runs the stateful algorithms, BatchNorm running statistics and dropout:
several rounds of both engines, with the round loop's commit and server rule in between, agree
in float64 (< 1e-12) for every algorithm with client state, extras or a Table 7 proximal
source."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TinyNet
from torch import nn

from fl_lightning.algorithms import (
    MOON,
    SCAFFOLD,
    FedAvg,
    FedDyn,
    FedNova,
    FedNTD,
    FedProx,
    FedSoL,
)
from fl_lightning.algorithms.base import finish_round
from fl_lightning.engine import ClientPlan, RoundPlan, SequentialEngine, average_buffers
from fl_lightning.engines import BatchedEngine
from fl_lightning.errors import ConfigError
from fl_lightning.models import MLP2NN

#: client sizes (unequal, with partial last batches at B = 10): 23, 50, 7, 31, 16, 12 samples
SIZES = (23, 50, 7, 31, 16, 12)
#: the clients sampled in each round: some come back, so their stored state is read again
ROUNDS = ([0, 1, 2, 3], [2, 4, 0], [5, 0, 2, 1])
N = 200


def _plan(round_idx: int, ids, epochs: int = 2, batch: int = 10) -> RoundPlan:
    clients = []
    for cid in ids:
        gen = torch.Generator().manual_seed(1000 * round_idx + cid)
        own = torch.randperm(N, generator=gen)[: SIZES[cid]]
        batches = []
        for _ in range(epochs):
            batches.extend(own[torch.randperm(len(own), generator=gen)].split(batch))
        clients.append(ClientPlan(cid, len(own), batches))
    return RoundPlan(round_idx, clients, num_clients=len(SIZES), total_samples=sum(SIZES))


def _run(engine, algorithm, net, x, y, rounds=ROUNDS, lr=0.05, momentum=0.9, wd=1e-3):
    """Rounds of ``engine`` with the round loop's server side (commit, aggregate, average the
    buffers); returns every round's client results and the final global weights."""
    net = copy.deepcopy(net)
    history = []
    for r, ids in enumerate(rounds):
        gp = {k: p.detach().clone() for k, p in net.named_parameters()}
        buffers = {k: b.detach() for k, b in net.named_buffers()}
        plan = _plan(r, ids)
        results = engine.run_round(algorithm, net, gp, buffers, plan, (x, y), lr, momentum, wd)
        new = finish_round(algorithm, gp, results, num_clients=plan.num_clients,
                           total_samples=plan.total_samples)
        with torch.no_grad():
            for k, p in net.named_parameters():
                p.copy_(new[k])
        average_buffers(net, results)
        history.append(results)
    return history, net


def _diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).detach().abs().max()) for k in a)


def _give_previous_models(algorithm, net) -> None:
    """Store a previous local model (the global one, moved) for every client of MOON.

    FedSoL with MOON as proximal source at a client's first round has ``z_prev = z_g``: the
    contrastive gradient is 0 up to rounding and FedSoL's normalization turns that rounding
    noise into its perturbation (as the fixed radius at step 0, DESIGN.md §6.5), so no two
    summation orders agree there. With a stored previous model the gradient is real."""
    gen = torch.Generator().manual_seed(3)
    for cid in range(len(SIZES)):
        prev = {k: p.detach() + 0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
                for k, p in net.named_parameters()}
        algorithm.proximal.clients.put(cid, {"prev": prev})


#: the variants the conformance kit does not run (its float64 engine check runs SCAFFOLD,
#: FedDyn, FedNova(ccvr), MOON, FedNTD, FedBABU, Per-FedAvg and FedSoL over SCAFFOLD:
#: tests/test_algorithm_contract.py)
STATEFUL = {
    "scaffold_paper_k": lambda: SCAFFOLD(momentum_corrected=False),
    "fednova": FedNova,
    "moon_global_first": lambda: MOON(mu=1.0, first_previous="global"),
    "fedsol_prox_fedprox": lambda: FedSoL(proximal=FedProx(mu=1.0)),
    "fedsol_prox_feddyn": lambda: FedSoL(proximal=FedDyn(alpha=0.1)),
    "fedsol_prox_moon": lambda: FedSoL(proximal=MOON(mu=1.0)),
    "fedsol_prox_fedntd": lambda: FedSoL(proximal=FedNTD()),
    "fedsol_prox_fednova": lambda: FedSoL(proximal=FedNova(ccvr=True)),
    "fedsol_head_prox_scaffold": lambda: FedSoL(proximal=SCAFFOLD(), perturb_body=False),
}


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    net = MLP2NN(4, (1, 6, 6), hidden=8).double()
    x = torch.randn(N, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (N,))
    return net, x, y


@pytest.mark.parametrize("name", list(STATEFUL))
def test_stateful_algorithms_batched_equal_sequential_over_rounds(name, problem):
    net, x, y = problem
    seq_algo, bat_algo = STATEFUL[name](), STATEFUL[name]()
    assert bat_algo.batchable
    if name == "fedsol_prox_moon":
        _give_previous_models(seq_algo, net)
        _give_previous_models(bat_algo, net)
    seq, seq_net = _run(SequentialEngine(), seq_algo, net, x, y)
    bat, bat_net = _run(BatchedEngine(), bat_algo, net, x, y)
    for rs, rb in zip(seq, bat, strict=True):
        assert [r.client_id for r in rs] == [r.client_id for r in rb]
        assert [r.num_steps for r in rs] == [r.num_steps for r in rb]
        for a, b in zip(rs, rb, strict=True):
            assert _diff(a.params, b.params) < 1e-12
            assert float(a.loss) == pytest.approx(float(b.loss), abs=1e-12)
            assert a.state.keys() == b.state.keys()
            for entry in a.state:
                assert _diff(a.state[entry], b.state[entry]) < 1e-12
            assert a.extras.keys() == b.extras.keys()
    final = dict(seq_net.named_parameters())
    assert _diff(final, dict(bat_net.named_parameters())) < 1e-12
    moved = _diff(final, dict(net.named_parameters()))
    assert moved > 1e-3  # three rounds really trained
    # the state of the clients that trained is stored by both, and equal
    seq_store = getattr(seq_algo.proximal if isinstance(seq_algo, FedSoL) and seq_algo.proximal
                        else seq_algo, "clients", None)
    bat_store = getattr(bat_algo.proximal if isinstance(bat_algo, FedSoL) and bat_algo.proximal
                        else bat_algo, "clients", None)
    if seq_algo.client_state:
        assert len(seq_store) == len(bat_store) == 6  # every client trained at least once
        for cid in range(6):
            a = seq_store.get(cid, dict)
            b = bat_store.get(cid, dict)
            for entry in a:
                assert _diff(a[entry], b[entry]) < 1e-12


def test_scaffold_state_changes_the_direction(problem):
    # without the stored control variates the third round would differ: the state matters
    net, x, y = problem
    with_state, _ = _run(BatchedEngine(), SCAFFOLD(), net, x, y)
    algo = SCAFFOLD()
    fresh, _ = _run(BatchedEngine(), algo, net, x, y, rounds=ROUNDS[:1])
    assert all(r.state["c_i"] for r in fresh[0])
    plain, _ = _run(BatchedEngine(), FedAvg(), net, x, y)
    assert _diff(with_state[2][0].params, plain[2][0].params) > 1e-6


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(),
                                  nn.Flatten())
        self.head = nn.Linear(2 * 4 * 4, 4)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("algorithm", [FedAvg, lambda: FedSoL(rho=2.0), SCAFFOLD])
def test_batchnorm_running_statistics_per_client_equal_in_both_engines(algorithm, problem):
    _, x, y = problem
    torch.manual_seed(1)
    net = _BNNet().double()
    seq, seq_net = _run(SequentialEngine(), algorithm(), net, x, y)
    bat, bat_net = _run(BatchedEngine(), algorithm(), net, x, y)
    for rs, rb in zip(seq, bat, strict=True):
        for a, b in zip(rs, rb, strict=True):
            assert _diff(a.params, b.params) < 1e-12
            assert _diff(a.buffers, b.buffers) < 1e-12
    # every client kept its own statistics: they differ between clients of a round
    first = seq[0]
    assert _diff(first[0].buffers, first[1].buffers) > 1e-6
    assert int(first[1].buffers["body.1.num_batches_tracked"]) == first[1].num_steps
    seq_b, bat_b = dict(seq_net.named_buffers()), dict(bat_net.named_buffers())
    assert _diff(seq_b, bat_b) < 1e-12
    assert float(seq_b["body.1.running_var"].sub(1).abs().max()) > 1e-3  # statistics moved


def test_running_statistics_are_those_of_a_plain_pytorch_loop():
    # one client, plain SGD: the engine's per-step update is what net(x) does in a loop
    torch.manual_seed(0)
    net = _BNNet().double()
    x = torch.randn(40, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (40,))
    batches = list(torch.arange(40).split(10))
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for b in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x[b]), y[b]).backward()
        opt.step()
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    buffers = {k: b.detach() for k, b in net.named_buffers()}
    plan = RoundPlan(0, [ClientPlan(0, 40, batches)])
    for engine in (SequentialEngine(), BatchedEngine()):
        [res] = engine.run_round(FedAvg(), net, gp, buffers, plan, (x, y), 0.1, 0.0, 0.0)
        assert _diff(res.params, dict(ref.named_parameters())) < 1e-12
        assert _diff(res.buffers, dict(ref.named_buffers())) < 1e-12
    # the global model's buffers were not touched by local training
    assert float(net.body[1].running_mean.abs().max()) == 0.0


class _DropNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.body.append(nn.Dropout(0.5))


def test_dropout_is_rejected_unless_per_client_randomness_is_asked_for():
    with pytest.raises(ConfigError) as err:
        BatchedEngine().check(FedAvg(), _DropNet())
    message = str(err.value)
    assert "dropout 'body.5'" in message and "--model.engine.randomness different" in message
    assert "\n" not in message
    BatchedEngine(randomness="different").check(FedAvg(), _DropNet())
    rule = "randomness='same' is invalid: it must be one of 'error', 'different'"
    with pytest.raises(ConfigError, match=rule):
        BatchedEngine(randomness="same")


def test_dropout_masks_are_drawn_per_client():
    torch.manual_seed(0)
    net = _DropNet().double()
    x = torch.randn(40, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (40,))
    batches = list(torch.arange(40).split(10))
    # two clients with the same data: only their dropout masks can tell them apart
    plan = RoundPlan(0, [ClientPlan(0, 40, batches), ClientPlan(1, 40, batches)])
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    engine = BatchedEngine(randomness="different")
    torch.manual_seed(5)
    a, b = engine.run_round(FedAvg(), net, gp, {}, plan, (x, y), 0.1, 0.0, 0.0)
    assert _diff(a.params, b.params) > 1e-4
    torch.manual_seed(5)  # the masks come from torch's generator: a fixed seed repeats them
    a2, _ = engine.run_round(FedAvg(), net, gp, {}, plan, (x, y), 0.1, 0.0, 0.0)
    assert _diff(a.params, a2.params) == 0.0
    # in evaluation mode dropout is the identity and the engines agree exactly
    net.eval()
    seq = SequentialEngine().run_round(FedAvg(), net, gp, {}, plan, (x, y), 0.1, 0.0, 0.0)
    bat = engine.run_round(FedAvg(), net, gp, {}, plan, (x, y), 0.1, 0.0, 0.0)
    assert _diff(seq[0].params, bat[0].params) < 1e-12


def test_stacked_store_rows_gather_scatter_and_checkpoint_format():
    from fl_lightning.algorithms.state import ClientStateStore

    store = ClientStateStore()
    for cid in range(20):
        store.put(cid, {"c_i": {"w": torch.full((3,), float(cid))}})
    assert store.stacked()["c_i"]["w"].shape == (32, 3)  # one tensor, grown 8 -> 16 -> 32 rows
    assert store.gather([5, 2, 19])["c_i"]["w"][:, 0].tolist() == [5.0, 2.0, 19.0]
    store.scatter([2, 30], {"c_i": {"w": torch.stack([torch.zeros(3), torch.ones(3)])}})
    assert store.get(2, dict)["c_i"]["w"].tolist() == [0.0, 0.0, 0.0]
    assert 30 in store and len(store) == 21
    saved = store.state_dict()
    assert saved["clients"][30]["c_i"]["w"].tolist() == [1.0, 1.0, 1.0]
    other = ClientStateStore()
    other.load_state_dict(saved)
    assert all(torch.equal(other.get(c, dict)["c_i"]["w"], store.get(c, dict)["c_i"]["w"])
               for c in saved["clients"])
    with pytest.raises(ValueError, match="same entries"):
        store.put(1, {"h_i": {"w": torch.zeros(3)}})
