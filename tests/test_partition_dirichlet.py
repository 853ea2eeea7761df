"""Tests of the ``dirichlet`` partition (pfl-research's per-client Dirichlet class priors) and
of configs/pfl/cifar10_dirichlet.yaml. About 3 s in all, most of it the one-round CLI fit."""

from __future__ import annotations

import glob
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from datafiles import write_cifar10

from fl_lightning.cli import main
from fl_lightning.data.module import FederatedDataModule
from fl_lightning.data.partition import partition_indices
from fl_lightning.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _pfl_scalar(labels: np.ndarray, alpha: float, size: int, seed: int, users: int) -> list:
    """pfl-research's loop as it reads, one uniform per class draw (numpy's legacy global
    generator seeded with ``seed``, played by a private RandomState): the vectorized mode must
    give the same users, sample for sample."""
    rs = np.random.RandomState(seed)
    order = rs.permutation(len(labels))
    shuffled = labels[order]
    num_classes = len(np.unique(labels))
    remaining = [list(np.flatnonzero(shuffled == c)) for c in range(num_classes)]
    out = []
    for _ in range(users):
        priors = rs.dirichlet([alpha] * num_classes)
        cdf = np.cumsum(priors)
        cdf[-1] = 1.0
        user: list[int] = []
        attempt = 1
        while len(user) < size:
            c = int(np.argmax(rs.uniform() < cdf))
            if remaining[c]:
                user.append(remaining[c].pop())
            if attempt % (size * 20) == 0:
                priors += 0.02
                priors /= sum(priors)
                cdf = np.cumsum(priors)
                priors[-1] = 1.0
            attempt += 1
        out.append(order[np.asarray(user, dtype=np.int64)])
    return out


def _class_counts(y: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    return np.stack([np.bincount(y[p], minlength=num_classes) for p in parts])


def test_dirichlet_equals_pfl_scalar_loop_including_exhausted_classes():
    # 6 classes of unequal size, all data handed out: the last clients find classes exhausted,
    # so the spread (every size * 20 draws) and its quirk are exercised
    y = np.random.default_rng(1).choice(6, size=600, p=[0.3, 0.25, 0.2, 0.1, 0.1, 0.05])
    parts = partition_indices(y, 30, "dirichlet", alpha=0.1, client_size=20, seed=7)
    want = _pfl_scalar(y, 0.1, 20, 7, 30)
    assert all(np.array_equal(p, q) for p, q in zip(parts, want, strict=True))
    assert all(p.dtype == np.int64 and len(p) == 20 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(600))  # disjoint, all used


def test_dirichlet_sizes_skew_and_determinism_cifar_shaped():
    y = np.repeat(np.arange(10), 500)  # 5,000 CIFAR-10 shaped labels, 100 clients x 50
    skew = {}
    for alpha in (0.1, 100.0):
        parts = partition_indices(y, 100, "dirichlet", alpha=alpha, seed=0)
        assert [len(p) for p in parts] == [50] * 100
        assert len(np.unique(np.concatenate(parts))) == 5000
        counts = _class_counts(y, parts, 10)
        skew[alpha] = (counts.max(axis=1) / 50).mean(), (counts > 0).sum(axis=1).mean()
    # Dir(0.1) over 10 classes: the top class holds about 2/3 of a client's samples in
    # expectation (0.74 before exhaustion; the last clients are spread); Dir(100): near 1/10
    assert skew[0.1][0] > 0.6 and skew[100.0][0] < 0.25
    assert skew[0.1][1] < 5 and skew[100.0][1] > 9
    a = partition_indices(y, 100, "dirichlet", alpha=0.1, seed=3)
    b = partition_indices(y, 100, "dirichlet", alpha=0.1, seed=3)
    c = partition_indices(y, 100, "dirichlet", alpha=0.1, seed=4)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_dirichlet_uses_only_a_prefix_of_pfls_users_when_fewer_clients():
    y = np.repeat(np.arange(10), 100)
    all_users = partition_indices(y, 50, "dirichlet", alpha=0.5, client_size=20, seed=2)
    first = partition_indices(y, 10, "dirichlet", alpha=0.5, client_size=20, seed=2)
    assert all(np.array_equal(p, q) for p, q in zip(first, all_users[:10], strict=True))


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(num_clients=1000, client_size=60), "--data.client_size=60.*60000 > 50000.*at most 50"),
    (dict(num_clients=1000, client_size=0), "--data.client_size=0 is invalid"),
    (dict(num_clients=10, client_size=5, method="lda"), "only used by --data.partition dirichlet"),
    (dict(num_clients=10, reference=True), "--data.reference_partition false"),
    (dict(num_clients=10, alpha=0.0), "--data.alpha=0.0"),
])
def test_dirichlet_impossible_settings_are_config_errors(kwargs, needle):
    y = np.repeat(np.arange(10), 5000)
    kwargs = {"method": "dirichlet", **kwargs}
    with pytest.raises(ConfigError, match=needle):
        partition_indices(y, kwargs.pop("num_clients"), kwargs.pop("method"), **kwargs)


def test_datamodule_rejects_client_size_outside_dirichlet():
    with pytest.raises(ConfigError, match="--data.client_size=5 is only used"):
        FederatedDataModule(dataset="digits", num_clients=10, partition="iid", client_size=5)


def test_pfl_cifar10_dirichlet_config_runs_one_round_batched(tmp_path, monkeypatch):
    config = REPO / "configs/pfl/cifar10_dirichlet.yaml"
    data = yaml.safe_load(config.read_text())["data"]
    assert (data["partition"], data["alpha"], data["num_clients"], data["client_size"]) == (
        "dirichlet", 0.1, 1000, 50)
    monkeypatch.setattr(sys, "argv", ["fl-lightning"])
    write_cifar10(tmp_path / "data", per_batch=8)  # 40 training images in the real format
    out = tmp_path / "run"
    main([
        "fit", "--config", str(config),
        "--data.data_dir", str(tmp_path / "data"), "--data.verify_checksums", "false",
        "--data.num_clients", "8", "--data.client_size", "5", "--model.sample_ratio", "0.5",
        "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(out), "--trainer.default_root_dir", str(out),
    ])
    [final] = glob.glob(str(out / "**" / "final_metrics.json"), recursive=True)
    assert '"rounds": 1' in Path(final).read_text()
    [saved] = glob.glob(str(out / "**" / "config.yaml"), recursive=True)
    text = Path(saved).read_text()
    assert "partition: dirichlet" in text and "BatchedEngine" in text
