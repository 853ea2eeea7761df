"""Multi-process rounds: LPT client split, one all-reduce, the same weights as one process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import ddp_cases
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import seed_everything

from fl_lightning.algorithms import FedAvg
from fl_lightning.algorithms.base import ClientResult
from fl_lightning.distributed import (
    allreduce_average,
    local_plan,
    lpt_partition,
)
from fl_lightning.engine import ClientPlan, RoundPlan
from fl_lightning.models.cnn import FedAvgCNN

REPO = Path(__file__).resolve().parents[1]


def test_lpt_partition_balances_deterministically():
    costs = [12, 3, 7, 7, 5, 9, 1, 12]
    shares = lpt_partition(costs, 3)
    assert shares == lpt_partition(costs, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert loads == [19, 18, 19]  # 12 | 12 | 9, then 7->r2, 7->r0, 5->r1, 3->r2, 1->r1
    # ties by client index then by rank: equal costs go round-robin from rank 0
    assert lpt_partition([1, 1, 1, 1], 2) == [[0, 2], [1, 3]]
    assert lpt_partition([4], 3) == [[0], [], []]


def test_local_plans_cover_the_round_once():
    clients = [ClientPlan(c, 10, [torch.arange(2)] * steps) for c, steps in
               zip([5, 2, 9, 4], [3, 8, 2, 4], strict=True)]
    plan = RoundPlan(7, clients, num_clients=10, total_samples=100)
    parts = [local_plan(plan, r, 2) for r in range(2)]
    assert sorted(c.client_id for p in parts for c in p.clients) == [2, 4, 5, 9]
    assert [[c.client_id for c in p.clients] for p in parts] == [[2], [5, 9, 4]]
    assert all(p.round == 7 and p.num_clients == 10 for p in parts)
    assert local_plan(plan, 0, 1) is plan


def _flat(value, path: str = "") -> dict:
    """Nested checkpoint content as ``{path: leaf}``."""
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{path}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, sub in enumerate(value) for k, v in _flat(sub, f"{path}/{i}").items()}
    return {path: value}


def _content(ckpt: Path) -> dict:
    """Weights, algorithm state (every client's store) and systems state of a checkpoint."""
    state = torch.load(ckpt, weights_only=True)
    keys = ("state_dict", "fl_algorithm_state", "fl_systems_state", "optimizer_states")
    return _flat({k: state[k] for k in keys if k in state})


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    worst = 0.0
    for k, x in a.items():
        if isinstance(x, torch.Tensor):
            assert x.shape == b[k].shape and x.dtype == b[k].dtype, k
            if x.numel():
                worst = max(worst, float((x.double() - b[k].double()).abs().max()))
        else:
            assert x == b[k], (k, x, b[k])
    return worst


DDP_CASES = list(ddp_cases.CASES)


def test_two_gloo_processes_give_the_results_of_one(tmp_path, monkeypatch):
    """Every case of tests/ddp_cases.py, fitted in the same 2 gloo processes, against one
    process: weights, server state, every client's state and the systems state (e.g. top-k
    residuals) of the checkpoints written under DDP, after every round; and an exact resume
    under DDP from a checkpoint written under DDP."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "tests" / "ddp_cases.py"), str(out), *DDP_CASES,
           ddp_cases.RESUME[0]]
    # the one-process references are fitted here while the DDP processes run (they spend
    # much of their time importing and waiting on each other)
    log = tmp_path / "ddp.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            for case in DDP_CASES:
                ddp_cases.fit(ddp_cases.CASES[case], tmp_path / "one" / case)
        finally:
            try:  # a hang guard, not a speed limit: a run that hangs fails with its log
                proc.wait(timeout=1800)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail("the DDP cases hung:\n" + log.read_text()[-4000:])
    assert proc.returncode == 0, log.read_text()[-4000:]
    diffs = {}
    for case in DDP_CASES:
        rounds = 3 if "--trainer.max_steps" in ddp_cases.CASES[case] else 2
        for r in range(1, rounds + 1):
            one = _content(ddp_cases.checkpoint(tmp_path / "one" / case, r))
            two = _content(ddp_cases.checkpoint(out / case, r))
            diffs[case, r] = _max_diff(one, two)
        final = {k: v for k, v in one.items() if k.startswith("/state_dict/net.")}
    assert max(diffs.values()) < 1e-6, diffs
    # the runs trained (the last case's weights moved away from the initial network)
    seed_everything(0)  # the CLI's seed: the same initial network as the runs'
    init = FedAvgCNN(10, (1, 8, 8)).state_dict()
    moved = max(float((v - init[k.split("net.", 1)[1]]).abs().max()) for k, v in final.items())
    assert moved > 1e-3
    # resumed under DDP from round 2 (written under DDP) = the uninterrupted DDP run, exactly
    name, source, _, until = ddp_cases.RESUME
    resumed = _content(ddp_cases.checkpoint(out / name, until))
    assert _max_diff(resumed, _content(ddp_cases.checkpoint(out / source, until))) == 0.0
    # the stateless mean's clients never went through DDP's gradient all-reduce
    for rank in (0, 1):
        calls = json.loads((out / "fedsol" / f"comm_calls_rank{rank}.json").read_text())
        assert calls == {"calls": 0, "world": 2}
    # every analysis callback ran under DDP to the end of training (none hung on a collective
    # taken on rank zero only): its files written once, its numbers those of one process, and
    # the run's own outputs complete
    for where in (out, tmp_path / "one"):
        run = where / "analysis" / "lightning_logs" / "fl" / "version_0"
        for name in ddp_cases.ANALYSIS_FILES:
            assert (run / "analysis" / name).is_file(), (where, name)
        assert (run / "final_metrics.json").is_file() and (run / "heterogeneity.json").is_file()
        rows = list(csv.DictReader(open(run / "metrics.csv")))
        assert [int(float(r["round"])) for r in rows] == [1, 2] and rows[-1]["val_acc"], rows
    assert not (out / "analysis" / "lightning_logs" / "fl" / "version_1").exists()
    for name in ("divergence", "dispersion", "alignment", "knowledge", "hessian", "floor"):
        hist = [json.loads((w / "analysis" / "lightning_logs" / "fl" / "version_0" / "analysis"
                            / f"{name}.json").read_text())["history"] for w in (out,
                                                                             tmp_path / "one")]
        assert [sorted(r) for r in hist[0]] == [sorted(r) for r in hist[1]] and hist[0], name
        for a, b in zip(*hist, strict=True):
            for key in a:
                if key != "seconds":
                    assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (name, key)
    gathered = [json.loads((out / f"gather_rank{r}.json").read_text()) for r in (0, 1)]
    # rank 0 sends 30 float32 values (2 x (10 weights + 1 loss + 4 extras)) and 12 float64
    # (2 x 6 state), rank 1 half of that; each all-gather pads to the longest rank
    assert gathered[0] == gathered[1] == {
        "tensor_bytes": 2 * (30 * 4 + 12 * 8), "payload_bytes": 45 * 4 + 18 * 8,
        "idle_tensor_bytes": 2 * (30 * 4 + 12 * 8),
    }


@pytest.fixture
def gloo_group(tmp_path):
    """A one-process gloo group (all_reduce is then the identity on the buffer)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_flat_allreduce_average_matches_the_server_rule(gloo_group):
    gen = torch.Generator().manual_seed(0)
    gp = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)}
    results = [
        ClientResult(c, n, {k: v + torch.randn(v.shape, generator=gen) for k, v in gp.items()},
                     4, torch.tensor(float(c)))
        for c, n in [(0, 10), (1, 30), (2, 7)]
    ]
    aggregate, loss, diverged, clients = allreduce_average(gp, results, num_diverged=2)
    expected = FedAvg().aggregate(gp, results)
    for k in gp:
        torch.testing.assert_close(aggregate[k], expected[k], rtol=0, atol=1e-6)
        assert aggregate[k].shape == gp[k].shape
    assert float(loss) == pytest.approx(1.0) and (diverged, clients) == (2, 5)
    none, _, diverged, clients = allreduce_average(gp, [], num_diverged=3)
    assert none is None and (diverged, clients) == (3, 3)


