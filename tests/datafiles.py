"""Writers of tiny dataset files in the real on-disk formats (CIFAR-10 pickled batches, SVHN
``.mat``, CINIC-10 ImageFolder PNGs); MNIST IDX and MedMNIST ``.npz`` writers are in
``test_datasets``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

CINIC_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


def _images(n: int, seed: int) -> np.ndarray:
    """uint8 (n, 3, 32, 32) with a few known pixels: image 0 has (R, G, B) = (255, 0, 51) at
    row 2, column 5."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    images[0, :, 2, 5] = [255, 0, 51]
    return images


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, bytes_keys: bool = False,
                  folder: str = "cifar10/cifar-10-batches-py") -> dict[str, np.ndarray]:
    """The six pickled batches of cifar-10-python.tar.gz: dicts with ``data`` uint8
    (N, 3072) in CHW order, ``labels`` (list of ints), ``batch_label`` and ``filenames``."""
    out = root / folder
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        n = n_test if name == "test_batch" else per_batch
        images = _images(n, seed=k)
        labels = [(k + i) % 10 for i in range(n)]
        entry = {
            "batch_label": f"batch {k}", "labels": labels,
            "data": images.reshape(n, 3072), "filenames": [f"img{i}.png" for i in range(n)],
        }
        if bytes_keys:  # how the Python 2 pickles of the real archive look once decoded
            entry = {key.encode(): value for key, value in entry.items()}
        with open(out / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        written[name] = images
        written[name + "_labels"] = np.asarray(labels)
    return written


def write_svhn(root: Path, split: str, n: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """``svhn/<split>_32x32.mat``: ``X`` uint8 (32, 32, 3, N) and ``y`` (N, 1), digit 0 as 10.
    Returns the images as (N, 3, 32, 32) and the labels with 0 for digit 0."""
    import scipy.io

    images = _images(n, seed=7 if split == "train" else 8)
    labels = np.arange(n) % 10
    stored = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(n, 1)
    (root / "svhn").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "svhn" / f"{split}_32x32.mat",
                     {"X": images.transpose(2, 3, 1, 0), "y": stored})
    return images, labels


def write_cinic10(root: Path, split: str, per_class: int = 1) -> np.ndarray:
    """``cinic10/<split>/<class>/<name>.png`` RGB 32x32 PNGs. Returns (10 * per_class, 3, 32, 32)
    in class order then file-name order."""
    from PIL import Image

    images = _images(10 * per_class, seed=11 if split == "train" else 12)
    for c, name in enumerate(CINIC_CLASSES):
        folder = root / "cinic10" / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = images[c * per_class + i].transpose(1, 2, 0)
            Image.fromarray(arr, "RGB").save(folder / f"cifar10-{split}-{i:04d}.png")
    return images


# ----------------------------------------------------------------------------- LEAF JSON
#: LEAF's 80 Shakespeare characters (models/utils/language_utils.py), for the tiny files.
LEAF_CHARS = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
              "abcdefghijklmnopqrstuvwxyz}")
TWEET_WORDS = ("good", "bad", "day", "love", "hate", "rain", "sun", "the", "a", "so")


def leaf_samples(name: str, n: int, seed: int) -> tuple[list, list]:
    """``n`` LEAF samples ``(x, y)`` as its JSON holds them: FEMNIST 784 pixels ``k / 255``
    and a class 0..61; Shakespeare 80-character strings and the next character; Sent140 tweet
    records ``[id, date, query, user, text]`` and 0/1; synthetic 60 floats and 0..9."""
    rng = np.random.default_rng(seed)
    if name == "femnist":
        return ((rng.integers(0, 256, (n, 784)) / 255).tolist(),
                rng.integers(0, 62, n).tolist())
    if name == "shakespeare":
        idx = rng.integers(0, len(LEAF_CHARS), (n, 81))
        text = ["".join(LEAF_CHARS[i] for i in row) for row in idx]
        return [t[:80] for t in text], [t[80] for t in text]
    if name == "sent140":
        ys = rng.integers(0, 2, n).tolist()
        x = [[str(1000 + i), "Mon Apr 06 22:19:45 PDT 2009", "NO_QUERY", f"u{seed}",
              " ".join(TWEET_WORDS[j] for j in rng.integers(0, len(TWEET_WORDS), 3 + i % 30))
              + ("!" if y else ".")] for i, y in enumerate(ys)]
        return x, ys
    return rng.normal(size=(n, 60)).tolist(), rng.integers(0, 10, n).tolist()


def write_leaf(root: Path, name: str, train_sizes: dict[str, int],
               test_sizes: dict[str, int] | None = None, files: int = 2) -> dict[str, dict]:
    """``root/<name>/{train,test}/all_data_<i>_niid_0_keep_0_<split>_9.json`` in LEAF's layout
    (users spread over ``files`` files in order). Returns ``{split: {user: {"x", "y"}}}``."""
    written: dict[str, dict] = {}
    test_sizes = test_sizes if test_sizes is not None else {
        u: max(1, n // 4) for u, n in train_sizes.items()}
    for split, sizes in (("train", train_sizes), ("test", test_sizes)):
        folder = root / name / split
        folder.mkdir(parents=True, exist_ok=True)
        users = list(sizes)
        written[split] = {}
        per = -(-len(users) // files)
        for f in range(files):
            chunk = users[f * per:(f + 1) * per]
            doc = {"users": chunk, "num_samples": [sizes[u] for u in chunk], "user_data": {}}
            for u in chunk:
                seed = (users.index(u) + 1) * (7 if split == "train" else 13)
                x, y = leaf_samples(name, sizes[u], seed)
                doc["user_data"][u] = {"x": x, "y": y}
                written[split][u] = {"x": x, "y": y}
            (folder / f"all_data_{f}_niid_0_keep_0_{split}_9.json").write_text(json.dumps(doc))
    return written
