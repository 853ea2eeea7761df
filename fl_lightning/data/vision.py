"""Readers of the 32x32 RGB datasets in their distributed on-disk formats.

* CIFAR-10: the pickled batches of ``cifar-10-python.tar.gz`` (``data_batch_1`` ..
  ``data_batch_5``, ``test_batch``: dicts with ``data`` uint8 ``(N, 3072)`` in CHW order and
  ``labels``), in ``data_dir/cifar10/cifar-10-batches-py/`` (the official FedSoL layout) or
  ``data_dir/cifar-10-batches-py/`` (torchvision's default).
* SVHN: ``train_32x32.mat`` / ``test_32x32.mat`` (MATLAB files with ``X`` uint8
  ``(32, 32, 3, N)`` and ``y`` ``(N, 1)``, digit 0 stored as label 10) in ``data_dir/svhn/``.
* CINIC-10: the extracted ``CINIC-10.tar.gz``, an ImageFolder tree
  ``data_dir/cinic10/{train,test}/<class>/*.png``; classes are the sorted folder names and
  samples are in ``torchvision.datasets.DatasetFolder`` order (so partitions index the same
  samples as the official code's loader).

Each reader returns uint8 images ``(N, 3, 32, 32)`` and int64 labels, and writes nothing unless
``download`` is true and a file is missing. Checksums are those torchvision ships (CIFAR-10
batches, SVHN ``.mat``); for CINIC-10 only the archive has an official checksum, so the
extracted tree is checked for its 10 class folders of 9,000 images per split.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from fl_lightning.data.checksums import CINIC10_ARCHIVE_MD5, check_file, check_writable
from fl_lightning.errors import DataNotFoundError, exception_line

__all__ = ["load_cifar10", "load_svhn", "load_cinic10", "expected_md5", "CINIC10_CLASSES"]

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
CINIC10_URL = "https://datashare.is.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz"
CINIC10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CINIC10_PER_CLASS = 9000
_IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def expected_md5(dataset: str) -> dict[str, str]:
    """File name -> MD5 that torchvision ships for ``cifar10`` and ``svhn``."""
    if dataset == "cifar10":
        from torchvision.datasets import CIFAR10

        return {name: md5 for name, md5 in (*CIFAR10.train_list, *CIFAR10.test_list)}
    if dataset == "svhn":
        from torchvision.datasets import SVHN

        return {entry[1]: entry[2] for entry in SVHN.split_list.values()}
    return {}


def _download(dataset: str, folder: str, action) -> None:
    check_writable(dataset, folder)
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - re-raised as our own single-line error
        raise DataNotFoundError(
            f"dataset {dataset!r}: download into {folder} failed "
            f"({exception_line(exc, 160)}); check the internet connection, or copy the files "
            "there and set --data.download false"
        ) from None


def _corrupt(dataset: str, path: str, why: str, fix: str) -> DataNotFoundError:
    return DataNotFoundError(f"dataset {dataset!r}: file {path} is corrupt ({why}); {fix}")


# CIFAR-10 ---------------------------------------------------------------------------------


def _cifar_files(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def load_cifar10(root: str, download: bool, split: str, verify: bool = True):
    """CIFAR-10 ``split`` as ``(uint8 (N, 3, 32, 32), int64 (N,))``; see the module docstring."""
    files = _cifar_files(split)
    candidates = [os.path.join(root, "cifar10", CIFAR10_FOLDER), os.path.join(root, CIFAR10_FOLDER)]
    folder = next(
        (d for d in candidates if all(os.path.isfile(os.path.join(d, f)) for f in files)), None
    )
    if folder is None and download:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        target = os.path.join(root, "cifar10")
        _download(
            "cifar10",
            target,
            lambda: download_and_extract_archive(CIFAR10_URL, target, md5=CIFAR10.tgz_md5),
        )
        folder = candidates[0]
    if folder is None:
        folder = next((d for d in candidates if os.path.isdir(d)), candidates[0])
    fix = (
        f"extract cifar-10-python.tar.gz ({CIFAR10_URL}) into {os.path.join(root, 'cifar10')}, "
        "point --data.data_dir at the folder holding cifar10/, or set --data.download true on a "
        "machine with internet"
    )
    md5 = expected_md5("cifar10")
    images, labels = [], []
    for name in files:
        path = os.path.join(folder, name)
        check_file("cifar10", path, md5.get(name), fix, verify)
        try:
            with open(path, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            target = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
        except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
            raise _corrupt("cifar10", path, exception_line(exc, 160), fix) from None
        if target.shape != (len(data),):
            raise _corrupt("cifar10", path, f"{target.shape} labels for {len(data)} images", fix)
        if len(target) and (target.min() < 0 or target.max() > 9):
            raise _corrupt("cifar10", path, "labels outside 0..9", fix)
        images.append(data)
        labels.append(target)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


# SVHN -------------------------------------------------------------------------------------


def load_svhn(root: str, download: bool, split: str, verify: bool = True):
    """SVHN ``split`` as ``(uint8 (N, 3, 32, 32), int64 (N,))``; label 10 becomes 0."""
    folder = os.path.join(root, "svhn")
    name = f"{split}_32x32.mat"
    path = os.path.join(folder, name)
    md5 = expected_md5("svhn")
    if not os.path.isfile(path) and download:
        from torchvision.datasets.utils import download_url

        _download("svhn", folder, lambda: download_url(SVHN_URL + name, folder, name, md5[name]))
    fix = (
        f"put {name} ({SVHN_URL}{name}) into {folder}, point --data.data_dir at the folder "
        "holding svhn/, or set --data.download true on a machine with internet"
    )
    check_file("svhn", path, md5.get(name), fix, verify)
    try:
        import scipy.io

        mat = scipy.io.loadmat(path)
        x = np.asarray(mat["X"])
        y = np.asarray(mat["y"]).astype(np.int64).reshape(-1)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        raise _corrupt("svhn", path, exception_line(exc, 160), fix) from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise _corrupt(
            "svhn", path, f"X is {x.shape} {x.dtype} for {len(y)} labels, expected (32, 32, 3, N)"
            " uint8", fix,
        )
    if len(y) and (y.min() < 0 or y.max() > 10):
        raise _corrupt("svhn", path, "labels outside 0..10", fix)
    y[y == 10] = 0
    x = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return torch.from_numpy(x), torch.from_numpy(y)


# CINIC-10 ---------------------------------------------------------------------------------


def load_cinic10(root: str, download: bool, split: str, verify: bool = True):
    """CINIC-10 ``split`` (``train`` or ``test`` folder) as ``(uint8 (N, 3, 32, 32), int64)``."""
    base = os.path.join(root, "cinic10")
    folder = os.path.join(base, split)
    if not os.path.isdir(folder) and download:
        from torchvision.datasets.utils import download_and_extract_archive

        _download(
            "cinic10",
            base,
            lambda: download_and_extract_archive(
                CINIC10_URL, base, filename="CINIC-10.tar.gz", md5=CINIC10_ARCHIVE_MD5
            ),
        )
    fix = (
        f"extract CINIC-10.tar.gz ({CINIC10_URL}, md5 {CINIC10_ARCHIVE_MD5}) into {base} so that "
        f"{folder}/<class>/*.png exist, point --data.data_dir at the folder holding cinic10/, "
        "or set --data.download true on a machine with internet"
    )
    if not os.path.isdir(folder):
        raise DataNotFoundError(f"dataset 'cinic10': missing folder {folder}; {fix}")
    from PIL import Image
    from torchvision.datasets.folder import find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(folder)
        samples = make_dataset(folder, class_to_idx, extensions=_IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:
        raise DataNotFoundError(
            f"dataset 'cinic10': no class folders with images in {folder} "
            f"({exception_line(exc, 160)}); {fix}"
        ) from None
    if tuple(classes) != CINIC10_CLASSES:
        raise DataNotFoundError(
            f"dataset 'cinic10': {folder} has class folders {', '.join(classes)}, expected "
            f"{', '.join(CINIC10_CLASSES)}; {fix}"
        )
    if verify:
        counts = np.bincount([t for _, t in samples], minlength=len(classes))
        for name, count in zip(classes, counts, strict=True):
            if count != CINIC10_PER_CLASS:
                raise DataNotFoundError(
                    f"dataset 'cinic10': {os.path.join(folder, name)} holds {count} images, "
                    f"expected {CINIC10_PER_CLASS}; {fix}, or set --data.verify_checksums false "
                    "for files you made yourself"
                )
    images = np.empty((len(samples), 32, 32, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
            raise _corrupt("cinic10", path, exception_line(exc, 160), fix) from None
        if arr.shape != (32, 32, 3):
            raise _corrupt("cinic10", path, f"image of size {arr.shape[:2]}, expected 32x32", fix)
        images[i] = arr
    labels = np.asarray([t for _, t in samples], dtype=np.int64)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
