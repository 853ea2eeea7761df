"""Multi-process rounds: LPT client split, one all-reduce, the same weights as one process."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import ddp_cases
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, seed_everything

from fl_lightning.algorithms import FedAvg
from fl_lightning.algorithms.base import ClientResult
from fl_lightning.distributed import (
    allreduce_sums,
    local_plan,
    lpt_partition,
    merge_skeletons,
    owner_shares,
    pack_sums,
    unpack_sums,
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


def _resolved(value):
    """``value`` with every client-state reference to files (``{"store": ...}``) read into
    ``{"clients": {id: state}}``, the layout of a store in RAM."""
    from fl_lightning.algorithms.state import ClientStateStore

    if isinstance(value, dict) and isinstance(value.get("store"), dict):
        store = ClientStateStore()
        store.load_state_dict(value)
        return store.state_dict()
    if isinstance(value, dict):
        return {k: _resolved(v) for k, v in value.items()}
    return value


def _content(ckpt: Path) -> dict:
    """Weights, algorithm state (every client's store, read from its files) and systems state
    of a checkpoint."""
    state = torch.load(ckpt, weights_only=True)
    keys = ("state_dict", "fl_algorithm_state", "fl_systems_state", "optimizer_states")
    return _flat(_resolved({k: state[k] for k in keys if k in state}))


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
    residuals) of the checkpoints written under DDP, after every round; an exact resume under
    DDP from a checkpoint written under DDP on the sharded store, and that checkpoint resumed
    in one process (:func:`_check_shards`)."""
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
    _check_shards(tmp_path, out)
    gathered = [json.loads((out / f"gather_rank{r}.json").read_text()) for r in (0, 1)]
    # rank 0 sends 30 float32 values (2 x (10 weights + 1 loss + 4 extras)) and 12 float64
    # (2 x 6 state), rank 1 half of that; each all-gather pads to the longest rank
    assert gathered[0] == gathered[1] == {
        "tensor_bytes": 2 * (30 * 4 + 12 * 8), "payload_bytes": 45 * 4 + 18 * 8,
        "idle_tensor_bytes": 2 * (30 * 4 + 12 * 8),
    }


def _check_shards(tmp_path: Path, out: Path) -> None:
    """SCAFFOLD and FedDyn under DDP: reduced (nothing gathered, the expected all-reduce
    bytes), each rank's store holds only its own clients (``client_id % 2``), the checkpoint
    all of them (compared above) and, on disk, refers to both ranks' files; a DDP checkpoint
    resumes in one process."""
    seed_everything(0)
    numel = sum(p.numel() for p in FedAvgCNN(10, (1, 8, 8)).parameters())
    # float32: the weighted sum and one more sum (delta_c, move) of the model, then kept
    # clients, samples, loss, clients, diverged and the two sums' counts
    reduce_bytes = (2 * numel + 7) * 4
    for case in ("scaffold", "feddyn", ddp_cases.RESUME[0]):
        one = json.loads((tmp_path / "one" / "scaffold" / "shards_rank0.json").read_text())
        ranks = [json.loads((out / case / f"shards_rank{r}.json").read_text()) for r in (0, 1)]
        for rank, got in enumerate(ranks):
            assert got["world"] == 2 and got["costs"], case
            assert all(cost == [0, reduce_bytes] for cost in got["costs"]), (case, got["costs"])
            assert got["clients"] and all(c % 2 == rank for c in got["clients"]), (case, got)
        if case == "scaffold":  # together: the clients one process holds
            assert sorted(ranks[0]["clients"] + ranks[1]["clients"]) == one["clients"]
            assert one["costs"] == [[]] * 3
    ref = torch.load(ddp_cases.checkpoint(out / "scaffold", 3), weights_only=True)
    files = ref["fl_algorithm_state"]["clients"]["store"]["files"]
    assert sorted(Path(f).name for f in files) == ["algorithm.clients.bin",
                                                  "algorithm.clients.rank1.bin"]
    # the DDP round-2 checkpoint resumed in one process: round 3 of one process
    args = ddp_cases.resume_args(out)
    ddp_cases.fit(args, tmp_path / "one_from_ddp")
    resumed = _content(ddp_cases.checkpoint(tmp_path / "one_from_ddp", 3))
    assert _max_diff(resumed, _content(ddp_cases.checkpoint(tmp_path / "one" / "scaffold",
                                                            3))) < 1e-6


@pytest.fixture
def gloo_group(tmp_path):
    """A one-process gloo group (all_reduce is then the identity on the buffer)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def _results(gp, sizes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        ClientResult(c, n, {k: (v + torch.randn(v.shape, generator=gen)).to(dtype)
                            for k, v in gp.items()}, 4, torch.tensor(float(c)))
        for c, n in sizes
    ]


def test_allreduce_sums_matches_the_server_rule(gloo_group):
    """The reduced round's one collective (one process: the all-reduce is the identity)."""
    gen = torch.Generator().manual_seed(0)
    gp = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)}
    results = _results(gp, [(0, 10), (1, 30), (2, 7)])
    algo = FedAvg()
    sums = algo.begin_sums(gp)
    for r in results:
        algo.fold(sums, r)
    total, loss, diverged, clients, nbytes = allreduce_sums(sums, 3, 3.0, 2,
                                                            torch.device("cpu"))
    aggregate, expected = algo.finish(total, gp), FedAvg().aggregate(gp, results)
    for k in gp:
        assert torch.equal(aggregate[k], expected[k]) and aggregate[k].shape == gp[k].shape
    # 17 float32 sums + kept, samples, loss, clients, diverged, the "mean" count
    assert float(loss) == pytest.approx(1.0) and (diverged, clients, nbytes) == (2, 5, 23 * 4)
    empty, _, diverged, clients, _ = allreduce_sums(algo.begin_sums(gp), 0, 0.0, 3,
                                                    torch.device("cpu"))
    assert (empty.kept, diverged, clients) == (0, 3, 3)


