"""Every config in configs/algorithms/ runs one round through the CLI on tiny offline data."""

from __future__ import annotations

import glob
import json
import os
import sys

import pytest

from fl_lightning.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "algorithms", "*.yaml")))


def test_there_is_a_config_for_every_algorithm():
    names = {os.path.basename(c)[:-5] for c in CONFIGS}
    expected = {
        "fedavg", "fedprox", "fedsam", "fedasam", "scaffold", "fednova", "feddyn", "moon",
        "fedntd", "fedsol", "fedsol_fixed", "fedsol_head", "fedsol_body", "fedavgm", "fedadam",
        "fedyogi", "fedadagrad", "pers_fedavg_ft", "pers_fedsol_ft", "pers_fedbabu",
        "pers_perfedavg", "pers_knnper", "pers_localonly",
        *(f"fedsol_prox_{s}" for s in ("fedprox", "scaffold", "feddyn", "moon", "fednova")),
        *(f"ablation_a{i}" for i in range(7)),
    }
    assert expected <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: os.path.basename(c)[:-5])
def test_config_runs_one_round(config, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fl-lightning"])
    main([
        "fit", "--config", config,
        "--data.dataset", "digits", "--data.num_clients", "5", "--data.partition", "lda",
        "--data.alpha", "1.0", "--model.sample_ratio", "0.4", "--model.local_epochs", "1",
        "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.enable_checkpointing", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.default_root_dir", str(tmp_path),
        # LocalOnly's official 200 epochs per client: 1 here
        *(["--trainer.callbacks.init_args.epochs", "1"]
          if os.path.basename(config) == "pers_localonly.yaml" else []),
    ])
    [final] = glob.glob(str(tmp_path / "**" / "final_metrics.json"), recursive=True)
    metrics = json.load(open(final))
    assert metrics["rounds"] == 1 and 0.0 <= metrics["test_acc"] <= 1.0
    if os.path.basename(config).startswith("pers_"):
        [pers] = glob.glob(str(tmp_path / "**" / "personalized_metrics.json"), recursive=True)
        result = json.load(open(pers))
        assert len(result["acc"]) == 5 and 0.0 <= result["acc_mean"] <= 1.0
