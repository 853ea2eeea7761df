"""A real Flower federation on 127.0.0.1 (SuperLink + 3 SuperNodes, separate processes) gives
the same global weights as fl-lightning's own simulation, and survives a killed SuperNode.

Skipped unless the ``flower`` extra is installed. Every process is started and stopped here;
the timeouts only bound a hung run, they never decide a result. The node is killed at a point
the runs signal in their progress files (the last run has finished its first round); where
the earlier runs are at that moment depends on the machine's speed, so each run's own record
of its drops is replayed in the simulation, and what is asserted about them holds for any
timing.

Every process, this one included, computes with one PyTorch thread: CPU kernels split their
reductions by thread, and FedSoL's normalized perturbation turns the last-bit differences of
another thread count into visible ones within two rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402

from fl_lightning.cli import FederatedCLI  # noqa: E402
from fl_lightning.data.plans import sample_clients  # noqa: E402
from fl_lightning.flower.federation import LocalFederation, TLSFiles  # noqa: E402
from fl_lightning.flower.processes import tagged  # noqa: E402
from fl_lightning.flower.tls import make_ca, make_node_keys  # noqa: E402
from fl_lightning.systems.participation import Participation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "flower_app"
CONFIG = APP / "fedsol_digits.yaml"
ALGORITHMS = {
    "fedavg": "--model.algorithm fl_lightning.algorithms.FedAvg",
    "fedsol": "",  # the app's config: FedSoL, adaptive radius
    "scaffold": "--model.algorithm fl_lightning.algorithms.SCAFFOLD",
}
ROUNDS = 2
# rounds of each Flower run: SCAFFOLD's two carry the kill (round 1 without the victim, on the
# control variates the nodes kept); one each for FedAvg and FedSoL, whose bit-for-bit check
# already fails on a last-bit difference (every train message costs a process start, ~8 s CPU;
# two rounds of the whole protocol run over memory in the test above)
RUN_ROUNDS = {"fedavg": 1, "fedsol": 1, "scaffold": ROUNDS}
THREADS = 1  # the federation's and the simulation's PyTorch threads
NUM_CLIENTS, PER_ROUND, SEED = 3, 2, 0  # fedsol_digits.yaml: 3 clients, 2 sampled, seed 0
RUN_LIMIT_S = 900  # bounds a hung run only


class _RecordedDrops(Participation):
    """The dropouts a Flower run recorded, replayed in the simulation on top of the run's own
    participation policy (its planned dropouts and stragglers)."""

    def __init__(self, dropped: dict[int, list[int]], policy: Participation | None) -> None:
        super().__init__(straggler_work=policy.straggler_work if policy else 0.5)
        self.dropped, self.policy = dropped, policy

    def split(self, seed, round_idx, client_ids):
        planned, slow = self.policy.split(seed, round_idx, client_ids) if self.policy else ([], [])
        lost = [c for c in client_ids if c in self.dropped.get(round_idx, [])]
        return planned + [c for c in lost if c not in planned], [c for c in slow if c not in lost]


def _simulate(root: Path, args: str, rounds: int, dropped=None) -> dict[str, torch.Tensor]:
    argv = ["--config", str(CONFIG), *args.split(), "--trainer.max_steps", str(rounds),
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root)]
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        cli = FederatedCLI(args=argv, run=False)
        if dropped:
            systems = cli.model.systems
            systems.participation = _RecordedDrops(dropped, systems.participation)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        torch.set_num_threads(before)
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def _final(save_dir: Path) -> dict[str, torch.Tensor]:
    assert (save_dir / "summary.json").is_file(), f"the run wrote no summary in {save_dir}"
    return {f"net.{k}": v for k, v in torch.load(save_dir / "final.pt").items()}


def _assert_same(flower: dict, sim: dict, what: str) -> None:
    assert flower.keys() == sim.keys()
    for k in sim:  # bit for bit: the same operations on the same numbers in the same order
        assert torch.equal(flower[k], sim[k]), (
            f"{what}: {k} differs by {float((flower[k] - sim[k]).abs().max()):.3g}"
        )


def _wait_for(what: str, ready, runs: dict, fed: LocalFederation, deadline: float,
              waiter: str) -> None:
    """Poll ``ready()`` until it holds; fails at once if a run failed, if run ``waiter`` (the
    one that must reach ``what``) ended without reaching it, or at ``deadline``."""
    while not ready():
        for name, proc in runs.items():  # a finished run is fine, a failed one is not
            code = proc.poll()
            ended = name == waiter and code is not None and not ready()
            assert code in (None, 0) and not ended, (
                f"the {name} run {'ended' if code == 0 else 'failed'} before {what}; see "
                f"{fed.workdir}/run-{name}.log:\n" + "\n".join(
                    _lines(fed.workdir / f"run-{name}.log")[-15:])
            )
        assert time.monotonic() < deadline, f"the runs never reached {what}"
        time.sleep(0.1)


def test_discovery_size_is_the_partition_the_node_trains_on():
    # the query answers from the labels alone; the train handler loads the samples themselves
    from fl_lightning.flower.client import local_partition, partition_size

    data = {"dataset": "digits", "data_dir": None, "num_clients": 3, "partition": "lda",
            "shards_per_client": 2, "alpha": 0.5, "seed": 0, "reference_partition": False,
            "client_size": None, "verify_checksums": True}
    sizes = [partition_size(data, k) for k in range(3)]
    assert sizes == [len(local_partition(data, k)[1]) for k in range(3)]
    assert sum(sizes) == 1437 and len(set(sizes)) == 3  # unequal LDA parts of the train split
    fixed = {**data, "partition": "dirichlet", "alpha": 0.1, "client_size": 400}
    assert [partition_size(fixed, k) for k in range(3)] == [400] * 3


class _MemoryGrid:
    """Flower's ``Grid`` calls over memory instead of the network: every pushed message is
    answered at once by the real ClientApp handler with the node's own context (node config,
    persistent state). Node ``victim`` leaves after the first round; node ``restarted`` is
    restarted then: an empty Flower context, and a new node id (as without authentication)."""

    def __init__(self, num_nodes: int, victim: int | None, restarted: int | None = None,
                 node_config: dict | None = None) -> None:
        self.state = {k: RecordDict() for k in range(num_nodes)}
        self.online, self.victim, self.replies, self.pushes = set(range(num_nodes)), victim, {}, 0
        self.restarted, self.node_config = restarted, node_config or {}
        self.ids = {k: 100 + k for k in range(num_nodes)}

    def get_node_ids(self):
        return [self.ids[k] for k in sorted(self.online)]

    def push_messages(self, messages):
        from fl_lightning.flower.client import make_client_app

        app, ids = make_client_app(), []
        for i, msg in enumerate(messages):
            k = {v: k for k, v in self.ids.items()}[msg.metadata.dst_node_id]
            node_config = {"partition-id": k, "num-partitions": len(self.state),
                           "threads": THREADS, **self.node_config.get(k, {})}
            context = Context(run_id=1, node_id=msg.metadata.dst_node_id, state=self.state[k],
                              node_config=node_config, run_config={})
            ids.append(f"{self.pushes}.{i}")
            self.replies[ids[-1]] = app(msg, context)
        self.pushes += 1
        if self.pushes == 1:
            self.online.discard(self.victim)
            if self.restarted is not None:  # a restarted SuperNode: Flower's context is new
                self.state[self.restarted] = RecordDict()
                self.ids[self.restarted] += 100
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            reply = self.replies.pop(mid)
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            out.append(reply)
        return out


@pytest.fixture
def server_process(monkeypatch):
    """What a ServerApp process is given (Flower's task identity); one PyTorch thread."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("run_id", "node_id", "task_id"):
        monkeypatch.setattr(TaskIdentity, f"_{key}", 1, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_apps_over_memory_equal_the_simulation_with_stragglers_a_lost_and_a_restarted_node(
    tmp_path, server_process
):
    # the ServerApp's and ClientApp's own code with only the transport replaced: partitions
    # learnt from the first round (sent to every node), a straggler per round (the node cuts
    # its steps), a node lost after round 0 (dropped from then on), SCAFFOLD's state on nodes;
    # another node restarted after round 0 (Flower's context.state empty) goes on with the
    # c_i of its state file: without it, its c_i would be 0 and the weights would differ
    from fl_lightning.flower.client import state_file
    from fl_lightning.flower.server import run_server

    args = ("--model.algorithm fl_lightning.algorithms.SCAFFOLD --model.participation "
            "fl_lightning.systems.Participation --model.participation.straggler_ratio 0.5")
    victim, restarted = sorted(set.intersection(
        *[set(sample_clients(NUM_CLIENTS, PER_ROUND, SEED, r)) for r in range(ROUNDS)]))[:2]
    states = {k: {"state-dir": str(tmp_path / f"node-{k}")} for k in range(NUM_CLIENTS)}
    grid = _MemoryGrid(NUM_CLIENTS, victim, restarted, states)
    summary = run_server(grid, {"config": str(CONFIG), "args": args, "rounds": ROUNDS,
                                "save-dir": str(tmp_path / "run")}, APP)
    history = summary["history"]
    assert [len(h["bytes_down"]) for h in history] == [NUM_CLIENTS, PER_ROUND - 1]
    assert all(len(h["stragglers"]) == 1 for h in history), history
    assert history[0]["dropped"] == [] and history[1]["dropped"] == [victim], history
    assert "offline" in history[1]["why"][str(victim)]
    assert restarted in history[1]["reported"]
    context = Context(run_id=1, node_id=0, state=RecordDict(), run_config={},
                      node_config=states[restarted])
    saved = torch.load(state_file(context, restarted), weights_only=True)
    assert set(saved) == {"c_i"} and not list(state_file(context, 0).parent.glob("*.tmp*"))
    sim = _simulate(tmp_path / "sim", args, ROUNDS, {1: [victim]})
    _assert_same(_final(tmp_path / "run"), sim, "memory grid")


def test_a_run_whose_clients_all_fail_stops_with_the_node_error(tmp_path, server_process,
                                                                capsys):
    # a SuperNode data-dir that does not exist: every client fails in round 1; the run stops
    # there (no rounds of nothing, no final accuracy) with one line naming a node's error,
    # which the launcher prints with exit status 1
    from fl_lightning.flower.__main__ import _report
    from fl_lightning.flower.server import FederationError, run_server, write_error

    missing = str(tmp_path / "no-such-folder")
    grid = _MemoryGrid(NUM_CLIENTS, None,
                       node_config={k: {"data-dir": missing} for k in range(NUM_CLIENTS)})
    with pytest.raises(FederationError) as err:
        run_server(grid, {"config": str(CONFIG), "args": "", "rounds": ROUNDS,
                          "save-dir": str(tmp_path / "run")}, APP)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"round 1/{ROUNDS}: no client reported")
    assert f"data-dir={missing!r} is invalid" in line and "node 10" in line, line
    assert grid.pushes == 1 and not (tmp_path / "run" / "summary.json").exists()
    write_error(str(tmp_path / "run"), err.value)
    capsys.readouterr()  # the nodes' tracebacks (their logs, in a deployment)
    assert _report(str(tmp_path / "run"), tmp_path, NUM_CLIENTS, exited=[2]) == 1
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and line in out.err and "accuracy" not in out.out
    assert "SuperNode(s) 2 exited during the run: see" in out.err


def _check_run(tmp_path: Path, name: str, victim: int, last: str) -> None:
    """A finished run of the federation test: every round done, only the killed client ever
    missing (and once gone, gone), and exactly the simulation's weights."""
    history = json.loads((tmp_path / name / "summary.json").read_text())["history"]
    rounds = RUN_ROUNDS[name]
    assert [h["round"] for h in history] == list(range(rounds))  # it finished every round
    gone = False
    for h in history:  # only the killed node is ever missing, the others always report;
        # once it is gone it stays gone (the earlier runs meet the kill wherever they are)
        assert set(h["reported"]) | set(h["dropped"]) == set(h["sampled"]), h
        assert set(h["dropped"]) <= {victim}, h
        assert not gone or h["dropped"] == [victim], history
        gone = gone or bool(h["dropped"])
    dropped = {h["round"]: h["dropped"] for h in history if h["dropped"]}
    if name == last:  # it trained with the victim, then went on without it
        assert dropped == {r: [victim] for r in range(1, rounds)}, history
    # nothing lost: exactly the simulation with the same seed, the same sampled clients and
    # the killed client dropped from the same rounds
    sim = _simulate(tmp_path / f"sim-{name}", ALGORITHMS[name], rounds, dropped)
    _assert_same(_final(tmp_path / name), sim, name)


def test_flower_federation_matches_simulation_and_drops_a_killed_supernode(tmp_path):
    # the victim is sampled in every round, and so is another client, which keeps training
    # (SCAFFOLD: on the control variate its own node kept)
    sampled = [set(sample_clients(NUM_CLIENTS, PER_ROUND, SEED, r)) for r in range(ROUNDS)]
    always = sorted(set.intersection(*sampled))
    assert len(always) >= 2, sampled
    victim = always[0]
    last = list(ALGORITHMS)[-1]  # SCAFFOLD: the run whose round 1 the kill falls into
    progress = {name: tmp_path / name / "progress.jsonl" for name in ALGORITHMS}
    deadline = time.monotonic() + RUN_LIMIT_S
    # FedAvg, FedSoL and SCAFFOLD as three runs on one federation of 3 SuperNodes. A run
    # creates progress.jsonl once its ServerApp sees every SuperNode connected and adds a line
    # per round. Each run is submitted once the previous one got there (a ServerApp that
    # starts slowly beside others on a busy machine misses Flower's activation deadline).
    # with TLS (a CA and the SuperLink's certificate generated for 127.0.0.1) and SuperNode
    # authentication (a key pair per node, registered before it starts); two more nodes try
    # to join meanwhile and are refused: one whose key was never registered, one that trusts
    # another CA
    tls = TLSFiles.create(tmp_path / "tls", NUM_CLIENTS)
    stranger = make_node_keys(tmp_path / "tls", "stranger")[0]
    other_ca = make_ca(tmp_path / "other-ca")[0]
    with LocalFederation(NUM_CLIENTS, tmp_path / "fed", threads=THREADS, tls=tls) as fed:
        refused = {"unregistered": fed.start_supernode(0, "unregistered", private_key=stranger,
                                                       runs_apps=False),
                   "wrong-ca": fed.start_supernode(0, "wrong-ca", root_cert=other_ca,
                                                   runs_apps=False)}
        runs = {}
        for name, args in ALGORITHMS.items():
            cfg = {"rounds": RUN_ROUNDS[name], "args": args, "save-dir": str(tmp_path / name),
                   "round-timeout": 300.0}
            runs[name] = fed.submit(APP, cfg, log_name=f"run-{name}.log")
            _wait_for(f"{name} saw its nodes", progress[name].is_file, runs, fed, deadline,
                      name)
        # the kill: right after the last run's round 1, which the victim reported in; its round
        # 2 message cannot be answered before (a ClientApp process starts per message)
        _wait_for(f"{last}'s round 1", lambda: bool(_lines(progress[last])), runs, fed,
                  deadline, last)
        fed.kill(victim)
        # each run is checked as soon as it has finished: its simulation runs here while the
        # federation still computes the others
        end, pending = time.monotonic() + RUN_LIMIT_S, dict(runs)
        while pending:
            for name, proc in list(pending.items()):
                if proc.poll() is not None:
                    assert proc.returncode == 0, (f"the {name} run failed; see "
                                                  f"{fed.workdir}/run-{name}.log")
                    _check_run(tmp_path, name, victim, last)
                    del pending[name]
            assert time.monotonic() < end, f"the runs {sorted(pending)} never finished"
            time.sleep(0.1)
        for name, why in (("unregistered", "Failed to activate SuperNode"),
                          ("wrong-ca", "CERTIFICATE_VERIFY_FAILED")):
            assert refused[name].wait(timeout=60) != 0, f"the {name} SuperNode was not refused"
            assert why in (fed.workdir / f"{name}.log").read_text(), name
        assert "Uvicorn running on https://" in (fed.workdir / "superlink.log").read_text()
        states = sorted(p.name for p in fed.workdir.glob("home-supernode-*/client-state/*"))
    # nothing of the federation is left running (the killed node's processes included)
    assert tagged(fed.guard.token) == []
    # the SCAFFOLD run's nodes kept c_i in their state files (written atomically: no leftovers)
    assert states and all(s.endswith(".pt") for s in states), states


@pytest.mark.parametrize("argv, named", [
    (["--supernodes", "2"], "--supernodes=2 cannot be combined with --data.num_clients=3"),
    (["--args=--model.privacy fl_lightning.systems.DPFedAvg"], "--model.privacy is not"),
    (["--args=--data.nosuch 3"], "--data.nosuch is not an option"),
])
def test_the_launcher_refuses_what_the_apps_would_before_any_process_starts(
    argv, named, tmp_path, capsys, monkeypatch
):
    # the launcher builds the run as the ServerApp does (the same parser and the ServerApp's
    # own checks): one line, exit status 2, and not one process started
    from fl_lightning.flower.__main__ import main
    from fl_lightning.flower.processes import ProcessGuard

    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(ProcessGuard, "spawn", no_process)
    assert main([*argv, "--save-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err
    assert os.listdir(tmp_path) == []  # nothing generated either


def test_no_process_outlives_a_killed_launcher(tmp_path):
    # a launcher (ProcessGuard) starts a "SuperNode" that starts a "SuperExec" in a session of
    # its own (as Flower's do); SIGKILL the launcher: the parent-death signal stops the first,
    # the watchdog the second, which neither the launcher's process group nor tree reaches
    inner = "import time; time.sleep(600)"
    child = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
             f"{inner!r}], start_new_session=True); time.sleep(600)")
    launcher = ("import os, sys, time\n"
                "from fl_lightning.flower.processes import ProcessGuard\n"
                "guard = ProcessGuard()\n"
                f"guard.spawn([sys.executable, '-c', {child!r}], dict(os.environ), None)\n"
                "print(guard.token, flush=True)\n"
                "time.sleep(600)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, env=env)
    try:
        token = proc.stdout.readline().decode().strip()
        assert token, "the launcher printed no token"
        deadline = time.monotonic() + 60  # bounds a broken start only
        while len(tagged(token)) < 2:
            assert time.monotonic() < deadline, "the child and grandchild never started"
            time.sleep(0.05)
        started = tagged(token)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60
    while tagged(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tagged(token) == [], f"still running after the launcher was killed: {started}"


def test_given_certificates_that_cannot_work_are_refused_in_one_line(tmp_path):
    # a server certificate for another host, signed by another CA, or with another key: the
    # SuperNodes would fail the handshake one by one; the launcher says which file is wrong
    from fl_lightning.errors import ConfigError
    from fl_lightning.flower.tls import check_given, make_server_cert

    ca, ca_key = make_ca(tmp_path / "a")
    crt, key = make_server_cert(tmp_path / "a", ca, ca_key)
    check_given(ca, crt, key)  # the pair made for 127.0.0.1: fine
    other_ca = make_ca(tmp_path / "b")[0]
    remote_crt, remote_key = make_server_cert(tmp_path / "c", ca, ca_key, hosts=("example.org",))
    for args, says in (((other_ca, crt, key), "that CA did not sign it"),
                       ((ca, crt, remote_key), "not that certificate's key"),
                       ((ca, remote_crt, remote_key), "must name 127.0.0.1")):
        with pytest.raises(ConfigError, match=says) as err:
            check_given(*args)
        assert "\n" not in str(err.value)
    assert oct(key.stat().st_mode & 0o777) == "0o600" and oct(ca.stat().st_mode & 0o777) == "0o644"
