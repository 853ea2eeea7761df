"""Datasets as normalized in-memory tensors.

``load_dataset`` returns ``x`` float32 ``(N, C, H, W)``, already normalized, and ``y`` int64
``(N,)``.

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes); needs no files. A fixed
  stratified 80/20 train/test split; pixels / 16, then normalized with the train split's mean/std.
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
true. torchvision, medmnist, scipy and scikit-learn are imported lazily, inside the functions
that need them.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from fl_lightning.data.checksums import MNIST_RAW_MD5, check_file
from fl_lightning.errors import ConfigError, DataNotFoundError
from fl_lightning.suggest import did_you_mean

__all__ = ["DatasetInfo", "NORMALIZATION", "available_datasets", "dataset_info", "load_dataset",
           "normalization"]

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

MEDMNIST_MEAN = 0.5
MEDMNIST_STD = 0.5
MEDMNIST_SIZE = 28

#: Per-channel (mean, std) of the 32x32 RGB datasets, as in the official FedSoL code.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
    "svhn": ((0.4376821, 0.4437697, 0.47280442), (0.19803012, 0.20101562, 0.19703614)),
    "cinic10": ((0.47889522, 0.47227842, 0.43047404), (0.24205776, 0.23828046, 0.25874835)),
}
RGB32 = tuple(NORMALIZATION)

_MULTI_LABEL_TASK = "multi-label, binary-class"


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, known without reading any file."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of the tensors load_dataset returns


# --------------------------------------------------------------------------------------------
# Names and metadata
# --------------------------------------------------------------------------------------------


def _medmnist():
    """Import medmnist without leaving behind the ``~/.medmnist`` folder it creates on import.

    medmnist makes its default root at import time even though we always pass ``root``; if the
    folder did not exist before and is still empty, it is removed again.
    """
    default_root = os.path.join(os.path.expanduser("~"), ".medmnist")
    existed = os.path.exists(default_root)
    import medmnist

    if not existed and os.path.isdir(default_root):
        try:
            os.rmdir(default_root)  # only succeeds while empty
        except OSError:
            pass
    return medmnist


def _medmnist_2d_flags(info: dict) -> list[str]:
    return [f for f, i in info.items() if not i["python_class"].endswith("3D")]


def _medmnist_flags() -> list[str]:
    """Loadable MedMNIST flags: 2D and single-label."""
    info = _medmnist().INFO
    return [f for f in _medmnist_2d_flags(info) if info[f]["task"] != _MULTI_LABEL_TASK]


def available_datasets() -> list[str]:
    """Every name ``load_dataset`` accepts."""
    return ["digits", "mnist", *RGB32, *_medmnist_flags()]


def _canonical(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"--data.dataset={name!r} is invalid; use digits, mnist, cifar10, svhn, cinic10 or "
            "any MedMNIST 2D flag such as pathmnist"
        )
    return name.strip().lower()


def _medmnist_entry(name: str) -> dict:
    info = _medmnist().INFO
    entry = info.get(name)
    if entry is None:
        raise ConfigError(
            f"--data.dataset={name!r} is not a known dataset"
            f"{did_you_mean(name, available_datasets(), prefix='--data.dataset ')}; use digits, "
            "mnist, cifar10, svhn, cinic10 or a single-label MedMNIST 2D flag such as pathmnist"
        )
    if entry["python_class"].endswith("3D"):
        raise ConfigError(
            f"--data.dataset={name!r} is a 3D MedMNIST volume dataset, which is not supported; "
            "use a MedMNIST 2D flag such as pathmnist or organamnist"
        )
    if entry["task"] == _MULTI_LABEL_TASK:
        raise ConfigError(
            f"--data.dataset={name!r} is a multi-label dataset ({entry['task']}), which is not "
            "supported; use a single-label MedMNIST 2D flag such as pathmnist"
        )
    return entry


def dataset_info(name: str) -> DatasetInfo:
    """Classes and input shape of ``name``; reads no file."""
    name = _canonical(name)
    if name == "digits":
        return DatasetInfo("digits", 10, (1, 8, 8))
    if name == "mnist":
        return DatasetInfo("mnist", 10, (1, 28, 28))
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


def _data_root(name: str, data_dir) -> str:
    if data_dir is None or not os.fspath(data_dir):
        raise ConfigError(
            f"--data.data_dir is not set but dataset {name!r} reads files; "
            "set --data.data_dir <folder with the data> (or use --data.dataset digits)"
        )
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _normalize_uint8(images: torch.Tensor, mean, std) -> torch.Tensor:
    """``(images / 255 - mean) / std`` per channel of a uint8 ``(N, C, H, W)`` tensor."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return images.to(torch.float32).div_(255.0).sub_(mean_t).div_(std_t).contiguous()