@pytest.mark.parametrize("name", ["SCAFFOLD", "FedDyn", "FedNova"])
def test_reduced_sums_of_two_ranks_equal_one_process_in_float64(name):
    """Each "rank" folds its owned clients, the flat buffers are added (what the sum
    all-reduce does) and unpacked: the server rule's result equals one process's within
    1e-12 in float64 (the summation order differs), the server state too."""
    import fl_lightning.algorithms as algorithms

    gen = torch.Generator().manual_seed(1)
    gp = {"a": torch.randn(3, 4, generator=gen, dtype=torch.float64),
          "b": torch.randn(5, generator=gen, dtype=torch.float64)}
    results = _results(gp, [(3, 10), (8, 31), (4, 7), (5, 12), (6, 2)], torch.float64)
    for r in results:
        r.extras.update({"delta_c": {k: v * 0.1 for k, v in r.params.items()},
                         "move": {k: r.params[k] - gp[k] for k in gp}, "a": 2.5 + r.client_id})

    def run(parts):
        algo = getattr(algorithms, name)()
        local = []
        for part in parts:
            sums = algo.begin_sums(gp, num_clients=20, total_samples=400)
            for r in part:
                algo.fold(sums, r)
            local.append(sums)
        from fl_lightning.distributed import _skeleton  # noqa: PLC0415

        skeleton = merge_skeletons([_skeleton(s) for s in local])
        flats = [pack_sums(s, skeleton, {}, torch.device("cpu")) for s in local]
        summed = {dt: sum(f[dt] for f in flats) for dt in flats[0]}
        total, _ = unpack_sums(summed, skeleton, local[0])
        return algo.finish(total, gp), algo.state_dict()["server"]

    plan = RoundPlan(0, [ClientPlan(r.client_id, r.num_samples, []) for r in results])
    shares = owner_shares(plan, 2)
    assert shares == [[1, 2, 4], [0, 3]]  # clients 8, 4, 6 on rank 0; 3, 5 on rank 1
    one, one_server = run([results])
    two, two_server = run([[results[i] for i in s] for s in shares])
    assert max(float((one[k] - two[k]).abs().max()) for k in gp) < 1e-12
    assert _max_diff(_flat(one_server), _flat(two_server)) < 1e-12
    assert max(float((one[k] - gp[k]).abs().max()) for k in gp) > 0.1  # it moved


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


# ------------------------------------------------------------------------------ DDP faults
#: a DDP run on tiny synthetic data that goes on until a fault stops it (each round: 0.1 s)
FAULT_RUN = [
    "fit", "--data.dataset", "synthetic", "--data.partition", "natural",
    "--model.net", "LogisticRegression", "--trainer.max_steps", "2000",
    "--checkpoint_every_n_rounds", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", *ddp_cases.DDP,
]
#: case -> extra options; each fault is done once the run has written round=2.ckpt
FAULTS = {
    "sigkill_rank1": [],  # rank 1 is SIGKILLed: rank 0 says so in one line
    "sigterm_rank1": [],  # only rank 1 gets SIGTERM: both stop at the round boundary
    # rank 1 is stopped (SIGSTOP: rank 0 waits for it in a collective), rank 0 gets SIGTERM
    "stuck_sigterm_rank0": ["--ddp_stop_timeout", "2"],
}


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def _fault(case: str, launcher: subprocess.Popen) -> int:
    """Do the case's fault; returns rank 1's pid."""
    (rank1,) = _children(launcher.pid)
    if case == "sigkill_rank1":
        os.kill(rank1, signal.SIGKILL)
    elif case == "sigterm_rank1":
        os.kill(rank1, signal.SIGTERM)
    else:
        os.kill(rank1, signal.SIGSTOP)
        os.kill(launcher.pid, signal.SIGTERM)
    return rank1


