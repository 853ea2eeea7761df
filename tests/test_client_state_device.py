"""Thousands of clients' SCAFFOLD state stay on the requested state device."""

from __future__ import annotations

import torch
from helpers import TinyNet, context

from fl_lightning.algorithms import SCAFFOLD
from fl_lightning.algorithms.base import ClientResult

NUM_CLIENTS = 2000


def test_scaffold_keeps_2000_clients_c_i_on_the_state_device():
    # The model computes on the CPU; the state device is "meta" (an explicit device that is not
    # the model's, and holds no memory), standing in for "cpu" beside a GPU model: every c_i
    # must end up there, while the server's c stays with the model.
    net = TinyNet()
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    algo = SCAFFOLD(state_device="meta")
    gen = torch.Generator().manual_seed(0)
    results = []
    for cid in range(NUM_CLIENTS):
        ctx = context(net, gp)
        ctx.client_id, ctx.num_clients, ctx.momentum = cid, NUM_CLIENTS, 0.0
        algo.client_begin(ctx)
        assert all(v.device.type == "cpu" for v in ctx.state["c_i"].values())
        local = {k: v - 0.01 * torch.randn(v.shape, generator=gen) for k, v in gp.items()}
        result = ClientResult(cid, 10, local, num_steps=5, loss=torch.zeros(()))
        algo.client_end(ctx, result)
        algo.commit_client(result)
        results.append(result)
    assert len(algo.clients) == NUM_CLIENTS
    stored = algo.state_dict()["clients"]["clients"]
    assert sorted(stored) == list(range(NUM_CLIENTS))
    assert {v.device.type for c in stored.values() for v in c["c_i"].values()} == {"meta"}
    assert {v.shape for v in stored[1999]["c_i"].values()} == {v.shape for v in gp.values()}
    algo.aggregate(gp, results, num_clients=NUM_CLIENTS)
    # c <- c + (|S|/N) mean(c_i+ - c_i) with c_i = c = 0: mean of (w_g - w_i) / (K lr)
    assert all(v.device.type == "cpu" for v in algo.c.values())
    expected = torch.stack([(gp["head.bias"] - r.params["head.bias"]) / (5 * 0.01)
                            for r in results]).mean(0)
    torch.testing.assert_close(algo.c["head.bias"], expected)


def test_state_device_unset_keeps_state_with_the_model():
    net = TinyNet().double()
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    algo = SCAFFOLD()
    ctx = context(net, gp)
    algo.client_begin(ctx)
    result = ClientResult(0, 10, {k: v + 1 for k, v in gp.items()}, 5, torch.zeros(()))
    algo.client_end(ctx, result)
    algo.commit_client(result)
    [state] = algo.state_dict()["clients"]["clients"].values()
    assert {(v.device.type, v.dtype) for v in state["c_i"].values()} == {("cpu", torch.float64)}
