"""Heterogeneity report: numbers on a hand-checked example, JSON + PNG output, the command, and
the reference-exact MNIST partitions of the paper (when the real data is present)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fl_lightning.callbacks.heterogeneity import HeterogeneityReport
from fl_lightning.data.heterogeneity import heterogeneity_report, main, write_report
from fl_lightning.data.module import FederatedDataModule

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_report_numbers_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    clients = [np.array([0, 1, 2]), np.array([3, 5]), np.array([4, 6, 7])]
    r = heterogeneity_report(labels, clients, num_classes=4, class_names="abcd")
    assert r["class_counts"] == [[3, 0, 0, 0], [0, 1, 1, 0], [0, 1, 2, 0]]
    assert r["client_sizes"] == [3, 2, 3] and r["num_samples"] == 8
    assert r["global_distribution"] == pytest.approx([3 / 8, 2 / 8, 3 / 8, 0])
    assert r["per_client"]["classes"] == [1, 2, 2]
    # TV(p, q) = 1/2 sum |p - q|: client 0 p = (1, 0, 0, 0) -> 1/2 (5/8 + 2/8 + 3/8) = 5/8
    # client 2: p = (0, 1/3, 2/3, 0) -> 1/2 (3/8 + 1/12 + 7/24) = 3/8
    assert r["per_client"]["tv_distance"] == pytest.approx([5 / 8, 3 / 8, 3 / 8], abs=1e-6)
    js = r["per_client"]["js_divergence"]
    assert all(0 < v < 1 for v in js)
    p, q = np.array([1, 0, 0.0]), np.array([3, 2, 3]) / 8
    m = (p + q) / 2
    ref = 0.5 * np.sum(p[p > 0] * np.log2(p[p > 0] / m[p > 0])) + 0.5 * np.sum(q * np.log2(q / m))
    assert js[0] == pytest.approx(ref, abs=1e-6)
    s = r["summary"]
    assert s["size"]["min"] == 2 and s["size"]["max"] == 3
    assert s["size"]["cv"] == pytest.approx(np.std([3, 2, 3]) / np.mean([3, 2, 3]))
    assert s["classes_per_client"]["mean"] == pytest.approx(5 / 3)
    assert r["class_names"] == ["a", "b", "c", "d"]
    same = heterogeneity_report(labels, [np.arange(8)], num_classes=3)
    assert same["per_client"]["tv_distance"] == [0.0] and same["per_client"]["js_divergence"] == [0]


def test_write_report_json_and_png(tmp_path):
    labels = np.random.default_rng(0).integers(0, 10, 500)
    clients = np.array_split(np.argsort(labels, kind="stable"), 20)
    report = heterogeneity_report(labels, clients, num_classes=10)
    json_path, png_path = write_report(report, tmp_path / "out" / "rep", "title")
    assert json.loads(Path(json_path).read_text()) == json.loads(json.dumps(report))
    with Image.open(png_path) as img:
        assert img.format == "PNG" and img.size[0] > 20 * 2 and img.size[1] > 10 * 6
        pixels = np.asarray(img.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 5  # a coloured heatmap


def test_command_and_callback(tmp_path, capsys):
    prefix = tmp_path / "digits_lda"
    main(["--data.dataset", "digits", "--data.num_clients", "10", "--data.partition", "lda",
          "--data.alpha", "0.5", "--out", str(prefix)])
    out = capsys.readouterr().out
    assert "digits, 10 clients, lda alpha=0.5" in out
    report = json.loads(prefix.with_suffix(".json").read_text())
    assert report["num_clients"] == 10 and report["num_samples"] == 1437
    assert prefix.with_suffix(".png").is_file()
    with pytest.raises(SystemExit) as info:
        main(["--data.dataset", "digits", "--data.alpha", "-1", "--out", str(prefix)])
    assert info.value.code == 2
    assert "--data.alpha=-1" in capsys.readouterr().err

    class _Trainer:
        is_global_zero = True
        log_dir = str(tmp_path / "logs")
        datamodule = FederatedDataModule(dataset="digits", num_clients=5, partition="iid")

    cb = HeterogeneityReport()
    cb.on_fit_start(_Trainer(), None)
    assert cb.report["client_sizes"] == [288, 288, 287, 287, 287]
    assert Path(cb.paths[0]).parent == tmp_path / "logs" and Path(cb.paths[1]).is_file()


@pytest.mark.skipif(not (SHARED / "MNIST" / "raw").is_dir(), reason="real MNIST not present")
@pytest.mark.parametrize(
    ("partition", "sizes", "first_five"),
    [
        ({"partition": "shard", "shards_per_client": 2}, (563, 600, 674),
         [567, 595, 569, 594, 563]),
        ({"partition": "lda", "alpha": 0.1}, (12, 600, 2146), [81, 157, 752, 507, 191]),
    ],
)
def test_reference_partition_of_real_mnist(partition, sizes, first_five):
    dm = FederatedDataModule(dataset="mnist", data_dir=str(SHARED), num_clients=100,
                             seed=19940817, reference_partition=True, **partition)
    dm.setup("fit")
    report = heterogeneity_report(dm.train_y, dm.client_indices, 10)
    s = report["summary"]["size"]
    assert (s["min"], s["mean"], s["max"]) == sizes
    assert report["client_sizes"][:5] == first_five