def _round(ckpt: Path) -> int:
    return int(re.search(r"round=(\d+)", ckpt.name)[1])


def _newest(folder: Path) -> Path:
    return max(folder.glob("*.ckpt"), key=lambda p: (_round(p), p.stat().st_mtime))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_lost_or_signalled_rank_ends_the_ddp_run_with_one_line(tmp_path):
    """Three 2-process runs at once, each faulted after round 2: a rank SIGKILLed, SIGTERM on
    rank 1 only (Lightning's handler broadcast from rank 1 alone: both ranks hung), SIGTERM
    on rank 0 while rank 1 hangs (rank 0 stuck in a collective runs no signal handler). Every
    run ends, with one line, and leaves no process behind."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runs = {}
    for case, extra in FAULTS.items():
        (tmp_path / case).mkdir()
        log = open(tmp_path / case / "log.txt", "w")
        runs[case] = (subprocess.Popen(
            [sys.executable, "-m", "fl_lightning.cli", *FAULT_RUN, *extra], cwd=tmp_path / case,
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        ), log)
    ckpts = {case: tmp_path / case / "lightning_logs/fl/version_0/checkpoints" for case in runs}
    rank1: dict[str, int] = {}
    guard = time.monotonic() + 900  # a hang guard, not a speed limit
    try:
        while len(rank1) < len(runs) and time.monotonic() < guard:
            for case, (proc, _) in runs.items():
                if case in rank1:
                    continue
                assert proc.poll() is None, (tmp_path / case / "log.txt").read_text()[-3000:]
                if (ckpts[case] / "round=2.ckpt").is_file():
                    rank1[case] = _fault(case, proc)
            time.sleep(0.05)
        for proc, _ in runs.values():
            proc.wait(timeout=max(guard - time.monotonic(), 1))
    finally:
        for proc, log in runs.values():
            if proc.poll() is None:
                for pid in _children(proc.pid):
                    os.kill(pid, signal.SIGKILL)
                proc.kill()
            proc.wait()
            log.close()
    lines = {}
    for case, (proc, _) in runs.items():
        text = (tmp_path / case / "log.txt").read_text()
        said = [line for line in text.splitlines() if line.startswith("fl-lightning:")]
        assert len(said) == 1 and "Traceback" not in text, text[-3000:]
        lines[case] = (proc.returncode, said[0])
        assert not _alive(rank1[case]), case
    # SIGKILL: rank 0 names rank 1, its pid and the signal, and the newest checkpoint
    code, line = lines["sigkill_rank1"]
    newest = _newest(ckpts["sigkill_rank1"]).resolve()
    assert code == 1
    assert re.fullmatch(
        rf"fl-lightning: error: DDP rank 1 was lost \(pid {rank1['sigkill_rank1']}, killed by "
        rf"SIGKILL\) after round \d+; the run stopped; newest checkpoint {re.escape(str(newest))}"
        rf": resume with the same command plus --ckpt_path {re.escape(str(newest))}", line
    ), line
    # SIGTERM on rank 1 only: both ranks stop after the same round, with its checkpoint
    code, line = lines["sigterm_rank1"]
    match = re.fullmatch(r"fl-lightning: stopped by SIGTERM on rank 1 after round (\d+); "
                         r"checkpoint (\S+); resume with the same command plus --ckpt_path \S+",
                         line)
    assert code == 143 and match, line
    assert Path(match[2]).name == f"preempted-round={match[1]}.ckpt" and Path(match[2]).is_file()
    assert _round(_newest(ckpts["sigterm_rank1"])) == int(match[1])  # the round boundary
    # a rank stuck in a collective: stopped --ddp_stop_timeout after SIGTERM, children too
    code, line = lines["stuck_sigterm_rank0"]
    assert code == 143, line
    assert line.startswith("fl-lightning: error: SIGTERM: the run did not reach a round "
                           "boundary within --ddp_stop_timeout=2 s"), line
    assert "newest checkpoint" in line and "--ckpt_path" in line
    assert not list(ckpts["stuck_sigterm_rank0"].glob("preempted*"))


def _trainer(tmp_path, rank=0, world=2, rounds=4, checkpoints=True):
    from types import SimpleNamespace

    callbacks = [SimpleNamespace(dirpath=str(tmp_path))] if checkpoints else []
    return SimpleNamespace(global_rank=rank, world_size=world, global_step=rounds,
                           checkpoint_callbacks=callbacks)


def test_the_survivor_line_names_the_lost_rank_and_the_newest_checkpoint(tmp_path, monkeypatch):
    from fl_lightning import ddpfault

    for name, age in [("round=3.ckpt", 0), ("round=4.ckpt", 50), ("preempted-round=4.ckpt", 40),
                      ("round=10.ckpt.tmp", 0)]:
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1e9 - age, 1e9 - age))
    newest = str((tmp_path / "preempted-round=4.ckpt").resolve())  # round 4, the newer file
    assert ddpfault.newest_checkpoint(_trainer(tmp_path)) == newest
    hint = f"newest checkpoint {newest}: resume with the same command plus --ckpt_path {newest}"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child.kill()
    child.wait()
    watch = ddpfault._Watch(_trainer(tmp_path), 120, 30)
    watch.procs = [child]
    assert watch.lost_message("[pair.cc:545] Read error: Connection reset by peer") == (
        f"DDP rank 1 was lost (pid {child.pid}, killed by SIGKILL) after round 4; the run "
        f"stopped; {hint}")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    watch.procs = [live]  # hung, not dead: the collective timed out
    assert watch.lost_message("[unbound_buffer.cc:78] Timed out waiting 30000ms for recv") == (
        "DDP rank 1 did not answer a collective within --ddp_timeout=30 s (hung or "
        f"unreachable) after round 4; the run stopped; {hint}")
    watch.kill_children()
    assert live.returncode == -signal.SIGKILL
    # rank 1 of 2, its parent alive: the other rank; no checkpoint folder / no file yet
    other = ddpfault._Watch(_trainer(tmp_path / "none", rank=1, rounds=0), 120, 30)
    assert other.lost_message("Connection closed by peer", wait=0) == (
        "DDP rank 0 was lost after round 0; the run stopped; no checkpoint yet: rerun the same "
        "command")
    off = ddpfault._Watch(_trainer(tmp_path, rank=1, world=3, checkpoints=False), 120, 30)
    assert off.lost_message("Connection closed by peer", wait=0).startswith(
        "another DDP rank was lost after round 4; the run stopped; checkpointing is off")
    # rank 0 busy training when its child dies: its observer says it after LOST_GRACE
    ended = []
    monkeypatch.setattr(ddpfault, "LOST_GRACE", 0.1)
    monkeypatch.setattr(watch, "_end", lambda message, status: ended.append((message, status)))
    watch.observe([child])
    deadline = time.monotonic() + 60  # a hang guard
    while not ended and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ended == [(f"DDP rank 1 was lost (pid {child.pid}, killed by SIGKILL) after round "
                      f"4; the run stopped; {hint}", 1)]


def test_ddp_timeout_reaches_the_strategy_and_one_process_stops_as_before():
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from fl_lightning import ddpfault

    ddp = ddpfault.with_timeout("ddp", 7.5)
    assert isinstance(ddp, DDPStrategy) and ddp._timeout == timedelta(seconds=7.5)
    assert ddp._start_method == "popen"
    assert ddpfault.with_timeout("ddp_spawn", 3)._start_method == "spawn"
    assert ddpfault.with_timeout("auto", 3) == "auto" and ddpfault.with_timeout(ddp, 3) is ddp
    one = _trainer(Path("."), world=1)
    assert ddpfault.agreed_stop(one, False, False) is None
    assert ddpfault.agreed_stop(one, True, False) == ("SIGTERM", ())
    assert ddpfault.agreed_stop(one, True, True) == ("SIGINT", ())


class SigtermDuringValidation(Callback):
    """Test callback: SIGTERM to its own process while round ``at_round``'s evaluation runs."""

    def __init__(self, at_round: int = 2) -> None:
        self.at_round = at_round

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.global_step == self.at_round and batch_idx == 0 and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_an_evaluation_stops_at_its_end_with_a_checkpoint(tmp_path, monkeypatch,
                                                                         capsys):
    """One process, SIGTERM while the global model is evaluated after round 2: Lightning's loop
    ended the run with exit status 0, no checkpoint and no message (a preempted grid job was
    recorded as rc=0); now the evaluation finishes and the run stops after it with round 2's
    checkpoint (exit 143)."""
    from test_reliability import TINY

    from fl_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        main(["fit", *TINY, "--trainer.max_steps", "5", "--trainer.val_check_interval", "1",
              "--trainer.callbacks+=test_ddp.SigtermDuringValidation"])
    assert stop.value.code == 143
    assert "stopped by SIGTERM after round 2" in capsys.readouterr().err
    assert (tmp_path / "lightning_logs/fl/version_0/checkpoints/preempted-round=2.ckpt").is_file()
    assert signal.getsignal(signal.SIGTERM) is before


