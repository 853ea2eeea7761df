"""MD5 checksums of the raw dataset files, and the one-line errors for missing or corrupt files.

The expected checksums are those the libraries ship (torchvision for MNIST archives, CIFAR-10
and SVHN; medmnist for its ``.npz`` files). torchvision only knows the checksums of the MNIST
``.gz`` archives; the uncompressed IDX files it extracts from them are listed in
:data:`MNIST_RAW_MD5` (computed from the verified official archives).

Every check reads the file and compares ``hashlib.md5`` of its bytes to the expected value; a
mismatch raises :class:`~fl_lightning.errors.DataNotFoundError` with one line naming the file,
its actual and expected checksum and how to provide the right file. Checks can be switched off
with ``--data.verify_checksums false`` (for files you produced yourself in the same format).
"""

from __future__ import annotations

import hashlib
import os
import tempfile

from fl_lightning.errors import DataNotFoundError

__all__ = ["MNIST_RAW_MD5", "CINIC10_ARCHIVE_MD5", "file_md5", "check_file", "check_writable"]

#: MD5 of the uncompressed MNIST IDX files (the contents of torchvision's verified archives).
MNIST_RAW_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

#: MD5 of ``CINIC-10.tar.gz`` as distributed by the University of Edinburgh DataShare.
CINIC10_ARCHIVE_MD5 = "6ee4d0c996905fe93221de577967a372"

_CHUNK = 1 << 20
_cache: dict[tuple[str, int, int], str] = {}


def file_md5(path: str | os.PathLike) -> str:
    """Hex MD5 of a file's bytes (memoized on path, size and modification time)."""
    path = os.fspath(path)
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(chunk)
        _cache[key] = digest.hexdigest()
    return _cache[key]


def check_file(dataset: str, path: str, expected: str | None, fix: str, verify: bool) -> None:
    """Raise a one-line ``DataNotFoundError`` if ``path`` is missing or its MD5 is not ``expected``.

    Args:
        dataset: the ``--data.dataset`` value, for the message.
        path: the file.
        expected: its expected hex MD5 (``None``: only its existence is checked).
        fix: how to provide the file, appended to the message.
        verify: compare checksums; when false only existence is checked.

    Raises:
        DataNotFoundError: the file is missing, unreadable or has the wrong checksum.
    """
    shown = f" (md5 {expected})" if expected else ""
    if not os.path.isfile(path):
        raise DataNotFoundError(f"dataset {dataset!r}: missing file {path}{shown}; {fix}")
    if not verify or not expected:
        return
    try:
        actual = file_md5(path)
    except OSError as exc:
        raise DataNotFoundError(
            f"dataset {dataset!r}: cannot read {path} ({type(exc).__name__}: {exc.strerror}); {fix}"
        ) from None
    if actual != expected:
        raise DataNotFoundError(
            f"dataset {dataset!r}: file {path} is corrupt or not the original (md5 {actual}, "
            f"expected {expected}); delete or replace it, then {fix}; or set "
            "--data.verify_checksums false for files you made yourself"
        )


def check_writable(dataset: str, folder: str) -> None:
    """Before a download into ``folder`` (created when absent): raise one line saying that the
    folder is not writable, naming it and the fix, when a file cannot be created there (a
    read-only mount, no permission). Otherwise the download fails with an error that reads as
    a network problem."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise DataNotFoundError(
            f"dataset {dataset!r}: --data.download true must write into {folder}, which is not "
            f"writable ({err.strerror or type(err).__name__}); pass a writable --data.data_dir "
            "(the files are downloaded there), or download them elsewhere and pass that folder "
            "as --data.data_dir"
        ) from None
