"""Exact resume (round boundary, mid-run checkpoint, SIGTERM), resume overrides, divergence,
atomic checkpoints, and nothing written outside the run's folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import FAST, QUICK, REPO, _metrics

from fl_lightning.cli import main

TINY = ["--config", QUICK, *FAST, "--model.sample_ratio", "0.1", "--trainer.val_check_interval",
        "2"]


def _ckpts(tmp_path: Path, version: int) -> dict[str, Path]:
    folder = tmp_path / f"lightning_logs/fl/version_{version}/checkpoints"
    return {p.name: p for p in folder.glob("*.ckpt")}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["state_dict"]


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.parametrize(
    "extra",
    [
        ["--model.algorithm", "fl_lightning.algorithms.FedAvg"],
        ["--model.server_optimizer", "torch.optim.Adam", "--model.server_optimizer.lr", "0.01"],
        ["--config", str(REPO / "configs/engines/batched.yaml"), "--model.sample_ratio", "0.5"],
    ],
    # SCAFFOLD's exact resume (client state on disk, from the older of two checkpoints):
    # tests/test_state_file.py::test_fit_on_disk_resumes_exactly_from_a_moved_run_folder...
    ids=["fedavg", "fedsol+fedadam", "fedsol+batched"],
)
def test_resume_from_a_periodic_checkpoint_mid_run_is_bit_identical(extra, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*TINY, *extra, "--checkpoint_every_n_rounds", "2", "--keep_last_checkpoints", "5"]
    main(["fit", *args, "--trainer.max_steps", "5"])
    first = _ckpts(tmp_path, 0)
    assert sorted(first) == ["round=2.ckpt", "round=4.ckpt", "round=5.ckpt"]
    main(["fit", *args, "--trainer.max_steps", "5", "--ckpt_path", str(first["round=2.ckpt"])])
    _assert_same(first["round=5.ckpt"], _ckpts(tmp_path, 1)["round=5.ckpt"])


def test_only_the_newest_checkpoints_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", *TINY, "--trainer.max_steps", "5", "--checkpoint_every_n_rounds", "1",
          "--keep_last_checkpoints", "2"])
    assert sorted(_ckpts(tmp_path, 0)) == ["round=4.ckpt", "round=5.ckpt"]


# an interrupted run: 8 rounds, evaluated every 2, a periodic checkpoint every 4 rounds
STOPPED = [*TINY, "--trainer.max_steps", "8", "--checkpoint_every_n_rounds", "4"]


def _evaluations(root: Path) -> list[tuple[int, str]]:
    """``(round, val_acc)`` of every evaluation in the metrics.csv of every version under
    ``root``, version by version: a scheduled round lost or evaluated twice shows."""
    found = []
    for folder in sorted((root / "lightning_logs" / "fl").glob("version_*"),
                         key=lambda p: int(p.name.split("_")[1])):
        found += [(int(r["step"]) + 1, r["val_acc"]) for r in _metrics(folder.parents[2],
                                                                       int(folder.name[8:]))
                  if r["val_acc"]]
    return found


def _fit_in(root: Path, args: list[str]) -> Path:
    """``fit`` with ``args`` run from ``root`` (module-scoped fixtures: no monkeypatch.chdir)."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["fit", *args])
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run of :data:`STOPPED` without interruption (its folder)."""
    root = _fit_in(tmp_path_factory.mktemp("uninterrupted"), STOPPED)
    assert [r for r, _ in _evaluations(root)] == [2, 4, 6, 8]
    return root


def _assert_same_run(root: Path, uninterrupted: Path, version: int) -> None:
    """Every scheduled evaluation exactly once over the versions, each equal to the
    uninterrupted run's, and the last round's weights bit-identical."""
    assert _evaluations(root) == _evaluations(uninterrupted)
    _assert_same(_ckpts(root, version)["round=8.ckpt"], _ckpts(uninterrupted, 0)["round=8.ckpt"])


@pytest.mark.parametrize("during,at_round", [("round", 3), ("evaluation", 4)])
def test_sigterm_stops_after_the_rounds_evaluation_and_resume_is_bit_identical(
    during, at_round, uninterrupted, tmp_path, monkeypatch, capsys
):
    """SIGTERM while round 4 (whose evaluation is scheduled) runs, or during that evaluation
    (two batches of 256 test images; Lightning's own loop stops in the middle of it, without a
    checkpoint): the round and its evaluation end, ``preempted-round=4.ckpt`` is written, exit
    status 143; the resume evaluates rounds 6 and 8 only, and the two versions hold every
    evaluation once, equal to the uninterrupted run. In process: Lightning's SIGTERM handler is
    installed for the fit."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", *STOPPED, "--trainer.callbacks+=helpers.SigtermCallback",
              f"--trainer.callbacks.at_round={at_round}", f"--trainer.callbacks.during={during}"])
    assert stop.value.code == 143
    assert "stopped by SIGTERM after round 4" in capsys.readouterr().err
    assert sorted(_ckpts(tmp_path, 0)) == ["preempted-round=4.ckpt", "round=4.ckpt"]
    assert [r for r, _ in _evaluations(tmp_path)] == [2, 4]
    main(["fit", *STOPPED, "--ckpt_path", str(_ckpts(tmp_path, 0)["preempted-round=4.ckpt"])])
    _assert_same_run(tmp_path, uninterrupted, 1)


