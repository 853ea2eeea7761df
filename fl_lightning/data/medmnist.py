"""MedMNIST 2D datasets: the flags, their metadata and the loader of :func:`load_dataset`.

Part of :mod:`fl_lightning.data.datasets` (which re-exports these names), split by dataset family.
"""

from __future__ import annotations

import os
import zipfile
from typing import TYPE_CHECKING

import numpy as np

from fl_lightning.data.checksums import check_file, check_writable
from fl_lightning.errors import ConfigError, DataNotFoundError, exception_line
from fl_lightning.suggest import did_you_mean

if TYPE_CHECKING:
    import torch

MEDMNIST_MEAN = 0.5
MEDMNIST_STD = 0.5
MEDMNIST_SIZE = 28

_MULTI_LABEL_TASK = "multi-label, binary-class"


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


def _names() -> list[str]:
    """Every dataset name (:func:`~fl_lightning.data.datasets.available_datasets`), for hints."""
    from fl_lightning.data.datasets import available_datasets

    return available_datasets()


def _medmnist_entry(name: str) -> dict:
    info = _medmnist().INFO
    entry = info.get(name)
    if entry is None:
        raise ConfigError(
            f"--data.dataset={name!r} is not a known dataset"
            f"{did_you_mean(name, _names(), prefix='--data.dataset ')}; use digits, "
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


# medmnist ----------------------------------------------------------------------------------


def _load_medmnist(
    flag: str, entry: dict, root: str, download: bool, split: str, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of MedMNIST ``flag`` as normalized tensors (see :func:`load_dataset`): find
    (or download) ``flag.npz``, read it, check the arrays' shapes and labels."""
    import torch

    from fl_lightning.data.datasets import _normalize_uint8

    fname = f"{flag}.npz"
    fix = (
        f"set --data.data_dir <folder containing medmnist/{fname} or {fname}> or "
        "--data.download true on a machine with internet"
    )
    found, folder = _medmnist_folder(flag, entry, root, download, fname, fix)
    path = os.path.join(folder, fname)
    if found is not None:
        check_file(flag, path, entry["MD5"], f"copy the original {fname} there, {fix}", verify)
    images, labels = _read_medmnist(flag, entry, folder, split, found is None, fix)
    labels = _check_medmnist_arrays(flag, entry, path, split, images, labels, fix)
    channels = int(entry["n_channels"])
    x = torch.from_numpy(images)
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)
    x = _normalize_uint8(x, MEDMNIST_MEAN, MEDMNIST_STD).contiguous()
    return x, torch.from_numpy(labels.reshape(-1).astype(np.int64))


def _medmnist_folder(
    flag: str, entry: dict, root: str, download: bool, fname: str, fix: str
) -> tuple[str | None, str]:
    """Where ``fname`` is (``root/medmnist`` or ``root``), or where it is to be downloaded
    (``root/medmnist``, created).

    Returns:
        ``(found, folder)``: ``found`` the folder holding the file, ``None`` when absent.

    Raises:
        DataNotFoundError: absent and ``download`` false, or the folder cannot be created.
    """
    candidates = [os.path.join(root, "medmnist"), root]
    found = next((d for d in candidates if os.path.isfile(os.path.join(d, fname))), None)
    if found is None and not download:
        raise DataNotFoundError(
            f"dataset {flag!r}: {fname} (md5 {entry['MD5']}) not found in {candidates[0]} or "
            f"{candidates[1]} (--data.data_dir={root}, --data.download false); {fix}"
        )
    folder = found if found is not None else candidates[0]
    if found is None:  # download requested and the file is absent: fetch into data_dir/medmnist
        check_writable(flag, folder)
    return found, folder


def _read_medmnist(
    flag: str, entry: dict, folder: str, split: str, fetch: bool, fix: str
) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of ``split`` (train = train + val, as the official FedSoL code)
    through medmnist's own class, downloading the file first when ``fetch``.

    Raises:
        DataNotFoundError: the download failed, or the file is corrupt or unreadable.
    """
    fname = f"{flag}.npz"
    path = os.path.join(folder, fname)
    dataset_cls = getattr(_medmnist(), entry["python_class"])
    # The official FedSoL code trains on the train and val images together.
    parts = ("train", "val") if split == "train" else (split,)
    try:
        # A file that is already there is never re-fetched (medmnist would re-download on an
        # md5 mismatch), so download=True only acts on a missing file.
        sets = [
            dataset_cls(split=p, root=folder, download=fetch and i == 0, size=MEDMNIST_SIZE)
            for i, p in enumerate(parts)
        ]
        images = np.concatenate([np.asarray(d.imgs) for d in sets])
        labels = np.concatenate([np.asarray(d.labels).reshape(len(d.imgs), -1) for d in sets])
    except Exception as exc:  # noqa: BLE001 - re-raised as our own single-line error
        if fetch:
            raise DataNotFoundError(
                f"dataset {flag!r}: download of {fname} into {folder} failed "
                f"({exception_line(exc)}); check the internet connection, or copy {fname} "
                "there and set --data.download false"
            ) from None
        reason = exception_line(exc)
        if os.path.isfile(path) and not zipfile.is_zipfile(path):
            reason = "not an .npz (zip) archive"
        raise DataNotFoundError(
            f"dataset {flag!r}: file {path} is corrupt or unreadable ({reason}); "
            f"replace it with the original {fname} or {fix}"
        ) from None
    return images, labels


def _check_medmnist_arrays(
    flag: str, entry: dict, path: str, split: str, images: np.ndarray, labels: np.ndarray,
    fix: str,
) -> np.ndarray:
    """Check the images' dtype and shape and the labels' shape and range.

    Returns:
        The labels as ``(N, 1)``.

    Raises:
        DataNotFoundError: any of them is off (the file is not the original).
    """
    fname = f"{flag}.npz"
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
    return labels