def test_every_rank_takes_the_same_divergence_decision():
    from fl_lightning.round import DivergenceError, screen_nonfinite

    # this rank's clients are fine, another rank's client diverged: stop on every rank
    with pytest.raises(DivergenceError, match="of another rank produced non-finite"):
        screen_nonfinite([], 3, "raise", 0.01, num_bad=1, num_all=4)
    assert screen_nonfinite([], 3, "skip_client", 0.01, num_bad=1, num_all=4) == ([], [])
    with pytest.raises(DivergenceError, match="every client diverged"):
        screen_nonfinite([], 3, "skip_client", 0.01, num_bad=4, num_all=4)


def test_ddp_accepts_systems_mechanisms_at_setup():
    """Dropouts, attacks, DP... run under DDP (every rank gets every client's result)."""
    from lightning.pytorch import Trainer

    from fl_lightning.data.module import FederatedDataModule
    from fl_lightning.module import FederatedModule
    from fl_lightning.systems import CoordinateMedian, DPFedAvg, Participation

    dm = FederatedDataModule(dataset="digits", num_clients=4)
    module = FederatedModule(
        num_classes=dm.num_classes, input_shape=dm.input_shape,
        participation=Participation(dropout_ratio=0.25), privacy=DPFedAvg(),
        aggregator=CoordinateMedian(),
    ).attach(dm)
    module.trainer = Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False)
    module.setup("fit")
    assert module.round.needs_all_results()
