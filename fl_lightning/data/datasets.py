"""Datasets as normalized in-memory tensors.

``load_dataset`` returns ``x`` float32 ``(N, C, H, W)``, already normalized, and ``y`` int64
``(N,)``.

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes); needs no files. A fixed
  stratified 80/20 train/test split (scikit-learn's ``train_test_split``, stored as bits so that
  loading imports no scikit-learn); pixels / 16, then normalized with the train split's
  mean/std.
* ``mnist``: ``torchvision.datasets.MNIST`` (files in ``data_dir/MNIST/raw/*-ubyte``), scaled to
  [0, 1] and normalized with mean 0.1307 / std 0.3081.
* ``cifar10``, ``svhn``, ``cinic10``: 32x32 RGB, read from their distributed formats by
  :mod:`fl_lightning.data.vision`, scaled to [0, 1] and normalized per channel with the official
  FedSoL code's constants (:data:`NORMALIZATION`).
* every single-label MedMNIST 2D flag (``pathmnist``, ``tissuemnist``, ...): the medmnist
  classes at size 28 (file ``<flag>.npz`` in ``data_dir/medmnist/`` or ``data_dir/``), scaled to
  [0, 1] and normalized with mean 0.5 / std 0.5 per channel; grayscale gives 1 channel, RGB 3.
  As in the official FedSoL code the ``train`` split is the file's train *and* val images.

Grayscale inputs stay 1-channel tensors; the models repeat them to 3 channels at their input,
which is the same as the official code's ``convert("RGB")`` (and costs a third of the memory).

Files are checked against the MD5 checksums the libraries ship (``verify=True``, see
:mod:`fl_lightning.data.checksums`). Nothing is written into ``data_dir`` unless ``download`` is
true. PyTorch, torchvision, medmnist, scipy and scikit-learn are imported lazily, inside the
functions that need them: :func:`load_labels` of ``digits`` imports none of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fl_lightning.data.checksums import MNIST_RAW_MD5, check_file
from fl_lightning.data.leaf import LEAF
from fl_lightning.data.medmnist import (  # noqa: F401 - re-exported: their old home
    _MULTI_LABEL_TASK,
    MEDMNIST_MEAN,
    MEDMNIST_SIZE,
    MEDMNIST_STD,
    _load_medmnist,
    _medmnist,
    _medmnist_2d_flags,
    _medmnist_entry,
    _medmnist_flags,
)
from fl_lightning.errors import ConfigError, DataNotFoundError, exception_line

if TYPE_CHECKING:
    import torch

__all__ = ["DatasetInfo", "NORMALIZATION", "available_datasets", "dataset_info", "load_dataset",
           "load_labels", "normalization"]

SPLITS: tuple[str, ...] = ("train", "test")

#: Mean and std of the ``digits`` train split after scaling pixels to [0, 1] (pixel / 16).
DIGITS_MEAN = 0.30538339422407795
DIGITS_STD = 0.3761191680900195
#: The fixed stratified split of ``digits``: test fraction and ``random_state``.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: Per-channel (mean, std) of the 32x32 RGB datasets, as in the official FedSoL code.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
    "svhn": ((0.4376821, 0.4437697, 0.47280442), (0.19803012, 0.20101562, 0.19703614)),
    "cinic10": ((0.47889522, 0.47227842, 0.43047404), (0.24205776, 0.23828046, 0.25874835)),
}
RGB32 = tuple(NORMALIZATION)

#: Datasets generated already split into devices (``--data.partition natural``), see
#: :mod:`fl_lightning.data.natural` and :mod:`fl_lightning.data.population`: the FedProx
#: paper's synthetic data, 60 features, 10 classes.
GENERATED = ("synthetic", "synthetic_iid", "synthetic_population")
#: Every dataset that arrives split into devices or users: the generated ones and the LEAF JSON
#: sets (:mod:`fl_lightning.data.leaf`, one client per user).
NATURAL = (*GENERATED, *LEAF)

@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, known without reading any file."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of the tensors load_dataset returns


# --------------------------------------------------------------------------------------------
# Names and metadata
# --------------------------------------------------------------------------------------------


def available_datasets() -> list[str]:
    """Every name ``load_dataset`` accepts."""
    return ["digits", "mnist", *RGB32, *NATURAL, *_medmnist_flags()]


def _canonical(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"--data.dataset={name!r} is invalid; use digits, mnist, cifar10, svhn, cinic10, "
            "synthetic, synthetic_iid, synthetic_population, a LEAF set (femnist, shakespeare, "
            "sent140, synthetic_leaf) or any MedMNIST 2D flag such as pathmnist"
        )
    return name.strip().lower()


def dataset_info(name: str) -> DatasetInfo:
    """Classes and input shape of ``name``; reads no file."""
    name = _canonical(name)
    if name == "digits":
        return DatasetInfo("digits", 10, (1, 8, 8))
    if name == "mnist":
        return DatasetInfo("mnist", 10, (1, 28, 28))
    if name in LEAF:
        return DatasetInfo(name, *LEAF[name])
    if name in GENERATED:
        return DatasetInfo(name, 10, (1, 1, 60))
    if name in RGB32:
        return DatasetInfo(name, 10, (3, 32, 32))
    entry = _medmnist_entry(name)
    return DatasetInfo(
        name, len(entry["label"]), (int(entry["n_channels"]), MEDMNIST_SIZE, MEDMNIST_SIZE)
    )


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` that :func:`load_dataset` applied to ``name``'s pixels in [0, 1].

    Augmentations that pad with black pixels use it to know what black is after normalization.

    Example:
        >>> normalization("mnist")
        ((0.1307,), (0.3081,))
    """
    info = dataset_info(name)
    channels = info.input_shape[0]
    if info.name == "digits":
        return (DIGITS_MEAN,), (DIGITS_STD,)
    if info.name == "mnist":
        return (MNIST_MEAN,), (MNIST_STD,)
    if info.name in NORMALIZATION:
        return NORMALIZATION[info.name]
    return (MEDMNIST_MEAN,) * channels, (MEDMNIST_STD,) * channels


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None,
    download: bool,
    split: str,
    verify: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of a dataset as normalized tensors.

    Args:
        name: ``digits``, ``mnist`` or a MedMNIST 2D flag (``--data.dataset``).
        data_dir: folder holding the files (``--data.data_dir``); unused by ``digits``.
        download: fetch missing files from the internet (``--data.download``). When false,
            nothing is written anywhere under ``data_dir``.
        split: ``"train"`` or ``"test"``.
        verify: check the files' MD5 checksums (``--data.verify_checksums``).

    Returns:
        ``(x, y)``: x float32 ``(N, C, H, W)`` normalized, y int64 ``(N,)``.

    Raises:
        ConfigError: unknown dataset or invalid argument.
        DataNotFoundError: files missing, unreadable or corrupt (or the download failed).
    """
    name = _canonical(name)
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is invalid; use 'train' or 'test'")
    if not isinstance(download, bool):
        raise ConfigError(f"--data.download={download!r} is invalid; use true or false")
    if not isinstance(verify, bool):
        raise ConfigError(f"--data.verify_checksums={verify!r} is invalid; use true or false")
    if name == "digits":
        return _load_digits(split)
    if name in NATURAL:
        raise ConfigError(
            f"--data.dataset={name} is read or generated per device (user) by "
            "FederatedDataModule with --data.partition natural, not loaded as one split"
        )
    if name == "mnist":
        return _load_mnist(_data_root(name, data_dir), download, split, verify)
    if name in RGB32:
        from fl_lightning.data import vision

        loader = {"cifar10": vision.load_cifar10, "svhn": vision.load_svhn,
                  "cinic10": vision.load_cinic10}[name]
        images, labels = loader(_data_root(name, data_dir), download, split, verify)
        mean, std = NORMALIZATION[name]
        return _normalize_uint8(images, mean, std), labels
    entry = _medmnist_entry(name)
    return _load_medmnist(name, entry, _data_root(name, data_dir), download, split, verify)


def load_labels(
    name: str, data_dir: str | os.PathLike | None, split: str, verify: bool = True
) -> np.ndarray:
    """The int64 labels of one split, in :func:`load_dataset`'s order and with its checks
    (nothing is downloaded). ``digits`` reads them without importing PyTorch or scikit-learn,
    which is what makes a Flower discovery query cheap; the other datasets load the split."""
    if _canonical(name) == "digits" and split in SPLITS:
        table, rows = _digits_split(split)
        return table[rows, -1].astype(np.int64)
    return load_dataset(name, data_dir, False, split, verify)[1].numpy()


def _data_root(name: str, data_dir) -> str:
    if data_dir is None or not os.fspath(data_dir):
        raise ConfigError(
            f"--data.data_dir is not set but dataset {name!r} reads files; "
            "set --data.data_dir <folder with the data> (or use --data.dataset digits)"
        )
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def _normalize_uint8(images: torch.Tensor, mean, std) -> torch.Tensor:
    """``(images / 255 - mean) / std`` per channel of a uint8 ``(N, C, H, W)`` tensor."""
    import torch

    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return images.to(torch.float32).div_(255.0).sub_(mean_t).div_(std_t).contiguous()


# digits ------------------------------------------------------------------------------------


#: ``train_test_split(arange(1797), test_size=DIGITS_TEST_FRACTION,
#: random_state=DIGITS_SPLIT_SEED, stratify=target)`` of scikit-learn: its test rows as bits
#: (``np.packbits``), valid for the labels whose SHA-256 is :data:`DIGITS_LABELS_SHA256`.
#: Importing scikit-learn costs seconds in every fresh process (each Flower ClientApp, each
#: command-line start); tests/test_datasets.py checks the bits against scikit-learn itself.
DIGITS_TEST_BITS = (
    "000004883524104000064100934205001a00080100240028062c12001000940a009019120420f8a0028110a0"
    "00080a8820441524494240a00a0000004004d80000818020004805c400104008a0100005404800301000020e"
    "c409000224840083a8013c20a6980a0000000b08400804a0184802024041c1008004404684376a8102160044"
    "80004042a0a4180a5000840b8561c608108008004c80c02004068e00010882008100380803c008190000100e"
    "01008410a0210033282904c044c080680e0102830082008822a6402c24042108a860809081a00c02820242120"
    "138a41500"
)
DIGITS_LABELS_SHA256 = "a3c91c262eddcf7ba8f0e37507c30284493c9b20412ffe4af30d536401f7ba21"
DIGITS_FILE = ("datasets", "data", "digits.csv.gz")  # inside the scikit-learn package


def _digits_table() -> np.ndarray:
    """scikit-learn's bundled ``digits.csv.gz`` (1797 rows: 64 pixels, then the label), read
    with numpy from the installed package's folder without importing scikit-learn."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(folders[0], *DIGITS_FILE) if folders else None
    if path is None or not os.path.isfile(path):
        raise DataNotFoundError(
            "the digits dataset is scikit-learn's bundled file "
            f"sklearn/{'/'.join(DIGITS_FILE)}, which was not found: install scikit-learn "
            "(pip install scikit-learn) or use another --data.dataset"
        )
    try:
        return np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError, EOFError) as exc:
        raise DataNotFoundError(
            f"{path} is unreadable ({exception_line(exc)}): reinstall scikit-learn "
            "(pip install --force-reinstall scikit-learn)"
        ) from None


