"""Tests of fl_lightning.data.datasets on tiny files in the real on-disk formats."""

from __future__ import annotations

import ast
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_lightning.data import datasets as ds
from fl_lightning.data import partition
from fl_lightning.data.datasets import (
    DatasetInfo,
    available_datasets,
    dataset_info,
    load_dataset,
)
from fl_lightning.errors import ConfigError, DataNotFoundError

REPO = Path(__file__).resolve().parents[1]


# ---- writers for the libraries' own file formats ----


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX file as read by torchvision: big-endian magic 0x0800 + ndim (2049 labels, 2051
    images), one big-endian uint32 per dimension, then the uint8 data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


MNIST_TRAIN_LABELS = np.array([7, 0, 3], dtype=np.uint8)
MNIST_TEST_LABELS = np.array([9, 1], dtype=np.uint8)


def _mnist_images(n: int) -> np.ndarray:
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[0, 0, 0] = 255
    images[0, 5, 7] = 51
    images[-1, 27, 27] = 102
    return images


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", _mnist_images(3))
    write_idx(raw / "train-labels-idx1-ubyte", MNIST_TRAIN_LABELS)
    write_idx(raw / "t10k-images-idx3-ubyte", _mnist_images(2))
    write_idx(raw / "t10k-labels-idx1-ubyte", MNIST_TEST_LABELS)
    return tmp_path