def test_sigkill_then_resume_from_the_newest_periodic_checkpoint_loses_no_evaluation(
    uninterrupted, tmp_path, monkeypatch
):
    """A real subprocess is SIGKILLed while round 5 runs. Its newest checkpoint,
    ``round=4.ckpt``, was written after round 4's evaluation, and metrics.csv holds every row
    up to it (written with the checkpoint); the resume from it evaluates rounds 6 and 8, so
    every scheduled evaluation is in exactly one version, equal to the uninterrupted run.
    The resume runs in process, with the subprocess on the same number of threads (CPU kernels
    split their reductions by it)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    killed = subprocess.run(
        [sys.executable, "-m", "fl_lightning.cli", "fit", *STOPPED,
         "--trainer.callbacks+=helpers.SigtermCallback", "--trainer.callbacks.at_round=4",
         "--trainer.callbacks.signal=SIGKILL"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(_ckpts(tmp_path, 0)) == ["round=4.ckpt"]
    assert [r for r, _ in _evaluations(tmp_path)] == [2, 4]
    monkeypatch.chdir(tmp_path)
    main(["fit", *STOPPED, "--ckpt_path", str(_ckpts(tmp_path, 0)["round=4.ckpt"])])
    _assert_same_run(tmp_path, uninterrupted, 1)


def test_ctrl_c_stops_at_the_round_boundary_with_a_checkpoint_twice_stops_at_once(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    """The first Ctrl-C (SIGINT, in process) behaves as SIGTERM: the round in flight and its
    scheduled evaluation end, a checkpoint is written, the resume command printed (exit 130),
    and resuming ends exactly as an uninterrupted run, every evaluation once; a second Ctrl-C
    stops at once, without a checkpoint of that round."""
    import signal

    monkeypatch.chdir(tmp_path)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stop:
        main(["fit", *STOPPED, "--trainer.callbacks+=helpers.SigintCallback",
              "--trainer.callbacks.at_round=3"])
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "Ctrl-C: stopping after the round in flight" in err
    assert "stopped by Ctrl-C (SIGINT) after round 4" in err and "--ckpt_path" in err
    ckpt = _ckpts(tmp_path, 0)["preempted-round=4.ckpt"]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is the caller's again
    main(["fit", *STOPPED, "--ckpt_path", str(ckpt)])
    _assert_same_run(tmp_path, uninterrupted, 1)
    with pytest.raises(SystemExit) as twice:
        main(["fit", *STOPPED, "--trainer.callbacks+=helpers.SigintCallback",
              "--trainer.callbacks.at_round=1", "--trainer.callbacks.times=2"])
    assert twice.value.code == 1  # Lightning's KeyboardInterrupt shutdown
    assert not [k for k in _ckpts(tmp_path, 2) if k.startswith("preempted")]
    assert signal.getsignal(signal.SIGINT) is before


def test_a_stop_in_a_round_without_evaluation_keeps_its_metrics_row(tmp_path, monkeypatch):
    """Stopped while round 3 (not evaluated) runs: its training row is in metrics.csv."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", *TINY, "--trainer.max_steps", "4", "--trainer.callbacks+=helpers."
              "SigintCallback", "--trainer.callbacks.at_round=2"])
    assert sorted(_ckpts(tmp_path, 0)) == ["preempted-round=3.ckpt"]
    assert [r["round"] for r in _metrics(tmp_path)] == ["1.0", "2.0", "3.0"]


