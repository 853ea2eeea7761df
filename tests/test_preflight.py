"""The memory pre-flight (``fl_lightning.preflight``): one warning line before training when the
run will not fit; one error line when a round that holds every result cannot fit once."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fl_lightning.algorithms import SCAFFOLD, FedAvg
from fl_lightning.data.module import FederatedDataModule
from fl_lightning.engines import BatchedEngine
from fl_lightning.errors import ConfigError
from fl_lightning.memory import parse_bytes
from fl_lightning.module import FederatedModule
from fl_lightning.preflight import check, estimate, expected_visited
from fl_lightning.systems import Krum


def _round(algorithm, **kwargs):
    torch.manual_seed(0)
    dm = FederatedDataModule(dataset="digits", num_clients=40, partition="iid")
    module = FederatedModule(algorithm=algorithm, num_classes=10, input_shape=(1, 8, 8),
                             sample_ratio=0.25, local_epochs=1, batch_size=32,
                             **kwargs).attach(dm)
    return module.build_round(optimizer=module.configure_optimizers())


def _limit(nbytes: int):
    return lambda device: (nbytes, "a test limit")


def test_the_state_estimate_counts_expected_visited_clients():
    fl_round = _round(SCAFFOLD())
    model = sum(p.numel() * p.element_size() for p in fl_round.context.net.parameters())
    est = estimate(fl_round, rounds=3)
    assert est.held_by is None and est.round_bytes == 0  # a streamed round
    visited = 40 * (1 - 0.75 ** 3)  # 10 of 40 per round, 3 rounds
    assert est.total("cpu") == int(model * visited)
    assert expected_visited(40, 10, None) == 40.0
    # under DDP with reduced sums each rank holds its own clients' state (round.owns_state)
    fl_round.context = dataclasses.replace(fl_round.context, world_size=2)
    fl_round.owns_state = True
    sharded = estimate(fl_round, rounds=3)
    assert sharded.total("cpu") == int(model * visited / 2)
    assert "visited clients on this rank" in sharded.parts[0][1]
    fl_round.context.algorithm.clients.spill_to("unused.bin", 1000)  # past 1000 B: a file
    assert estimate(fl_round, rounds=3).total("cpu") == 1000


def test_a_run_that_will_not_fit_warns_in_one_line_naming_the_fix():
    fl_round = _round(SCAFFOLD())
    lines: list[str] = []
    check(fl_round, 3, available=_limit(10_000), warn=lines.append)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("fl-lightning: warning: this run may need ")
    assert "client state (1 x " in lines[0] and "a test limit" in lines[0]
    assert lines[0].endswith("--model.algorithm.state_device cpu")
    check(fl_round, 3, available=_limit(10**12), warn=lines.append)
    assert len(lines) == 1  # it fits: nothing said


def test_the_batched_chunk_is_counted_and_its_option_named():
    fl_round = _round(FedAvg(), engine=BatchedEngine(memory_budget="1GiB"))
    lines: list[str] = []
    est = check(fl_round, 3, available=_limit(1000), warn=lines.append)
    chunk = [b for _, what, b, _ in est.parts if "chunk" in what]
    assert chunk and 0 < chunk[0] <= parse_bytes("1GiB", "budget")
    assert lines and lines[0].endswith(
        "--model.engine.memory_budget or max_clients_per_chunk lower")


def test_a_round_that_holds_every_update_and_cannot_fit_stops_in_one_line():
    fl_round = _round(FedAvg(), aggregator=Krum(num_byzantine=1))
    est = estimate(fl_round, 3)
    assert est.held_by == "--model.aggregator=Krum needs every client's update"
    per = est.round_bytes // 10
    with pytest.raises(ConfigError) as err:
        check(fl_round, 3, available=_limit(4 * per + 1), warn=lambda line: None)
    message = str(err.value)
    assert "\n" not in message and "one round holds 10 results" in message
    assert "lower --model.sample_ratio so that at most 4 clients are sampled" in message
