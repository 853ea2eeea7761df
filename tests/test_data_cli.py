"""Every dataset and model of the paper trains for 2 rounds through the CLI on tiny files in the
dataset's real on-disk format (paper augmentation on, checksums off for the self-made files)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from datafiles import write_cifar10, write_cinic10, write_svhn
from test_cli import _tiny_mnist
from test_datasets import snapshot, write_medmnist

from fl_lightning.cli import main


def _mnist(root: Path) -> None:
    _tiny_mnist(root, n_train=16, n_test=6)


def _cifar10(root: Path) -> None:
    write_cifar10(root, per_batch=3, n_test=4)


def _svhn(root: Path) -> None:
    write_svhn(root, "train", n=12)
    write_svhn(root, "test", n=4)


def _cinic10(root: Path) -> None:
    write_cinic10(root, "train", per_class=1)
    write_cinic10(root, "test", per_class=1)


def _pathmnist(root: Path) -> None:
    write_medmnist(root / "medmnist" / "pathmnist.npz", channels=3, sizes=(10, 4, 4),
                   num_classes=9)


def _tissuemnist(root: Path) -> None:
    write_medmnist(root / "medmnist" / "tissuemnist.npz", channels=1, sizes=(10, 4, 4),
                   num_classes=8)


RUNS = [
    ("mnist", _mnist, []),  # FedAvgCNN (28 px), the default net
    ("cifar10", _cifar10, []),  # FedAvgCNN (32 px)
    ("cifar10", _cifar10, ["--model.net", "fl_lightning.models.VGG11"]),
    ("svhn", _svhn, ["--model.net", "fl_lightning.models.ResNet18"]),
    ("cinic10", _cinic10, ["--model.net", "fl_lightning.models.ResNet18",
                           "--model.net.norm", "gn"]),
    ("pathmnist", _pathmnist, ["--model.net", "fl_lightning.models.SLViT"]),
    ("tissuemnist", _tissuemnist, ["--trainer.callbacks+=HeterogeneityReport"]),
]


IDS = ["mnist-cnn28", "cifar10-cnn32", "cifar10-vgg11", "svhn-resnet18bn", "cinic10-resnet18gn",
       "pathmnist-slvit", "tissuemnist-cnn28-report"]


@pytest.mark.parametrize(("dataset", "writer", "extra"), RUNS, ids=IDS)
def test_two_rounds_through_the_cli(tmp_path, monkeypatch, capsys, dataset, writer, extra):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fl-lightning"])
    writer(tmp_path / "data")
    before = snapshot(tmp_path / "data")
    main([
        "fit", "--data.dataset", dataset, "--data.data_dir", "data",
        "--data.verify_checksums", "false", "--data.num_clients", "2",
        "--data.partition", "iid", "--model.sample_ratio", "0.5", "--model.local_epochs", "1",
        "--model.batch_size", "16", "--trainer.max_steps", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.enable_checkpointing", "false", *extra,
    ])
    logs = sorted(tmp_path.glob("lightning_logs/fl/version_*"))
    metrics = json.loads((logs[-1] / "final_metrics.json").read_text())
    assert metrics["rounds"] == 2 and np.isfinite(metrics["test_loss"])
    assert "after 2 rounds" in capsys.readouterr().out
    if "HeterogeneityReport" in " ".join(extra):
        report = json.loads((logs[-1] / "heterogeneity.json").read_text())
        assert report["num_clients"] == 2 and report["num_samples"] == 14  # train + val
        assert (logs[-1] / "heterogeneity.png").is_file()
    assert snapshot(tmp_path / "data") == before  # nothing written into data_dir


def test_checksum_error_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fl-lightning"])
    _svhn(tmp_path / "data")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--data.dataset", "svhn", "--data.data_dir", "data", "--trainer.max_steps",
              "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fl-lightning: error: dataset 'svhn': file ")
    assert "expected eb5a983be6a315427106f1b164d9cef3" in err  # torchvision's test_32x32.mat
    assert "--data.verify_checksums false" in err


def test_the_default_evaluation_batch_is_by_device_and_changes_no_result():
    """``--data.eval_batch_size`` unset: 256 on a CPU (batches of 1000 evaluate the CNN
    markedly slower there, docs/benchmarks.md), 1000 on a GPU; a given value is kept. The
    batch size changes the evaluation only by float rounding: the same accuracy, the loss to
    1e-6 (digits: 360 test images, two batches against one)."""
    import torch

    from fl_lightning.data.module import FederatedDataModule
    from fl_lightning.module import FederatedModule

    dm = FederatedDataModule(dataset="digits", num_clients=4, partition="iid")
    assert dm.eval_batch_size is None
    assert dm.eval_batch("cpu") == 256
    assert dm.eval_batch("cuda") == dm.eval_batch(torch.device("cuda", 1)) == 1000
    assert FederatedDataModule(dataset="digits", eval_batch_size=100).eval_batch("cuda") == 100
    torch.manual_seed(0)
    module = FederatedModule(num_classes=10, input_shape=(1, 8, 8)).attach(dm)
    by_default = module.evaluate()
    dm.eval_batch_size = 1000
    one_batch = module.evaluate()
    assert by_default["test_acc"] == one_batch["test_acc"]
    assert by_default["test_loss"] == pytest.approx(one_batch["test_loss"], rel=1e-6, abs=0)
