"""The ``fl-lightning`` command end to end, in process, on tiny data."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_datasets import write_idx, write_medmnist

from fl_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICK = str(REPO / "configs" / "quickstart.yaml")
FAST = [
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--model.local_epochs", "1",
    "--model.sample_ratio", "0.1",
]


def _run(args: list[str]) -> None:
    main(["fit", *args, *FAST])


def _metrics(tmp_path: Path, version: int = 0) -> list[dict]:
    path = tmp_path / "lightning_logs" / "fl" / f"version_{version}" / "metrics.csv"
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_quickstart_runs_three_rounds(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _run(["--config", QUICK, "--trainer.max_steps", "3", "--trainer.val_check_interval", "1"])
    rows = _metrics(tmp_path)
    losses = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    accs = [float(r["val_acc"]) for r in rows if r["val_acc"]]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert len(accs) == 3 and all(0.0 <= a <= 1.0 for a in accs)
    assert [r["round"] for r in rows if r["round"]] == ["1.0", "2.0", "3.0"]
    final = json.loads((tmp_path / "lightning_logs/fl/version_0/final_metrics.json").read_text())
    assert final["rounds"] == 3 and final["test_acc"] == pytest.approx(accs[-1])
    assert "final global test accuracy" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "lightning_logs/fl/version_0/config.yaml").read_text())
    assert saved["model"]["algorithm"]["class_path"] == "fl_lightning.algorithms.FedSoL"
    assert (tmp_path / "lightning_logs/fl/version_0/checkpoints").is_dir()


def test_same_seed_same_metrics_and_algorithm_swap_changes_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--config", QUICK, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
    _run(base)
    _run(base)
    _run([*base, "--model.algorithm", "fl_lightning.algorithms.FedAvg"])
    _run([*base, "--data.seed", "1"])
    loss = [[r["train_loss"] for r in _metrics(tmp_path, v) if r["train_loss"]] for v in range(4)]
    assert loss[0] == loss[1]  # bit-identical reruns
    assert loss[0] != loss[2]  # the class path swap took effect
    assert loss[0] != loss[3]  # another data seed gives another partition and sampling


def test_print_config_shows_the_stacked_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICK, "--model.algorithm.rho", "0.5", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["algorithm"]["init_args"]["rho"] == 0.5
    assert config["data"]["dataset"] == "digits"
    assert config["model"]["server_optimizer"]["class_path"] == "fl_lightning.optim.ServerSGD"


def _tiny_mnist(root: Path, n_train: int = 60, n_test: int = 20) -> None:
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(n_train) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10)


def test_mnist_config_runs_on_tiny_idx_files(tmp_path, monkeypatch):
    _tiny_mnist(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    _run([
        "--config", str(REPO / "configs/mnist/fedsol_shard.yaml"), "--data.data_dir", "data",
        "--data.num_clients", "6", "--model.sample_ratio", "0.5", "--trainer.max_steps", "2",
        "--data.verify_checksums", "false",
    ])
    rows = _metrics(tmp_path)
    assert len([r for r in rows if r["train_loss"]]) == 2
    assert len([r for r in rows if r["val_acc"]]) == 2


def test_medmnist_runs_on_a_tiny_npz(tmp_path, monkeypatch):
    write_medmnist(tmp_path / "data" / "medmnist" / "bloodmnist.npz", channels=3,
                   sizes=(40, 4, 16), num_classes=8)
    monkeypatch.chdir(tmp_path)
    _run([
        "--config", QUICK, "--data.dataset", "bloodmnist", "--data.data_dir", "data",
        "--data.num_clients", "4", "--data.partition", "iid", "--trainer.max_steps", "2",
        "--data.verify_checksums", "false",
    ])
    saved = yaml.unsafe_load((tmp_path / "lightning_logs/fl/version_0/hparams.yaml").read_text())
    assert saved["num_classes"] == 8 and list(saved["input_shape"]) == [3, 28, 28]


def test_console_script_imports_a_module_of_the_current_folder(tmp_path, monkeypatch, capsys):
    # as from the fl-lightning console script: sys.path[0] is the script's folder, not the cwd
    (tmp_path / "my_algorithms.py").write_text(
        "from fl_lightning.algorithms import FedAvg\n\n\nclass MyAlg(FedAvg):\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    here = {str(tmp_path), "", "."}
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in here])
    before = list(sys.path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", QUICK, "--model.algorithm", "my_algorithms.MyAlg",
              "--print_config"])
    assert stop.value.code in (0, None)
    assert "class_path: my_algorithms.MyAlg" in capsys.readouterr().out
    assert sys.path == before  # the folder was added for the run only
    sys.modules.pop("my_algorithms", None)
