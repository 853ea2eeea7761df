"""configs/paper/: the learning setups of the FedSoL paper's Table 3, one config per dataset."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from fl_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
#: Table 3 of the paper: clients, communication rounds, sampling ratio (MNIST: configs/mnist/).
TABLE3 = {
    "mnist": (100, 200, 0.1),
    "cifar10": (100, 300, 0.1),
    "svhn": (100, 200, 0.1),
    "cinic10": (200, 300, 0.05),
    "pathmnist": (200, 200, 0.05),
    "tissuemnist": (200, 200, 0.05),
}


def _config(name: str) -> Path:
    return REPO / ("configs/mnist/fedavg_lda.yaml" if name == "mnist"
                   else f"configs/paper/{name}_lda.yaml")


@pytest.mark.parametrize("name", list(TABLE3))
def test_paper_config_is_the_table3_setup(name, monkeypatch, capsys):
    cfg = yaml.safe_load(_config(name).read_text())
    clients, rounds, ratio = TABLE3[name]
    assert cfg["data"]["dataset"] == name
    assert (cfg["data"]["num_clients"], cfg["trainer"]["max_steps"],
            cfg["model"]["sample_ratio"]) == (clients, rounds, ratio)
    assert (cfg["data"]["partition"], cfg["data"]["alpha"]) == ("lda", 0.1)  # Table 1's column
    model = cfg["model"]  # appendix C.4
    assert (model["local_epochs"], model["batch_size"], model["local_lr"], model["lr_decay"],
            model["momentum"], model["weight_decay"]) == (5, 50, 0.01, 0.99, 0.9, 1e-5)
    monkeypatch.setattr(sys, "argv", ["fl-lightning"])
    with pytest.raises(SystemExit) as exit_info:  # it parses, stacked with an algorithm config
        main(["fit", "--config", str(_config(name)), "--config",
              str(REPO / "configs/algorithms/fedsol.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["dataset"] == name
    assert printed["model"]["algorithm"]["class_path"].endswith("FedSoL")
