"""The batched engine's compiled local step (``--model.engine.compile``): the whole step
(gather from the round plan, augmentation, direction, SGD update) is one graph, compiled in
the first round and reused by the later ones, and it computes what the eager engine does.

The tests count frames with ``torch._dynamo.testing.CompileCounter`` as the backend (it runs
the captured graph eagerly, so no inductor compilation is paid on this CPU)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from fl_lightning.algorithms import MOON, SCAFFOLD, PerFedAvg
from fl_lightning.algorithms.base import finish_round
from fl_lightning.data.augment import BatchAugment
from fl_lightning.data.module import FederatedDataModule
from fl_lightning.engines import BatchedEngine
from fl_lightning.errors import ConfigError
from fl_lightning.models import MLP2NN


def _rounds(engine, algorithm, rounds: int = 3, backend: CompileCounter | None = None):
    """``rounds`` rounds on digits (LDA: unequal clients, short last batches), with the data
    module's augmentation and a learning rate that changes every round."""
    dm = FederatedDataModule(dataset="digits", num_clients=12, partition="lda", alpha=0.5)
    dm.augmentation = BatchAugment(crop_padding=2, flip=True, cutout=4)
    dm.setup("fit")
    x, y = dm.train_tensors(dtype=torch.float64)
    torch.manual_seed(0)
    net = MLP2NN(10, tuple(x.shape[1:]), hidden=16).double()
    frames, steps = [], []
    for r in range(rounds):
        plan = dm.round_plan(r, 4, 1, 16)
        steps.append(sorted(len(c.batches) for c in plan.clients))
        gp = {k: p.detach().clone() for k, p in net.named_parameters()}
        results = engine.run_round(algorithm, net, gp, {}, plan, (x, y), 0.1 / (r + 1), 0.9,
                                   1e-3)
        new = finish_round(algorithm, gp, results, num_clients=plan.num_clients,
                           total_samples=plan.total_samples)
        with torch.no_grad():
            for k, p in net.named_parameters():
                p.copy_(new[k])
        frames.append(backend.frame_count if backend is not None else None)
    return net, frames, steps


def test_the_whole_local_step_compiles_once_without_graph_breaks():
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounter()
    engine = BatchedEngine(compile="default", compile_backend=backend)
    net, frames, steps = _rounds(engine, SCAFFOLD(), backend=backend)
    assert any(len(set(s)) > 1 for s in steps)  # ragged rounds
    assert backend.frame_count == 1 and frames == [1, 1, 1]  # no recompile in rounds 2 and 3
    assert not counters["graph_break"]  # (fullgraph=True would also have raised)
    ops = backend.op_count
    assert ops > 50  # gather, augmentation, vmapped direction and update in one graph
    eager, _, _ = _rounds(BatchedEngine(), SCAFFOLD())
    diff = max(float((a - b).abs().max()) for a, b in zip(net.parameters(), eager.parameters(),
                                                          strict=True))
    assert diff < 1e-12


@pytest.mark.parametrize("algorithm", [MOON, PerFedAvg], ids=["moon", "perfedavg"])
def test_moon_and_perfedavg_compile_once_while_the_lr_decays(algorithm):
    # MOON's previous models are the same initial model for every client in round 1 and
    # per-client rows later; Per-FedAvg reads ctx.lr, which decays (0.1 / (r + 1)): neither
    # may compile a second frame (dynamo's trace of the first round is most of the cost)
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounter()
    engine = BatchedEngine(compile="default", compile_backend=backend)
    _, frames, _ = _rounds(engine, algorithm(), backend=backend)
    assert frames == [1, 1, 1] and not counters["graph_break"]
    # (the eager batched Per-FedAvg with the tensor lr equals the sequential engine < 1e-12:
    # tests/test_engines.py)


@pytest.mark.parametrize("value", ["fast", 2, None])
def test_a_bad_compile_mode_is_one_clear_error(value):
    with pytest.raises(ConfigError, match=r"--model.engine.compile=.* 'none', 'default', "
                                          r"'reduce-overhead'"):
        BatchedEngine(compile=value)


def test_compile_modes_are_accepted():
    assert [BatchedEngine(compile=v).compile for v in (False, True, "reduce-overhead")] == [
        "none", "default", "reduce-overhead"]