# digits ------------------------------------------------------------------------------------


def _load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=labels,
    )
    idx = np.sort(train_idx if split == "train" else test_idx)
    x = (torch.from_numpy(images[idx]).unsqueeze(1) - DIGITS_MEAN) / DIGITS_STD
    return x.to(torch.float32).contiguous(), torch.from_numpy(labels[idx])


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
            f"dataset 'mnist': download into {raw} failed ({_one_line(exc)}); check the internet "
            "connection, or copy the MNIST files there and set --data.download false"
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
        f"dataset 'mnist': could not read the data in {raw} ({_one_line(exc)}); replace the files "
        f"with the originals or {_mnist_fix_hint()}"
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
            return path, _one_line(exc)
    return None


def _load_mnist(
    root: str, download: bool, split: str, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
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


# medmnist ----------------------------------------------------------------------------------


def _load_medmnist(
    flag: str, entry: dict, root: str, download: bool, split: str, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    medmnist = _medmnist()
    fname = f"{flag}.npz"
    candidates = [os.path.join(root, "medmnist"), root]
    found = next((d for d in candidates if os.path.isfile(os.path.join(d, fname))), None)
    fix = (
        f"set --data.data_dir <folder containing medmnist/{fname} or {fname}> or "
        "--data.download true on a machine with internet"
    )
    if found is None and not download:
        raise DataNotFoundError(
            f"dataset {flag!r}: {fname} (md5 {entry['MD5']}) not found in {candidates[0]} or "
            f"{candidates[1]} (--data.data_dir={root}, --data.download false); {fix}"
        )
    folder = found if found is not None else candidates[0]
    path = os.path.join(folder, fname)
    if found is None:  # download requested and the file is absent: fetch into data_dir/medmnist
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise DataNotFoundError(
                f"dataset {flag!r}: cannot create {folder} for the download ({_one_line(exc)}); "
                "set --data.data_dir to a writable folder"
            ) from None

    if found is not None:
        check_file(flag, path, entry["MD5"], f"copy the original {fname} there, {fix}", verify)
    dataset_cls = getattr(medmnist, entry["python_class"])
    # The official FedSoL code trains on the train and val images together.
    parts = ("train", "val") if split == "train" else (split,)
    try:
        # A file that is already there is never re-fetched (medmnist would re-download on an
        # md5 mismatch), so download=True only acts on a missing file.
        sets = [
            dataset_cls(split=p, root=folder, download=found is None and i == 0,
                        size=MEDMNIST_SIZE)
            for i, p in enumerate(parts)
        ]
        images = np.concatenate([np.asarray(d.imgs) for d in sets])
        labels = np.concatenate([np.asarray(d.labels).reshape(len(d.imgs), -1) for d in sets])
    except Exception as exc:  # noqa: BLE001 - re-raised as our own single-line error
        if found is None:
            raise DataNotFoundError(
                f"dataset {flag!r}: download of {fname} into {folder} failed "
                f"({_one_line(exc)}); check the internet connection, or copy {fname} there and "
                "set --data.download false"
            ) from None
        reason = _one_line(exc)
        if os.path.isfile(path) and not zipfile.is_zipfile(path):
            reason = "not an .npz (zip) archive"
        raise DataNotFoundError(
            f"dataset {flag!r}: file {path} is corrupt or unreadable ({reason}); "
            f"replace it with the original {fname} or {fix}"
        ) from None

    channels = int(entry["n_channels"])
    size = (MEDMNIST_SIZE, MEDMNIST_SIZE)
    expected = (*size, 3) if channels == 3 else size
    if images.dtype != np.uint8 or tuple(images.shape[1:]) != expected or images.ndim < 3:
        raise DataNotFoundError(
            f"dataset {flag!r}: file {path} holds {split} images of shape {images.shape} "
            f"{images.dtype}, expected (N, {', '.join(map(str, expected))}) uint8; replace it "
            f"with the original {fname} or {fix}"
        )
    if labels.ndim <= 1:
        labels = labels.reshape(-1, 1)
    num_classes = len(entry["label"])
    if (
        labels.shape != (len(images), 1)
        or labels.dtype.kind not in "iu"
        or (labels.size and (labels.min() < 0 or labels.max() >= num_classes))
    ):
        raise DataNotFoundError(
            f"dataset {flag!r}: file {path} holds {split} labels of shape {labels.shape} "
            f"{labels.dtype} for {len(images)} images, expected (N, 1) integers in "
            f"0..{num_classes - 1}; replace it with the original {fname} or {fix}"
        )

    x = torch.from_numpy(images)
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)
    x = _normalize_uint8(x, MEDMNIST_MEAN, MEDMNIST_STD).contiguous()
    return x, torch.from_numpy(labels.reshape(-1).astype(np.int64))