def digits_test_rows(labels: np.ndarray) -> np.ndarray:
    """Which rows of ``digits`` are the test split (a boolean mask): scikit-learn's stratified
    ``train_test_split`` with :data:`DIGITS_TEST_FRACTION` and :data:`DIGITS_SPLIT_SEED`,
    taken from :data:`DIGITS_TEST_BITS` for the known labels, computed otherwise."""
    import hashlib

    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if hashlib.sha256(labels.tobytes()).hexdigest() == DIGITS_LABELS_SHA256:
        bits = np.frombuffer(bytes.fromhex(DIGITS_TEST_BITS), dtype=np.uint8)
        return np.unpackbits(bits, count=len(labels)).astype(bool)
    from sklearn.model_selection import train_test_split

    _, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED, stratify=labels,
    )
    mask = np.zeros(len(labels), dtype=bool)
    mask[test_idx] = True
    return mask


def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The bundled table and the rows of ``split`` in it, in file order."""
    table = _digits_table()
    test = digits_test_rows(table[:, -1].astype(np.int64))
    return table, np.flatnonzero(test if split == "test" else ~test)


def _load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    table, rows = _digits_split(split)
    images = table[rows, :-1].reshape(-1, 8, 8).astype(np.float32) / 16.0
    x = (torch.from_numpy(images).unsqueeze(1) - DIGITS_MEAN) / DIGITS_STD
    return x.to(torch.float32).contiguous(), torch.from_numpy(table[rows, -1].astype(np.int64))


# mnist -------------------------------------------------------------------------------------


def _mnist_fix_hint() -> str:
    return (
        "set --data.data_dir <folder containing MNIST/raw> or --data.download true on a machine "
        "with internet"
    )


def _mnist_error(root: str, download: bool, split: str, exc: Exception) -> DataNotFoundError:
    raw = os.path.join(root, "MNIST", "raw")
    needed = [f for pair in MNIST_FILES.values() for f in pair]
    missing = [f for f in needed if not os.path.isfile(os.path.join(raw, f))]
    if missing and download:
        return DataNotFoundError(
            f"dataset 'mnist': download into {raw} failed ({exception_line(exc)}); check the "
            "internet connection, or copy the MNIST files there and set --data.download false"
        )
    if missing:
        hints = []
        if all(os.path.isfile(os.path.join(raw, f + ".gz")) for f in missing):
            hints.append("only .gz archives are there: gunzip them or use --data.download true")
        if os.path.isfile(os.path.join(root, "raw", needed[0])):
            hints.append(f"{root} looks like the MNIST folder itself: pass its parent folder")
        if os.path.isfile(os.path.join(root, needed[0])):
            hints.append(f"{root} holds the files directly: move them into {raw}")
        extra = f" ({'; '.join(hints)})" if hints else ""
        shown = ", ".join(f"{f} (md5 {MNIST_RAW_MD5[f]})" for f in missing)
        return DataNotFoundError(
            f"dataset 'mnist': missing {shown} in {raw} (--data.data_dir={root}, "
            f"--data.download false){extra}; {_mnist_fix_hint()}"
        )
    bad = _find_bad_mnist_file(raw, split)
    if bad is not None:
        path, err = bad
        return DataNotFoundError(
            f"dataset 'mnist': file {path} is corrupt or unreadable ({err}); replace it with the "
            f"original file or {_mnist_fix_hint()}"
        )
    return DataNotFoundError(
        f"dataset 'mnist': could not read the data in {raw} ({exception_line(exc)}); replace "
        f"the files with the originals or {_mnist_fix_hint()}"
    )


def _find_bad_mnist_file(raw: str, split: str) -> tuple[str, str] | None:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    image_file, label_file = MNIST_FILES[split]
    for fname, reader in ((image_file, read_image_file), (label_file, read_label_file)):
        path = os.path.join(raw, fname)
        try:
            reader(path)
        except AssertionError:  # torchvision asserts on the IDX magic number
            return path, "invalid IDX header"
        except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
            return path, exception_line(exc)
    return None


def _load_mnist(
    root: str, download: bool, split: str, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(root=root, train=split == "train", download=download)
    except Exception as exc:  # noqa: BLE001 - re-raised as our own single-line error
        raise _mnist_error(root, download, split, exc) from None
    for fname in MNIST_FILES[split]:
        check_file(
            "mnist", os.path.join(ds.raw_folder, fname), MNIST_RAW_MD5[fname],
            "copy the original (the gunzipped official archive) there, "
            + _mnist_fix_hint(), verify,
        )

    data, targets = ds.data, ds.targets
    image_path, label_path = (os.path.join(ds.raw_folder, f) for f in MNIST_FILES[split])
    if data.ndim != 3 or tuple(data.shape[1:]) != (28, 28) or data.dtype != torch.uint8:
        raise DataNotFoundError(
            f"dataset 'mnist': file {image_path} holds {tuple(data.shape)} {data.dtype} images, "
            f"expected (N, 28, 28) uint8; replace it with the original or {_mnist_fix_hint()}"
        )
    if targets.ndim != 1 or len(targets) != len(data):
        raise DataNotFoundError(
            f"dataset 'mnist': file {label_path} holds {tuple(targets.shape)} labels for "
            f"{len(data)} images; replace it with the original or {_mnist_fix_hint()}"
        )
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) > 9):
        raise DataNotFoundError(
            f"dataset 'mnist': file {label_path} holds labels outside 0..9; replace it with the "
            f"original or {_mnist_fix_hint()}"
        )
    x = _normalize_uint8(data.unsqueeze(1), MNIST_MEAN, MNIST_STD)
    return x, targets.to(torch.int64)
