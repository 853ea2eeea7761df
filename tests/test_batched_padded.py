"""Static shapes in the batched engine: ragged rounds (unequal step counts, short last batches)
run as one vmapped call per local step on padded, masked batches."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyNet
from test_engines import _plan

from fl_lightning.algorithms import MOON, SCAFFOLD, FedSAM, FedSoL, PerFedAvg
from fl_lightning.algorithms.base import IGNORE_INDEX, batch_mean, cross_entropy
from fl_lightning.algorithms.perfedavg import _real_halves
from fl_lightning.engine import ClientPlan, RoundPlan
from fl_lightning.engines import BatchedEngine, SequentialEngine
from fl_lightning.engines.base import sgd_update
from fl_lightning.engines.batched import PaddedRound
from fl_lightning.models import MLP2NN


def _data(n: int = 200):
    torch.manual_seed(0)
    return torch.randn(n, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (n,))


def _round(engine, algorithm, net, plan, x, y):
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    return engine.run_round(algorithm, net, gp, {}, plan, (x, y), 0.05, 0.9, 1e-3)


def test_the_round_plan_is_padded_once_with_masks():
    plan = _plan()  # 6, 10, 2 and 8 steps; last batches of 3, 7 and 1 samples
    y = torch.arange(200)
    padded = PaddedRound.build(plan, y, torch.device("cpu"))
    assert padded.index.shape == (10, 4, 10) and padded.labels.shape == (10, 4, 10)
    assert padded.active.sum(0).tolist() == [6, 10, 2, 8]
    assert padded.everyone == [True, True] + [False] * 8
    # client 2 (7 samples): step 0 has 7 real samples, then 3 padding samples
    real = padded.labels[0, 2] != IGNORE_INDEX
    assert real.tolist() == [True] * 7 + [False] * 3
    assert torch.equal(padded.labels[0, 2, :7], plan.clients[2].batches[0])
    assert (padded.labels[2:, 2] == IGNORE_INDEX).all()  # its steps 2..9 are all padding


def test_a_ragged_round_is_one_vmapped_call_per_step_and_its_tail_plain_steps():
    calls = []

    class Counting(FedSAM):
        def direction(self, params, x, y, ctx):
            calls.append(tuple(x.shape))
            return super().direction(params, x, y, ctx)

    x, y = _data()
    net = TinyNet(4).double()
    full = _round(BatchedEngine(tail_rows=0), Counting(rho=0.1), net, _plan(), x, y)
    assert len(calls) == 10  # the longest client's 10 steps, one call each (not per group)
    # tail_rows=2: the lock-step stops once 2 clients are left (step 6: the 6, 10, 2 and 8
    # steps' clients 1 and 3), whose steps 6.. are plain steps on their own batches
    calls.clear()
    tails = _round(BatchedEngine(tail_rows=2), Counting(rho=0.1), net, _plan(), x, y)
    assert len(calls) == 6 + 4 + 2  # 6 vmapped calls, then 4 + 2 plain steps
    # tail_rows >= every client: the sequential engine's plain steps, bit for bit
    seq = SequentialEngine().run_round(Counting(rho=0.1), net, {
        k: p.detach().clone() for k, p in net.named_parameters()}, {}, _plan(), (x, y), 0.05,
        0.9, 1e-3)
    plain = _round(BatchedEngine(tail_rows=4), Counting(rho=0.1), net, _plan(), x, y)
    assert all(torch.equal(a.params[k], b.params[k]) for a, b in zip(seq, plain, strict=True)
               for k in a.params)
    for a, b in zip(full, tails, strict=True):
        for k in a.params:
            torch.testing.assert_close(a.params[k], b.params[k], rtol=0, atol=1e-12)
        torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "make", [lambda: FedSAM(rho=0.1), lambda: FedSoL(rho=2.0), lambda: MOON(mu=1.0),
             lambda: PerFedAvg(beta=0.05), lambda: FedSoL(proximal=SCAFFOLD())],
    ids=["fedsam", "fedsol", "moon", "perfedavg", "fedsol_scaffold"],
)
def test_padding_samples_change_nothing_bit_for_bit(make):
    # No client uses sample 0, which fills the padding; making it huge and giving it another
    # label changes no weight, loss or state by a single bit: losses, perturbation norms and
    # gradients see only the real samples.
    x, y = _data()
    plan = _plan()
    for c in plan.clients:
        c.batches = [b + (b == 0).long() * 199 for b in c.batches]  # 0 -> 199
    net = MLP2NN(4, (1, 6, 6), hidden=8).double()
    first = _round(BatchedEngine(), make(), net, plan, x, y)
    x2, y2 = x.clone(), y.clone()
    x2[0], y2[0] = 1e3, (y[0] + 1) % 4
    second = _round(BatchedEngine(), make(), net, plan, x2, y2)
    for a, b in zip(first, second, strict=True):
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
        assert torch.equal(a.loss, b.loss)
        for entry, tensors in a.state.items():
            assert all(torch.equal(v, b.state[entry][k]) for k, v in tensors.items())


def test_a_finished_client_is_untouched_by_the_steps_of_the_others():
    # Client 0 has 2 steps; client 1 has 10, on other samples in the second round. Client 0's
    # result is the same bit for bit: its masked steps leave its weights and momentum alone.
    x, y = _data()
    short = ClientPlan(0, 7, list(torch.arange(7).split(5)) * 1)
    long_a = ClientPlan(1, 50, list(torch.arange(100, 150).split(5)))
    long_b = ClientPlan(1, 50, list(torch.arange(150, 200).split(5)))
    net = TinyNet(4).double()
    a = _round(BatchedEngine(), SCAFFOLD(), net, RoundPlan(0, [short, long_a], None, 2, 57), x, y)
    b = _round(BatchedEngine(), SCAFFOLD(), net, RoundPlan(0, [short, long_b], None, 2, 57), x, y)
    assert a[0].num_steps == 2 and a[1].num_steps == 10
    assert all(torch.equal(a[0].params[k], b[0].params[k]) for k in a[0].params)
    assert all(torch.equal(v, b[0].state["c_i"][k]) for k, v in a[0].state["c_i"].items())
    assert max(float((a[1].params[k] - b[1].params[k]).abs().max()) for k in a[1].params) > 0


def test_masked_sgd_keeps_inactive_rows_bit_for_bit():
    torch.manual_seed(0)
    w = [torch.randn(3, 4, 2), torch.randn(3, 5)]
    g = [torch.randn_like(t) for t in w]
    b = [torch.randn_like(t) for t in w]
    active = torch.tensor([True, False, True])
    new_w, new_b = sgd_update(w, g, b, torch.tensor(0.1), 0.9, 1e-2, active)
    for n, o, nb, ob in zip(new_w, w, new_b, b, strict=True):
        assert torch.equal(n[1], o[1]) and torch.equal(nb[1], ob[1])
        assert not torch.equal(n[0], o[0]) and not torch.equal(nb[2], ob[2])
    full_w, full_b = sgd_update(w, g, b, torch.tensor(0.1), 0.9, 1e-2, None)
    assert torch.equal(full_w[0][[0, 2]], new_w[0][[0, 2]])


def test_masked_means_average_over_the_real_samples_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, dtype=torch.float64)
    y = torch.tensor([[0, 2, 1, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX] * 5])
    ce = torch.vmap(cross_entropy)(logits, y)
    expected = torch.nn.functional.cross_entropy(logits[0, :3], y[0, :3])
    assert float(ce[0]) == pytest.approx(float(expected), abs=1e-15)
    assert float(ce[1]) == 0.0  # a client without a step this time: 0, not NaN
    means = torch.vmap(batch_mean)(torch.ones(2, 5, dtype=torch.float64), y)
    assert means.tolist() == [1.0, 0.0]


def test_per_fedavg_splits_the_real_samples_of_a_padded_batch():
    y = torch.tensor([3, 1, 2, 0, 1, IGNORE_INDEX, IGNORE_INDEX])
    first, second = _real_halves(y)
    assert first.tolist() == [3, 1] + [IGNORE_INDEX] * 5
    assert second.tolist() == [IGNORE_INDEX] * 2 + [2, 0, 1] + [IGNORE_INDEX] * 2
    one = torch.tensor([2, IGNORE_INDEX, IGNORE_INDEX])
    assert [t.tolist() for t in _real_halves(one)] == [[2, IGNORE_INDEX, IGNORE_INDEX]] * 2
