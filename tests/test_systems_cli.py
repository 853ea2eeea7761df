"""The systems mechanisms end to end from the command line on the offline digits data:
composition with FedSoL, logged counts, epsilon, bytes, secure aggregation, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_cli import QUICK, _metrics
from test_reliability import _assert_same, _ckpts, _weights

from fl_lightning.cli import main
from fl_lightning.systems import LabelFlip, Systems
from fl_lightning.systems.attacks import malicious_clients
from fl_lightning.systems.privacy import dp_epsilon

BASE = [
    "--config", QUICK, "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--model.local_epochs", "1",
    "--model.sample_ratio", "0.5", "--trainer.val_check_interval", "2",
]
PARTICIPATION = ["--model.participation", "fl_lightning.systems.Participation",
                 "--model.participation.dropout_ratio", "0.2",
                 "--model.participation.straggler_ratio", "0.3"]


def _final(tmp_path: Path, version: int = 0) -> dict:
    path = tmp_path / f"lightning_logs/fl/version_{version}/final_metrics.json"
    return json.loads(path.read_text())


def _sizes(tmp_path: Path, version: int = 0) -> list[int]:
    ckpt = sorted(_ckpts(tmp_path, version).values())[-1]
    return [t.numel() for k, t in _weights(ckpt).items() if k.startswith("net.")]


def test_fedsol_with_dp_trimmed_mean_attack_stragglers_and_quantization(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", *BASE, *PARTICIPATION, "--trainer.max_steps", "3",
          "--model.attack", "fl_lightning.systems.SignFlip", "--model.attack.share", "0.2",
          "--config", str(Path(QUICK).parent / "systems/dp.yaml"),
          "--model.privacy.noise_multiplier", "0.8",
          "--config", str(Path(QUICK).parent / "systems/trimmed_mean.yaml"),
          "--model.compressor", "fl_lightning.systems.StochasticQuantizer",
          "--model.compressor.bits", "8"])
    rows = [r for r in _metrics(tmp_path) if r["train_loss"]]
    assert len(rows) == 3
    sizes = _sizes(tmp_path)
    per_client = sum(math.ceil(n * 8 / 8) + 8 for n in sizes)  # 8-bit levels + min/max
    bad = set(malicious_clients(0, 20, 0.2))
    assert len(bad) == 4
    for r, row in enumerate(rows, start=1):
        assert float(row["dropped_clients"]) == 2  # floor(0.2 * 10)
        assert float(row["stragglers"]) == 3  # floor(0.3 * 10)
        assert 0 <= float(row["malicious_clients"]) <= 4
        assert float(row["bytes_up"]) == 8 * per_client  # 8 clients report
        assert float(row["epsilon"]) == pytest.approx(dp_epsilon(0.5, 0.8, r, 1e-5)[0], rel=1e-6)
    final = _final(tmp_path)
    assert final["epsilon"] == pytest.approx(dp_epsilon(0.5, 0.8, 3, 1e-5)[0], rel=1e-12)
    assert final["delta"] == 1e-5 and final["bytes_up_total"] == 3 * 8 * per_client
    assert math.isfinite(final["test_loss"])


def test_secure_aggregation_with_dropouts_gives_the_plain_average(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*BASE, "--model.algorithm", "fl_lightning.algorithms.FedAvg",
            "--trainer.max_steps", "2", "--model.participation",
            "fl_lightning.systems.Participation", "--model.participation.dropout_ratio", "0.3"]
    main(["fit", *args])
    main(["fit", *args, "--config", str(Path(QUICK).parent / "systems/secure_aggregation.yaml")])
    plain, secure = _ckpts(tmp_path, 0)["round=2.ckpt"], _ckpts(tmp_path, 1)["round=2.ckpt"]
    wp, ws = _weights(plain), _weights(secure)
    diff = max(float((wp[k] - ws[k]).abs().max()) for k in wp)
    assert 0.0 < diff < 1e-5  # the decoded sum is the fixed-point sum (2^-24 steps), not bitwise
    rows = [r for r in _metrics(tmp_path, 1) if r["train_loss"]]
    d = sum(_sizes(tmp_path, 1))
    assert [float(r["dropped_clients"]) for r in rows] == [3.0, 3.0]
    assert [float(r["bytes_up"]) for r in rows] == [7 * 8 * d] * 2  # int64 ring elements


def test_resume_with_top_k_error_feedback_is_bit_identical(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*BASE, "--model.algorithm", "fl_lightning.algorithms.FedAvg",
            "--config", str(Path(QUICK).parent / "systems/topk_10.yaml"),
            "--model.attack", "fl_lightning.systems.GaussianUpdate",
            "--model.attack.std", "0.01", "--trainer.max_steps", "4",
            "--checkpoint_every_n_rounds", "2", "--keep_last_checkpoints", "5"]
    main(["fit", *args])
    first = _ckpts(tmp_path, 0)
    state = torch.load(first["round=2.ckpt"], weights_only=False)
    residuals = state["fl_systems_state"]["compressor"]["residuals"]["clients"]
    assert 10 < len(residuals) <= 20  # every client sampled in rounds 0 and 1
    assert all(v["e"]["flat"].device.type == "cpu" for v in residuals.values())
    main(["fit", *args, "--ckpt_path", str(first["round=2.ckpt"])])
    _assert_same(first["round=4.ckpt"], _ckpts(tmp_path, 1)["round=4.ckpt"])
    assert _final(tmp_path, 1)["bytes_up_total"] == _final(tmp_path, 0)["bytes_up_total"]
    # the residuals matter: resuming without them gives other weights
    del state["fl_systems_state"]
    torch.save(state, tmp_path / "no_residuals.ckpt")
    main(["fit", *args, "--ckpt_path", str(tmp_path / "no_residuals.ckpt")])
    w4, w_lost = _weights(first["round=4.ckpt"]), _weights(_ckpts(tmp_path, 2)["round=4.ckpt"])
    assert any(not torch.equal(w4[k], w_lost[k]) for k in w4)


def test_label_flip_changes_only_the_malicious_clients_labels():
    indices = [torch.arange(5 * k, 5 * k + 5) for k in range(10)]
    y = torch.arange(50) % 10
    systems = Systems(attack=LabelFlip(share=0.3))
    x, flipped = systems.training_data((torch.zeros(50, 2), y), indices, 0, 10)
    bad = malicious_clients(0, 10, 0.3)
    assert len(bad) == 3
    for k, idx in enumerate(indices):
        expected = 9 - y[idx] if k in bad else y[idx]
        assert torch.equal(flipped[idx], expected)
