"""Replicas (``--replicas.*``): R runs trained together in one process give each run's own
weights (float64, tiny synthetic data, logistic regression), resume exactly, stop a diverging
replica alone, and refuse bad axes with one line."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from fl_lightning import replicas as replicas_module
from fl_lightning.cli import main

BASE = [
    "--data.dataset", "synthetic", "--data.partition", "natural", "--data.num_clients", "6",
    "--model.net", "LogisticRegression", "--model.sample_ratio", "0.5",
    "--model.local_epochs", "1", "--model.batch_size", "16", "--model.local_lr", "0.05",
    "--model.algorithm", "FedProx", "--model.algorithm.mu", "1.0",
    "--trainer.precision", "64-true", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]


def fit(root, *extra: str, rounds: int = 3) -> str:
    """Run ``fit`` in this process; returns its run folder."""
    main(["fit", *BASE, "--trainer.max_steps", str(rounds),
          "--trainer.default_root_dir", str(root), *extra])
    return sorted(glob.glob(os.path.join(root, "lightning_logs", "fl", "version_*")))[-1]


def weights(run: str, replica: int | None = None, ckpt: str | None = None) -> dict:
    """The final global weights of the run (``replica``: of that replica)."""
    path = ckpt or sorted(glob.glob(os.path.join(run, "checkpoints", "round=*.ckpt")))[-1]
    state = torch.load(path, weights_only=True)
    if replica:
        return state["fl_replicas"]["replicas"][replica]["net"]
    return {k[len("net."):]: v for k, v in state["state_dict"].items() if k.startswith("net.")}


def assert_close(a: dict, b: dict, exact: bool) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float64
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-12)


def rows(run: str, replica: int) -> list[dict]:
    with open(os.path.join(run, f"replica_{replica}", "metrics.csv")) as fh:
        lines = [ln.strip().split(",") for ln in fh]
    return [dict(zip(lines[0], ln, strict=True)) for ln in lines[1:]]


def test_seed_axis_sequential_a_replica_is_its_run_alone_and_one_diverges_alone(
        tmp_path, capsys):
    # replica 0 (the Trainer's own run) diverges in round 1; replica 1 goes on to the end
    run = fit(tmp_path / "rep", "--replicas.seed", "0,5", "--replicas.model.local_lr",
              "1e200,0.05")
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if "replica 0" in ln]
    assert len(line) == 1 and "seed=0, model.local_lr=1e+200" in line[0], err
    assert "client" in line[0] and "round 1" in line[0] and "the other replicas go on" in line[0]
    stopped = json.load(open(os.path.join(run, "replica_0", "final_metrics.json")))
    assert stopped["rounds"] == 0 and "stopped" in stopped
    alone = fit(tmp_path / "alone", "--seed_everything", "5", "--data.seed", "5")
    assert_close(weights(run, 1), weights(alone), exact=True)
    final = json.load(open(os.path.join(run, "replica_1", "final_metrics.json")))
    assert final["test_acc"] == json.load(open(os.path.join(alone, "final_metrics.json")))[
        "test_acc"]
    assert final["values"] == {"seed": 5, "model.local_lr": 0.05} and final["rounds"] == 3
    got = rows(run, 1)
    assert [r["round"] for r in got] == ["1", "2", "3"] and all(r["val_acc"] for r in got)


def objective(path: str) -> list[tuple[int, float, float]]:
    """``(round, objective/loss, objective/gap)`` of every measured row of a metrics.csv."""
    with open(path) as fh:
        lines = [ln.rstrip("\n").split(",") for ln in fh]
    head = lines[0]
    step = head.index("round") if "round" in head else head.index("step")
    out = []
    for ln in lines[1:]:
        row = dict(zip(head, ln, strict=True))
        if row.get("objective/loss"):
            out.append((int(float(ln[step])), float(row["objective/loss"]),
                        float(row["objective/gap"])))
    return out


def test_batched_replicas_x_clients_in_one_vmap_equal_the_runs_alone(tmp_path):
    # 4 replicas: two FedDyn alphas x two seeds; each alpha's two seeds share one vmapped step,
    # in which each row reads its replica's global weights (the dynamic regularizer's anchor)
    # and its replica's clients' h_i, and each replica's server h feeds back from round 2 on;
    # the lock-step stops at 1 live row and the rest are plain steps (tail_rows 1);
    # GlobalObjective (with its optimum F*, one L-BFGS call: cheap, not converged) measures
    # every replica as its run alone
    engine = ["--model.engine", "BatchedEngine", "--model.algorithm", "FedDyn",
              "--model.engine.tail_rows", "1",
              "--trainer.callbacks+=GlobalObjective",
              "--trainer.callbacks.init_args.optimum", "true",
              "--trainer.callbacks.init_args.max_iter", "1",
              "--trainer.callbacks.init_args.newton_max_params", "0"]
    run = fit(tmp_path / "rep", *engine, "--replicas.product", "true",
              "--replicas.seed", "1,2", "--replicas.model.algorithm.alpha", "0.05,0.2")
    values = json.load(open(os.path.join(run, "replicas.json")))
    assert [v["values"] for v in values] == [
        {"seed": 1, "model.algorithm.alpha": 0.05}, {"seed": 1, "model.algorithm.alpha": 0.2},
        {"seed": 2, "model.algorithm.alpha": 0.05}, {"seed": 2, "model.algorithm.alpha": 0.2}]
    alone = fit(tmp_path / "alone", *engine, "--seed_everything", "2", "--data.seed", "2",
                "--model.algorithm.alpha", "0.2")
    assert_close(weights(run, 3), weights(alone), exact=False)
    mine = objective(os.path.join(run, "replica_3", "metrics.csv"))
    theirs = objective(os.path.join(alone, "metrics.csv"))
    assert [r for r, _, _ in mine] == [1, 2, 3] == [r for r, _, _ in theirs]
    for (_, loss, gap), (_, loss_alone, gap_alone) in zip(mine, theirs, strict=True):
        assert abs(loss - loss_alone) <= 1e-12 and abs(gap - gap_alone) <= 1e-12
    # replica 0's numbers are the Trainer's callback's; each replica has its analysis file
    assert objective(os.path.join(run, "replica_0", "metrics.csv")) == objective(
        os.path.join(run, "metrics.csv"))
    history = json.load(open(os.path.join(run, "replica_3", "analysis", "objective.json")))
    assert [h["loss"] for h in history["history"]] == [loss for _, loss, _ in mine]
    assert history["optimum"]["iterations"] == 1.0  # its own F*, solved at the start


def test_scaffold_replicas_in_the_joint_vmap_equal_their_runs_alone(tmp_path):
    """SCAFFOLD (server ``c``, clients' ``c_i``): two seeds as replicas x clients in one
    vmapped call each round; replica 1 (not the trainer's own run: the call runs replica 0's
    algorithm object) equals its run alone, its server and client control variates feeding
    back from round 2 on (float64, 1e-12; fails when replica 1's rows see replica 0's state)."""
    engine = ["--model.engine", "BatchedEngine", "--model.algorithm", "SCAFFOLD"]
    run = fit(tmp_path / "rep", *engine, "--replicas.seed", "3,4")
    alone = fit(tmp_path / "alone", *engine, "--seed_everything", "4", "--data.seed", "4")
    assert_close(weights(run, 1), weights(alone), exact=False)


def test_replicas_resume_from_a_mid_run_checkpoint_exactly(tmp_path):
    axes = ["--model.engine", "BatchedEngine", "--replicas.seed", "0,1",
            "--replicas.model.server_optimizer.lr", "1,0.5", "--checkpoint_every_n_rounds", "2",
            "--keep_last_checkpoints", "5",
            "--model.server_optimizer", "ServerSGD", "--model.server_optimizer.momentum", "0.5",
            "--trainer.callbacks+=GlobalObjective"]
    whole = fit(tmp_path / "whole", *axes, rounds=4)
    mid = os.path.join(whole, "checkpoints", "round=2.ckpt")
    resumed = fit(tmp_path / "whole", *axes, "--ckpt_path", mid, rounds=4)
    assert resumed != whole
    for k in (0, 1):
        assert_close(weights(resumed, k), weights(whole, k), exact=True)
    # replica 1's GlobalObjective copy: rounds 1-2 from the checkpoint, 3-4 measured after it
    history = [json.load(open(os.path.join(run, "replica_1", "analysis", "objective.json")))[
        "history"] for run in (whole, resumed)]
    assert [h["round"] for h in history[1]] == [1, 2, 3, 4]
    assert [h["loss"] for h in history[1]] == [h["loss"] for h in history[0]]
    with pytest.raises(SystemExit):
        fit(tmp_path / "whole", *axes[:2], "--replicas.seed", "0,2", *axes[4:],
            "--ckpt_path", mid, rounds=4)


@pytest.mark.parametrize(("args", "expected"), [
    (["--replicas.model.net", "1,2"], "model.net is not one"),
    (["--replicas.model.algorithm.mu", "0.5,x"], "comma-separated finite numbers"),
    (["--replicas.seed", "0,1,2", "--replicas.model.local_lr", "0.1,0.2"],
     "--replicas.seed has 3, --replicas.model.local_lr has 2 values"),
    (["--replicas.seed", "0.5"], "comma-separated integers"),
    (["--replicas.model.nope", "1,2"], "no such option"),
    (["--replicas.seed", "0,1", "--trainer.callbacks+=WeightDivergence"],
     "cannot be combined with the callback WeightDivergence"),
])
def test_bad_axes_get_one_line(tmp_path, capsys, args, expected):
    with pytest.raises(SystemExit) as stop:
        fit(tmp_path, *args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_more_replicas_than_memory_allows_get_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(replicas_module, "available_memory", lambda device: 1000)
    with pytest.raises(SystemExit):
        fit(tmp_path, "--model.engine", "BatchedEngine", "--replicas.seed", "0,1,2")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 replicas" in err[0] and "MiB free" in err[0], err
    # an explicit budget of the batched engine bounds the joint replicas x clients call
    # (not chunked); 3 replicas x 3 clients x ~4 models of 600 float64 weights ~ 0.2 MiB
    monkeypatch.setattr(replicas_module, "available_memory", lambda device: 2**40)
    with pytest.raises(SystemExit):
        fit(tmp_path, "--model.engine", "BatchedEngine", "--model.engine.memory_budget",
            "100000", "--replicas.seed", "0,1,2")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model.engine.memory_budget allows 0 MiB" in err[0], err
    assert "a larger --model.engine.memory_budget" in err[0], err