def test_metrics_rows_of_a_checkpointed_round_are_on_disk_before_the_next_round(tmp_path):
    """What a SIGKILL right after a checkpoint leaves in metrics.csv: every row up to the
    checkpointed round (its row is written as soon as Lightning logs it, after the checkpoint
    of a round without evaluation), one row per round even when a call at a written row's step
    comes later (it is taken back and extended)."""
    import csv
    from types import SimpleNamespace

    from fl_lightning.loggers import RoundCSVLogger

    logger = RoundCSVLogger(str(tmp_path), name="fl", version=0)
    path = tmp_path / "fl" / "version_0" / "metrics.csv"

    def on_disk() -> list[dict]:
        return list(csv.DictReader(open(path))) if path.exists() else []

    logger.log_metrics({"train_loss": 1.0, "round": 1.0}, step=0)
    logger.log_metrics({"val_acc": 0.5}, step=0)  # round 1 and its evaluation
    logger.after_save_checkpoint(SimpleNamespace(_last_global_step_saved=2))  # round 2's
    assert [r["round"] for r in on_disk()] == ["1.0"]
    logger.log_metrics({"train_loss": 0.9, "round": 2.0}, step=1)  # round 2's row: written
    assert [r["round"] for r in on_disk()] == ["1.0", "2.0"]
    logger.log_metrics({"probe/x": 7.0}, step=1)  # a late call at round 2's step: same row
    logger.log_metrics({"train_loss": 0.8, "round": 3.0}, step=2)
    logger.finalize("success")
    rows = on_disk()
    assert [(r["round"], r["probe/x"]) for r in rows] == [("1.0", ""), ("2.0", "7.0"),
                                                         ("3.0", "")]
    assert rows[0]["val_acc"] == "0.5"