def test_sharded_stores_merge_and_redistribute_to_another_world_size(tmp_path):
    """Two ranks' stores (rank 0 on disk, rank 1 in RAM) merged as a checkpoint holds them;
    loaded by 3 ranks (each on disk), each keeps exactly the clients ``c % 3`` gives it, with
    the values the 2 ranks had; loaded in one process, all of them."""
    from fl_lightning.algorithms.state import ClientStateStore
    from fl_lightning.sharding import merge_store_states

    def state(c):
        return {"c_i": {"w": torch.full((2, 3), float(c)), "b": torch.arange(4.0) + c}}

    ranks = [ClientStateStore(), ClientStateStore()]
    ranks[0].spill_to(str(tmp_path / "a.bin"), 0)  # on disk from the first client
    for c in range(10):
        ranks[c % 2].put(c, state(c))
    parts = [s.state_dict() for s in ranks]
    assert "store" in parts[0] and "clients" in parts[1]
    merged = merge_store_states(parts)
    assert sorted(merged["clients"]) == [1, 3, 5, 7, 9] and len(merged["store"]["clients"]) == 5
    for world in (3, 1):
        for rank in range(world):
            store = ClientStateStore()
            store.spill_to(str(tmp_path / f"w{world}r{rank}.bin"), 0)
            store.load_state_dict(merged)
            store.shard(rank, world)
            assert store.client_ids() == [c for c in range(10) if c % world == rank]
            for c in store.client_ids():
                got = store.get(c, dict)
                assert all(torch.equal(got["c_i"][k], v) for k, v in state(c)["c_i"].items())
    # a RAM store (library use) drops the clients it does not own too
    ram = ClientStateStore()
    ram.load_state_dict(merged)
    ram.shard(1, 2)
    assert ram.client_ids() == [1, 3, 5, 7, 9] and torch.equal(ram.get(7, dict)["c_i"]["b"],
                                                               torch.arange(4.0) + 7)