def write_medmnist(path: Path, channels: int, sizes=(4, 2, 3), num_classes=2, keys=None) -> dict:
    """A MedMNIST .npz: {split}_images uint8 (N, 28, 28[, 3]) and {split}_labels uint8 (N, 1)."""
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        shape = (n, 28, 28) if channels == 1 else (n, 28, 28, 3)
        images = np.zeros(shape, dtype=np.uint8)
        if channels == 1:
            images[0, 2, 5] = 255
            images[0, 3, 4] = 51
        else:
            images[0, 2, 5] = [255, 0, 51]
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = (np.arange(n) % num_classes).astype(np.uint8).reshape(n, 1)
    if keys is not None:
        arrays = {k: v for k, v in arrays.items() if k in keys}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def snapshot(folder: Path) -> dict:
    """Every file and folder under ``folder`` with size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def norm(value: float, mean: float, std: float) -> float:
    return (value / 255.0 - mean) / std


def assert_one_line(message: str) -> None:
    assert "\n" not in message and message.strip() == message


# ---- names and metadata ----


def test_available_datasets():
    names = available_datasets()
    assert names[:2] == ["digits", "mnist"]
    assert {"pathmnist", "pneumoniamnist", "breastmnist", "dermamnist"} <= set(names)
    assert "chestmnist" not in names
    assert not any(n.endswith("3d") for n in names)


def test_dataset_info_values():
    assert dataset_info("digits") == DatasetInfo("digits", 10, (1, 8, 8))
    assert dataset_info("mnist") == DatasetInfo("mnist", 10, (1, 28, 28))
    assert dataset_info("pathmnist") == DatasetInfo("pathmnist", 9, (3, 28, 28))
    assert dataset_info("pneumoniamnist") == DatasetInfo("pneumoniamnist", 2, (1, 28, 28))
    for name in available_datasets():
        info = dataset_info(name)
        assert info.name == name and info.num_classes >= 2 and len(info.input_shape) == 3


@pytest.mark.parametrize(
    ("name", "needle"),
    [("chestmnist", "multi-label"), ("organmnist3d", "3D"), ("cifar100", "pathmnist")],
)
def test_rejected_names(name, needle, tmp_path):
    for call in (
        lambda: dataset_info(name),
        lambda: load_dataset(name, tmp_path, False, "train", verify=False),
    ):
        with pytest.raises(ConfigError) as info:
            call()
        message = str(info.value)
        assert "--data.dataset" in message and name in message and needle in message
        assert not isinstance(info.value, DataNotFoundError)
        assert_one_line(message)


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="split"):
        load_dataset("digits", None, False, "val")
    with pytest.raises(ConfigError, match="--data.download"):
        load_dataset("mnist", tmp_path, "yes", "train", verify=False)
    with pytest.raises(ConfigError, match="--data.data_dir"):
        load_dataset("mnist", None, False, "train", verify=False)


@pytest.mark.parametrize("module", [ds, partition])
def test_heavy_libraries_imported_lazily(module):
    """No module-level import of torchvision, medmnist or scikit-learn."""
    tree = ast.parse(Path(module.__file__).read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert not top & {"torchvision", "medmnist", "sklearn"}


# medmnist's ~/.medmnist is removed again, and digits are read without scikit-learn, in a fresh
# process: tests/test_feel.py::test_fresh_process_writes_only_under_its_run_folders


# ---- digits ----


def test_digits_offline_shapes_and_split():
    x_tr, y_tr = load_dataset("digits", None, False, "train")
    x_te, y_te = load_dataset("digits", "/nonexistent", False, "test")
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert y_tr.shape == (1437,) and y_te.shape == (360,)
    assert len(y_tr) + len(y_te) == 1797
    # stratified: every class in both splits, in proportion
    assert torch.bincount(y_te).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    assert abs(float(x_tr.mean())) < 1e-5 and abs(float(x_tr.std()) - 1) < 1e-4
    x_again, _ = load_dataset("digits", None, False, "train")
    assert torch.equal(x_tr, x_again)


def test_digits_constants_are_train_statistics():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    train_idx, _ = train_test_split(
        np.arange(len(bunch.target)),
        test_size=ds.DIGITS_TEST_FRACTION,
        random_state=ds.DIGITS_SPLIT_SEED,
        stratify=bunch.target,
    )
    pixels = bunch.images[train_idx].astype(np.float64) / 16.0
    assert ds.DIGITS_MEAN == pytest.approx(pixels.mean(), abs=1e-12)
    assert ds.DIGITS_STD == pytest.approx(pixels.std(), abs=1e-12)
    x, y = load_dataset("digits", None, False, "train")
    k = int(np.sort(train_idx)[0])
    expected = (bunch.images[k] / 16.0 - ds.DIGITS_MEAN) / ds.DIGITS_STD
    np.testing.assert_allclose(x[0, 0].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert int(y[0]) == bunch.target[k]


def test_digits_split_bits_are_scikit_learns(monkeypatch):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    def sklearn_test_rows(labels):
        _, test_idx = train_test_split(
            np.arange(len(labels)), test_size=ds.DIGITS_TEST_FRACTION,
            random_state=ds.DIGITS_SPLIT_SEED, stratify=labels,
        )
        mask = np.zeros(len(labels), dtype=bool)
        mask[test_idx] = True
        return mask

    target = load_digits().target
    stored = ds.digits_test_rows(target)
    assert np.array_equal(stored, sklearn_test_rows(target)) and stored.sum() == 360
    # other labels (another copy of the file): computed by scikit-learn, not the stored bits
    other = np.random.default_rng(0).permutation(target)
    computed = ds.digits_test_rows(other)
    assert np.array_equal(computed, sklearn_test_rows(other))
    assert not np.array_equal(computed, stored)
    # a missing bundled file: one line naming the fix
    monkeypatch.setattr(ds, "DIGITS_FILE", ("datasets", "data", "no-such-digits.csv.gz"))
    with pytest.raises(DataNotFoundError, match="pip install scikit-learn"):
        load_dataset("digits", None, False, "train")


# ---- MNIST ----


def test_mnist_loads_real_format(mnist_dir):
    before = snapshot(mnist_dir)
    x, y = load_dataset("mnist", mnist_dir, False, "train", verify=False)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == [7, 0, 3] and y.dtype == torch.int64
    m, s = 0.1307, 0.3081
    assert float(x[0, 0, 0, 0]) == pytest.approx(norm(255, m, s), rel=1e-6)
    assert float(x[0, 0, 5, 7]) == pytest.approx(norm(51, m, s), rel=1e-6)
    assert float(x[2, 0, 27, 27]) == pytest.approx(norm(102, m, s), rel=1e-6)
    assert float(x[1, 0, 3, 3]) == pytest.approx(norm(0, m, s), rel=1e-6)
    x_te, y_te = load_dataset("mnist", str(mnist_dir), False, "test", verify=False)
    assert x_te.shape == (2, 1, 28, 28) and y_te.tolist() == [9, 1]
    assert float(x_te[1, 0, 27, 27]) == pytest.approx(norm(102, m, s), rel=1e-6)
    assert tuple(x.shape[1:]) == dataset_info("mnist").input_shape
    assert snapshot(mnist_dir) == before


def test_download_true_with_files_present_reads_them_and_writes_nothing(mnist_dir):
    write_medmnist(mnist_dir / "medmnist" / "breastmnist.npz", channels=1)
    before = snapshot(mnist_dir)
    x, _ = load_dataset("mnist", mnist_dir, True, "train", verify=False)
    assert x.shape == (3, 1, 28, 28)
    x, _ = load_dataset("breastmnist", mnist_dir, True, "train", verify=False)
    assert x.shape == (6, 1, 28, 28)  # train + val
    assert snapshot(mnist_dir) == before


def test_mnist_corrupt_with_download_true_is_reported_as_corrupt(mnist_dir):
    images = mnist_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(b"\x00\x00\x00\x00" + images.read_bytes()[4:])
    with pytest.raises(DataNotFoundError, match="invalid IDX header") as info:
        load_dataset("mnist", mnist_dir, True, "train", verify=False)
    assert str(images) in str(info.value) and "download" not in str(info.value).split(";")[0]


def test_mnist_missing_files(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", tmp_path, False, "train", verify=False)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "--data.data_dir" in message and "--data.download true" in message
    assert_one_line(message)
    assert os.listdir(tmp_path) == []  # nothing created


def test_mnist_one_missing_file_named(mnist_dir):
    (mnist_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    needle = "missing t10k-labels-idx1-ubyte .md5 27ae3e4e09519cfbb04c329615203637. in"
    with pytest.raises(DataNotFoundError, match=needle):
        load_dataset("mnist", mnist_dir, False, "train", verify=False)


def test_mnist_parent_folder_hint(mnist_dir):
    with pytest.raises(DataNotFoundError, match="looks like the MNIST folder itself"):
        load_dataset("mnist", mnist_dir / "MNIST", False, "train", verify=False)


@pytest.mark.parametrize("damage", ["truncate", "bad_magic", "wrong_count"])
def test_mnist_corrupt_file(mnist_dir, damage):
    raw = mnist_dir / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:-100])
        target = images
    elif damage == "bad_magic":
        images.write_bytes(b"\x00\x00\x00\x00" + images.read_bytes()[4:])
        target = images
    else:  # 2 labels for 3 images
        write_idx(raw / "train-labels-idx1-ubyte", MNIST_TRAIN_LABELS[:2])
        target = raw / "train-labels-idx1-ubyte"
    before = snapshot(mnist_dir)
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", mnist_dir, False, "train", verify=False)
    assert str(target) in str(info.value)
    assert_one_line(str(info.value))
    assert snapshot(mnist_dir) == before


# ---- MedMNIST ----


def test_medmnist_grayscale(tmp_path):
    arrays = write_medmnist(tmp_path / "medmnist" / "pneumoniamnist.npz", channels=1)
    before = snapshot(tmp_path)
    x, y = load_dataset("pneumoniamnist", tmp_path, False, "train", verify=False)
    # the train split is the file's train + val images, as in the official FedSoL code
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 0, 1, 0, 1]
    assert float(x[0, 0, 2, 5]) == pytest.approx(1.0)
    assert float(x[0, 0, 3, 4]) == pytest.approx(norm(51, 0.5, 0.5), rel=1e-6)  # -0.6
    assert float(x[1, 0, 0, 0]) == pytest.approx(-1.0)
    x_te, y_te = load_dataset("pneumoniamnist", tmp_path, False, "test", verify=False)
    assert x_te.shape == (3, 1, 28, 28)
    assert y_te.tolist() == arrays["test_labels"].reshape(-1).tolist()
    assert tuple(x.shape[1:]) == dataset_info("pneumoniamnist").input_shape
    assert snapshot(tmp_path) == before


def test_medmnist_rgb_channels_first_from_data_dir_root(tmp_path):
    # pathmnist.npz directly in data_dir (the fallback location), 9 classes
    write_medmnist(tmp_path / "pathmnist.npz", channels=3, sizes=(5, 1, 2), num_classes=9)
    before = snapshot(tmp_path)
    x, y = load_dataset("pathmnist", tmp_path, False, "train", verify=False)
    assert x.shape == (6, 3, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == [0, 1, 2, 3, 4, 0]  # train + val
    assert x[0, :, 2, 5].tolist() == pytest.approx([1.0, -1.0, norm(51, 0.5, 0.5)], rel=1e-6)
    assert float(x[0, :, 2, 6].abs().sub(1).abs().max()) == 0  # untouched pixels are -1
    assert tuple(x.shape[1:]) == dataset_info("pathmnist").input_shape
    assert snapshot(tmp_path) == before


def test_medmnist_prefers_medmnist_subfolder(tmp_path):
    write_medmnist(tmp_path / "medmnist" / "breastmnist.npz", channels=1, sizes=(2, 1, 1))
    write_medmnist(tmp_path / "breastmnist.npz", channels=1, sizes=(6, 1, 1))
    x, _ = load_dataset("breastmnist", tmp_path, False, "train", verify=False)
    assert len(x) == 3


def test_medmnist_missing_file(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("pathmnist", tmp_path, False, "train", verify=False)
    message = str(info.value)
    assert "pathmnist.npz" in message
    assert str(tmp_path / "medmnist") in message and str(tmp_path) in message
    assert "--data.data_dir" in message and "--data.download true" in message
    assert_one_line(message)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage", ["not_a_zip", "missing_keys", "truncated", "wrong_shape"])
def test_medmnist_corrupt_file(tmp_path, damage):
    path = tmp_path / "medmnist" / "dermamnist.npz"
    if damage == "not_a_zip":
        path.parent.mkdir()
        path.write_bytes(b"this is not an npz file")
    elif damage == "missing_keys":
        write_medmnist(path, channels=3, keys={"test_images", "test_labels"})
    elif damage == "truncated":
        write_medmnist(path, channels=3)
        path.write_bytes(path.read_bytes()[:300])
    else:  # grayscale images where dermamnist (RGB) is expected
        write_medmnist(path, channels=1)
    before = snapshot(tmp_path)
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("dermamnist", tmp_path, False, "train", verify=False)
    assert str(path) in str(info.value)
    assert_one_line(str(info.value))
    assert snapshot(tmp_path) == before


def test_medmnist_labels_out_of_range(tmp_path):
    path = tmp_path / "breastmnist.npz"
    write_medmnist(path, channels=1, num_classes=5)  # labels up to 3, breastmnist has 2
    with pytest.raises(DataNotFoundError, match="labels"):
        load_dataset("breastmnist", tmp_path, False, "train", verify=False)


def test_labels_and_the_grid_check_import_no_pytorch():
    """A Flower node that only reports its partition's size (``load_labels``) and the grid's
    dataset check stay free of PyTorch (~2 s of CPU per process start): nothing they import
    may pull it in (the one-line exception formatter lives in ``fl_lightning.errors``)."""
    import subprocess
    import sys

    code = ("import sys; from fl_lightning.data.datasets import load_labels; "
            "from fl_lightning.grid import Setting, check_datasets; "
            "check_datasets([Setting('digits', 'iid'), Setting('synthetic', 'natural', '1:1')]); "
            "print(sorted(m for m in ('torch', 'lightning', 'medmnist') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