def test_a_changed_setting_on_resume_stops_or_applies(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["fit", *TINY, "--trainer.max_steps", "2"])
    ckpt = str(_ckpts(tmp_path, 0)["round=2.ckpt"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, "--trainer.max_steps", "3", "--ckpt_path", ckpt,
              "--model.local_lr", "0.5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--model.local_lr=0.5 (checkpoint: 0.05) differs" in err
    assert "--resume_changes apply" in err
    main(["fit", *TINY, "--trainer.max_steps", "3", "--ckpt_path", ckpt,
          "--model.local_lr", "0.5", "--resume_changes", "apply"])
    out = capsys.readouterr().out
    assert "resuming from round 3" in out and "--model.local_lr=0.5 (checkpoint: 0.05)" in out
    lrs = [float(r["local_lr"]) for r in _metrics(tmp_path, 1) if r["local_lr"]]
    assert lrs == [pytest.approx(0.5 * 0.99**2)]  # the override applied to round 3
    final = json.loads((tmp_path / "lightning_logs/fl/version_1/final_metrics.json").read_text())
    assert final["settings_changed"] == [{
        "from_round": 3, "checkpoint": str(Path(ckpt).resolve()),
        "changes": [{"option": "--model.local_lr", "checkpoint": 0.05, "now": 0.5}],
    }]
    # the mark travels with the run's checkpoints: a further resume still carries it
    stored = torch.load(_ckpts(tmp_path, 1)["round=3.ckpt"], weights_only=True)
    assert stored["fl_settings_changed"] == final["settings_changed"]


def test_divergence_raises_with_client_and_round(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, "--trainer.max_steps", "3",
              "--model.algorithm", "helpers.NaNForClient", "--model.algorithm.client_id", "-1"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "non-finite weights in round 1" in err[0]
    assert "--model.on_nonfinite skip_client" in err[0]


def test_skip_client_leaves_the_diverged_client_out(tmp_path, monkeypatch):
    from fl_lightning.data.module import FederatedDataModule

    monkeypatch.chdir(tmp_path)
    dm = FederatedDataModule(dataset="digits", num_clients=20, partition="lda", alpha=0.1)
    victim = dm.sample_clients(0, 5)[1]
    main(["fit", *TINY, "--model.sample_ratio", "0.25", "--trainer.max_steps", "2",
          "--model.on_nonfinite", "skip_client",
          "--model.algorithm", "helpers.NaNForClient", "--model.algorithm.client_id", str(victim)])
    rows = [r for r in _metrics(tmp_path) if r["skipped_clients"]]
    skipped = [float(r["skipped_clients"]) for r in rows]
    assert skipped[0] == 1.0
    weights = _weights(_ckpts(tmp_path, 0)["round=2.ckpt"])
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """Lightning's checkpoint IO (used by every checkpoint we write) serializes to memory and
    moves a finished temporary file into place: a failure mid-write leaves the old file."""
    import fsspec.implementations.local as local
    from lightning.fabric.utilities.cloud_io import _atomic_save

    path = tmp_path / "x.ckpt"
    _atomic_save({"w": torch.zeros(10)}, path)
    before = path.read_bytes()

    def broken_write(self, data):
        raise OSError("disk full")

    monkeypatch.setattr(local.LocalFileOpener, "write", broken_write)
    with pytest.raises(OSError):
        _atomic_save({"w": torch.ones(100000)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ckpt"]


# Nothing written outside the run's folder (fresh process, empty $HOME, MNIST idx files):
# tests/test_feel.py::test_fresh_process_writes_only_under_its_run_folders


# ---------------------------------------------------------------- resume compares the whole config
@pytest.fixture(scope="module")
def fedsol_ckpt(tmp_path_factory) -> Path:
    """Two rounds of the quick start's FedSoL, written once for the resume tests."""
    root = _fit_in(tmp_path_factory.mktemp("fedsol_run"), [*TINY, "--trainer.max_steps", "2"])
    return root / "lightning_logs/fl/version_0/checkpoints/round=2.ckpt"


RESUME_CHANGES = [
    (["--model.algorithm", "fl_lightning.algorithms.FedAvg"],
     ["--model.algorithm=fl_lightning.algorithms.FedAvg (checkpoint: "
      "fl_lightning.algorithms.FedSoL)"]),
    (["--model.algorithm", "fl_lightning.algorithms.SCAFFOLD"],
     ["--model.algorithm=fl_lightning.algorithms.SCAFFOLD"]),
    (["--model.algorithm.rho", "1.0"], ["--model.algorithm.rho=1.0 (checkpoint: 2.0)"]),
    (["--model.algorithm.proximal", "fl_lightning.algorithms.SCAFFOLD"],
     ["--model.algorithm.proximal=fl_lightning.algorithms.SCAFFOLD (checkpoint: null)"]),
    (["--model.net", "fl_lightning.models.MLP2NN"],
     ["--model.net=fl_lightning.models.MLP2NN (checkpoint: fl_lightning.models.FedAvgCNN)"]),
    (["--model.engine", "fl_lightning.engines.BatchedEngine"], ["--model.engine="]),
    (["--model.server_optimizer.momentum", "0.9"],
     ["--model.server_optimizer.momentum=0.9 (checkpoint: 0.0)"]),
    (["--model.server_optimizer", "torch.optim.Adam"],
     ["--model.server_optimizer=torch.optim.Adam"]),
    (["--model.compressor", "fl_lightning.systems.TopK"],
     ["--model.compressor=fl_lightning.systems.TopK (checkpoint: null)"]),
    (["--model.on_nonfinite", "skip_client"], ["--model.on_nonfinite=skip_client"]),
    (["--data.alpha", "0.5"], ["--data.alpha=0.5 (checkpoint: 0.1)"]),
    (["--seed_everything", "1"], ["--seed_everything=1 (checkpoint: 0)"]),
    (["--trainer.precision", "64-true"], ["--trainer.precision=64-true (checkpoint: null)"]),
    (["--model.algorithm.rho", "1.0", "--model.local_lr", "0.5", "--data.num_clients", "10"],
     ["3 settings differ", "\n  --data.num_clients=10 (checkpoint: 20)",
      "\n  --model.algorithm.rho=1.0 (checkpoint: 2.0)",
      "\n  --model.local_lr=0.5 (checkpoint: 0.05)"]),
]


@pytest.mark.parametrize("extra,expected", RESUME_CHANGES,
                         ids=[" ".join(a) for a, _ in RESUME_CHANGES])
def test_resume_refuses_every_result_shaping_change(extra, expected, fedsol_ckpt, tmp_path,
                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, "--trainer.max_steps", "3", "--ckpt_path", str(fedsol_ckpt),
              *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    for part in expected:
        assert part in err, err
    assert "--resume_changes apply" in err and "marked as changed from round 3" in err
    assert not (tmp_path / "lightning_logs").exists()


def test_resume_ignores_harmless_changes(fedsol_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", *TINY, "--trainer.max_steps", "3", "--ckpt_path", str(fedsol_ckpt),
          "--trainer.val_check_interval", "1", "--checkpoint_every_n_rounds", "5",
          "--keep_last_checkpoints", "1", "--trainer.log_every_n_steps", "5",
          "--data.verify_checksums", "false", "--data.eval_batch_size", "100"])
    final = json.loads((tmp_path / "lightning_logs/fl/version_0/final_metrics.json").read_text())
    assert "settings_changed" not in final and final["rounds"] == 3


def test_resume_with_another_algorithm_applied_is_marked_and_starts_its_state(
        fedsol_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["fit", *TINY, "--trainer.max_steps", "3", "--ckpt_path", str(fedsol_ckpt),
          "--model.algorithm", "fl_lightning.algorithms.SCAFFOLD",
          "--model.server_optimizer.lr", "0.5", "--resume_changes", "apply"])
    out = capsys.readouterr().out
    assert "resuming from round 3" in out
    assert "--model.algorithm=fl_lightning.algorithms.SCAFFOLD (checkpoint: " in out
    assert "the new algorithm starts with empty state" in out
    run = tmp_path / "lightning_logs/fl/version_0"
    marked = json.loads((run / "settings_changed.json").read_text())
    assert [c["option"] for c in marked[0]["changes"]] == [
        "--model.algorithm", "--model.server_optimizer.lr"]
    assert marked[0]["from_round"] == 3
    assert json.loads((run / "final_metrics.json").read_text())["settings_changed"] == marked
    ckpt = torch.load(run / "checkpoints/round=3.ckpt", weights_only=True)
    assert ckpt["fl_settings_changed"] == marked
    assert "SCAFFOLD" in ckpt["fl_config"]
    assert set(ckpt["fl_algorithm_state"]["server"]) >= {"c"}  # SCAFFOLD's own state, from round 3
    # the server optimizer took the new learning rate (torch would restore the stored 1.0)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == 0.5


def test_resume_with_another_server_optimizer_starts_it_fresh(fedsol_ckpt, tmp_path,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", *TINY, "--trainer.max_steps", "3", "--ckpt_path", str(fedsol_ckpt),
          "--model.server_optimizer", "torch.optim.Adam", "--model.server_optimizer.lr", "0.01",
          "--resume_changes", "apply"])
    ckpt = torch.load(_ckpts(tmp_path, 0)["round=3.ckpt"], weights_only=True)
    state = ckpt["optimizer_states"][0]
    group = state["param_groups"][0]
    assert "betas" in group and "nesterov" not in group and group["lr"] == 0.01
    assert all(s["step"] == 1 for s in state["state"].values())  # one Adam step: round 3


@pytest.mark.parametrize("extra,cause", [
    (["--model.net", "fl_lightning.models.MLP2NN"],
     "--model.net=fl_lightning.models.MLP2NN (checkpoint: fl_lightning.models.FedAvgCNN)"),
    (["--data.dataset", "bloodmnist", "--data.data_dir", "data", "--data.partition", "iid",
      "--data.num_clients", "4", "--data.verify_checksums", "false"],
     "--data.dataset=bloodmnist (checkpoint: digits)"),
], ids=["net", "dataset"])
def test_resume_with_another_shape_is_refused_before_loading(extra, cause, fedsol_ckpt,
                                                             tmp_path, monkeypatch, capsys):
    from test_datasets import write_medmnist

    write_medmnist(tmp_path / "data/medmnist/bloodmnist.npz", channels=3, sizes=(40, 4, 16),
                   num_classes=8)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, "--trainer.max_steps", "3", "--ckpt_path", str(fedsol_ckpt),
              *extra, "--resume_changes", "apply"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "does not fit this model because" in err[0] and cause in err[0]
    assert not list(tmp_path.glob("lightning_logs/fl/*/*"))  # nothing written, nothing loaded


def test_a_checkpoint_without_a_stored_config_still_compares_model_and_data(
        fedsol_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    old = torch.load(fedsol_ckpt, weights_only=True)
    del old["fl_config"], old["fl_settings_changed"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(SystemExit):
        main(["fit", *TINY, "--trainer.max_steps", "3", "--ckpt_path", "old.ckpt",
              "--model.local_lr", "0.5"])
    err = capsys.readouterr().err
    assert "--model.local_lr=0.5 (checkpoint: 0.05)" in err
    assert "only its model and data settings were compared" in err


# ---------------------------------------------------------------- no run touches another's files
def test_an_existing_explicit_version_is_refused_and_left_intact(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", *TINY, "--trainer.max_steps", "1", "--trainer.logger.init_args.version", "0"]
    main(args)
    run = tmp_path / "lightning_logs/fl/version_0"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "--trainer.logger.init_args.version=0" in err[0]
    assert "metrics.csv" in err[0]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_without_a_logger_a_used_root_dir_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", *TINY, "--trainer.max_steps", "1", "--trainer.logger", "false",
            "--trainer.default_root_dir", "out"]
    main(args)
    before = (tmp_path / "out/final_metrics.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "--trainer.default_root_dir=out" in err[0]
    assert (tmp_path / "out/final_metrics.json").read_bytes() == before


def test_evaluating_a_checkpoint_of_another_shape_is_refused(fedsol_ckpt, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", QUICK, *FAST, "--model.sample_ratio", "0.1",
              "--model.local_epochs", "1", "--ckpt_path", str(fedsol_ckpt),
              "--model.net", "fl_lightning.models.MLP2NN"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "does not fit this model" in err[0] and "MLP2NN" in err[0]