def test_a_rank_that_writes_no_checkpoint_keeps_the_records_its_checkpoints_refer_to(tmp_path):
    """On a DDP rank > 0 the strategy's save/remove (which run on every rank; the checkpoint
    IO only on rank 0) pin and unpin the store's snapshot, even where the checkpoint file is
    not visible on this rank (another node): a record a kept checkpoint refers to is never
    overwritten, and is reused once that checkpoint is removed."""
    from types import SimpleNamespace

    from fl_lightning.algorithms.state import ClientStateStore
    from fl_lightning.statefiles import _pin_on_this_rank

    calls = []
    strategy = SimpleNamespace(
        save_checkpoint=lambda checkpoint, filepath, storage_options=None: calls.append(filepath),
        remove_checkpoint=lambda filepath: calls.append(("rm", filepath)))
    store = ClientStateStore()
    store.spill_to(str(tmp_path / "algorithm.clients.rank1.bin"), 0)
    _pin_on_this_rank(strategy, [store])

    def put(value):
        store.put(1, {"c_i": {"w": torch.full((3,), value)}})

    put(1.0)
    first = store.state_dict()
    strategy.save_checkpoint(first, str(tmp_path / "elsewhere" / "round=1.ckpt"))
    for value in (2.0, 3.0):
        put(value)
        strategy.save_checkpoint(store.state_dict(), str(tmp_path / f"round={value}.ckpt"))
    reader = ClientStateStore()
    reader.load_state_dict(first)
    assert reader.get(1, dict)["c_i"]["w"].tolist() == [1.0] * 3  # round 1's record intact
    assert store._file.where[1][1] == 2  # records 0, 1 pinned: the newest went to a third
    strategy.remove_checkpoint(str(tmp_path / "elsewhere" / "round=1.ckpt"))
    put(4.0)
    assert store._file.where[1][1] == 0 and len(calls) == 4  # record 0 freed, then reused
