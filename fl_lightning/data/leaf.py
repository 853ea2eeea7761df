"""The LEAF JSON format as a dataset source: FEMNIST, Shakespeare, Sent140, synthetic.

LEAF (Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018) ships its
preprocessed data as ``data/train/*.json`` and ``data/test/*.json``, each file
``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}``.
Every user is one client (a *natural* partition); the split between train and test is the
files' (LEAF's ``--sf``/``-t sample`` or ``-t user`` options decide it when the files are made).

Files are read one at a time (``json.load`` of one file, then each user's lists are turned into
one compact array and released), so the peak is one file's Python objects plus the compact
arrays. Storage per sample:

* ``femnist``: 784 pixels in [0, 1] (LEAF writes ``pixel / 255``): stored as ``uint8`` (the
  value times 255) when that is lossless for the whole split, else as ``float16`` (error below
  ``2**-11``, a sixth of one grey level; full FEMNIST is 1.2 GB instead of 2.5 GB in float32);
  training sees float32 ``(1, 28, 28)``;
* ``shakespeare``: 80 characters -> 80 ``uint8`` indices into LEAF's 80-character vocabulary
  (:data:`CHARS`, ``ALL_LETTERS.find(c)`` as LEAF's ``utils/language_utils.py``); the label
  is the index of the next character;
* ``sent140``: the tweet text (``x[4]`` of LEAF's record ``[id, date, query, user, text]``)
  split as LEAF's ``split_line`` and cut/padded to :data:`SENT140_WORDS` token ids of a
  vocabulary of the :data:`SENT140_VOCAB` - 2 most frequent words of the *training* split
  (``0`` padding, ``1`` unknown); LEAF uses 300-d GloVe vectors, which cannot be downloaded
  here, so the models learn their own embedding;
* ``synthetic_leaf``: 60 floats (float32), 10 classes (the FedProx/LEAF synthetic sets).

Every problem is one :class:`~fl_lightning.errors.DataNotFoundError` line naming the file,
the user and the key.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from fl_lightning.errors import DataNotFoundError, exception_line

__all__ = ["CHARS", "LEAF", "LeafSplit", "TOKENS", "SENT140_VOCAB", "SENT140_WORDS", "char_indices",
           "leaf_folder", "load_leaf", "sent140_tokens"]

#: LEAF's 80 characters (``models/utils/language_utils.py``'s ``ALL_LETTERS``), in its order.
CHARS = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
         "abcdefghijklmnopqrstuvwxyz}")
SEQ_LEN = 80
#: Tokens per tweet (LEAF's ``max_words``) and vocabulary size (pad 0, unknown 1, words 2..).
SENT140_WORDS = 25
SENT140_VOCAB = 10_000
PAD, UNK = 0, 1
FEMNIST_PIXELS = 784
SYNTHETIC_FEATURES = 60

#: ``name -> (classes, input shape)`` of the LEAF datasets (token ids for the text sets).
LEAF: dict[str, tuple[int, tuple[int, int, int]]] = {
    "femnist": (62, (1, 28, 28)),
    "shakespeare": (len(CHARS), (1, 1, SEQ_LEN)),
    "sent140": (2, (1, 1, SENT140_WORDS)),
    "synthetic_leaf": (10, (1, 1, SYNTHETIC_FEATURES)),
}
#: The LEAF sets whose inputs are token ids (int64 in training).
TOKENS = ("shakespeare", "sent140")
_INDEX = {c: i for i, c in enumerate(CHARS)}
_WORDS = re.compile(r"[\w']+|[.,!?;]")


@dataclass
class LeafSplit:
    """One split of a LEAF dataset, users one after another.

    Attributes:
        x: every sample, compact (``uint8`` pixels or characters, ``int32`` tokens, ``float16``
            or ``float32`` values), user after user.
        y: int64 labels.
        users: the users in file order (files sorted by name, then each file's ``users``).
        offsets: ``offsets[k]:offsets[k + 1]`` are user ``k``'s rows.
        scale: divide ``x`` by it to get the model's input (255 for ``uint8`` pixels, else 1).
    """

    x: np.ndarray
    y: np.ndarray
    users: list[str]
    offsets: np.ndarray
    scale: float = 1.0
    vocab: dict[str, int] = field(default_factory=dict)

    def parts(self) -> list[np.ndarray]:
        """Each user's row indices (int64 ranges)."""
        o = self.offsets
        return [np.arange(o[k], o[k + 1], dtype=np.int64) for k in range(len(self.users))]


def char_indices(text: str, where: str) -> list[int]:
    """LEAF's ``word_to_indices``: each character's index in :data:`CHARS`.

    LEAF's ``ALL_LETTERS.find`` gives -1 for a character outside the vocabulary, which its
    embedding lookup cannot take; here it is one line naming the character.
    """
    try:
        return [_INDEX[c] for c in text]
    except KeyError as exc:
        raise DataNotFoundError(
            f"{where}: character {exc.args[0]!r} is not in LEAF's 80-character Shakespeare "
            "vocabulary: make the files with LEAF's data/shakespeare/preprocess.sh"
        ) from None


def sent140_tokens(text: str) -> list[str]:
    """LEAF's ``split_line``: words (``[\\w']+``) and the punctuation ``.,!?;``."""
    return _WORDS.findall(text)


def leaf_folder(name: str, data_dir: str, split: str) -> str:
    """``data_dir/<name>/<split>`` (or LEAF's own ``data_dir/<name>/data/<split>``).

    Raises:
        DataNotFoundError: neither folder exists or it holds no ``.json`` file.
    """
    root = os.path.join(os.fspath(data_dir), name)
    for folder in (os.path.join(root, split), os.path.join(root, "data", split)):
        if os.path.isdir(folder):
            if not any(f.endswith(".json") for f in os.listdir(folder)):
                raise DataNotFoundError(
                    f"dataset '{name}': folder {os.path.abspath(folder)} holds no .json file: "
                    f"copy LEAF's data/{split}/*.json (from its preprocess.sh) there"
                )
            return folder
    raise DataNotFoundError(
        f"dataset '{name}': missing folder {os.path.abspath(os.path.join(root, split))}: run "
        f"LEAF's data/{name}/preprocess.sh and copy its data/train and data/test folders into "
        f"{os.path.abspath(root)} (LEAF JSON: users, num_samples, user_data)"
    )


def _files(folder: str) -> list[str]:
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".json")]


def _parse(raw: bytes):
    """One file's JSON: with ``orjson`` when it is installed (4x faster on FEMNIST's floats,
    the same values: both round every number correctly), else the standard library's."""
    try:
        import orjson
    except ImportError:
        return json.loads(raw.decode("utf-8"))
    return orjson.loads(raw)


def _users(path: str) -> Iterator[tuple[str, list, list]]:
    """``(user, x, y)`` of one LEAF file, checked; each user's lists are released after use."""
    try:
        with open(path, "rb") as fh:
            doc = _parse(fh.read())
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError: a ValueError
        raise DataNotFoundError(
            f"file {os.path.abspath(path)} is not a readable LEAF JSON file "
            f"({exception_line(exc)}): replace it with the file LEAF's preprocess.sh wrote"
        ) from None
    where = os.path.abspath(path)
    if not isinstance(doc, dict):
        raise DataNotFoundError(f"file {where}: expected a JSON object with users, num_samples "
                                "and user_data: replace it with a LEAF JSON file")
    for key in ("users", "num_samples", "user_data"):
        if key not in doc:
            raise DataNotFoundError(f"file {where} has no key {key!r}: a LEAF JSON file holds "
                                    "users, num_samples and user_data")
    users, sizes, data = doc["users"], doc["num_samples"], doc["user_data"]
    if not isinstance(users, list) or not isinstance(sizes, list) or len(users) != len(sizes):
        raise DataNotFoundError(
            f"file {where}: 'users' and 'num_samples' must be lists of the same length "
            f"(got {_length(users)} and {_length(sizes)}): fix or regenerate the file")
    for user, n in zip(users, sizes, strict=True):
        rec = data.pop(user, None) if isinstance(data, dict) else None
        if not isinstance(rec, dict) or "x" not in rec or "y" not in rec:
            missing = "x and y" if isinstance(rec, dict) else "an entry"
            raise DataNotFoundError(f"file {where}: user_data[{user!r}] has no {missing}: "
                                    "every listed user needs user_data {x: [...], y: [...]}")
        x, y = rec["x"], rec["y"]
        if not isinstance(x, list) or not isinstance(y, list) or len(x) != len(y):
            raise DataNotFoundError(
                f"file {where}: user_data[{user!r}] has {_length(x)} x and {_length(y)} y: "
                "they must be lists of the same length")
        if len(x) != n:
            raise DataNotFoundError(
                f"file {where}: num_samples says {n} for user {user!r} but user_data[{user!r}] "
                f"has {len(x)} samples: fix num_samples or regenerate the file")
        if not x:
            raise DataNotFoundError(
                f"file {where}: user {user!r} has 0 samples: remove it from users, "
                "num_samples and user_data (LEAF's --smplseed/-k options drop such users)")
        yield str(user), x, y


def _length(value) -> str:
    return str(len(value)) if isinstance(value, list) else type(value).__name__


def _rows(x: list, width: int, where: str, what: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != 2 or arr.shape[1] != width or not np.isfinite(arr).all():
        raise DataNotFoundError(f"{where}: every x must be a list of {width} finite numbers "
                                f"({what}): regenerate the file with LEAF")
    return arr


def _labels(y: list, classes: int, where: str) -> np.ndarray:
    try:
        arr = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    ok = arr is not None and arr.ndim == 1 and np.isfinite(arr).all()
    if not ok or (arr != np.rint(arr)).any() or arr.min() < 0 or arr.max() >= classes:
        raise DataNotFoundError(f"{where}: every y must be an integer class in 0..{classes - 1}"
                                ": regenerate the file with LEAF")
    return arr.astype(np.int64)


def _femnist(x: list, y: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    arr = _rows(x, FEMNIST_PIXELS, where, "28 x 28 pixels in [0, 1]")
    if arr.min() < 0 or arr.max() > 1:
        raise DataNotFoundError(f"{where}: pixels must lie in [0, 1] (LEAF writes pixel / 255): "
                                "regenerate the file with LEAF")
    return arr, _labels(y, 62, where)


def _synthetic(x: list, y: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    return _rows(x, SYNTHETIC_FEATURES, where, "the synthetic features").astype(np.float32), \
        _labels(y, 10, where)


def _shakespeare(x: list, y: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not all(isinstance(s, str) and len(s) == SEQ_LEN for s in x):
        raise DataNotFoundError(f"{where}: every x must be a string of {SEQ_LEN} characters "
                                "(LEAF's SEQ_LENGTH): regenerate the file with LEAF")
    if not all(isinstance(s, str) and len(s) == 1 for s in y):
        raise DataNotFoundError(f"{where}: every y must be one character (the next one): "
                                "regenerate the file with LEAF")
    ids = np.asarray([char_indices(s, where) for s in x], dtype=np.uint8)
    return ids, np.asarray(char_indices("".join(y), where), dtype=np.int64)


def _tweet(record, where: str) -> str:
    """The text of a Sent140 record: ``x[4]`` of ``[id, date, query, user, text]`` (a plain
    string is taken as the text)."""
    if isinstance(record, str):
        return record
    if isinstance(record, list) and len(record) >= 5 and isinstance(record[4], str):
        return record[4]
    raise DataNotFoundError(f"{where}: every x must be LEAF's tweet record [id, date, query, "
                            "user, text] (text at index 4): regenerate the file with LEAF")


def _sent140(vocab: dict[str, int]) -> Callable[[list, list, str], tuple]:
    def parse(x: list, y: list, where: str) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(x), SENT140_WORDS), PAD, dtype=np.int32)
        for i, rec in enumerate(x):
            words = sent140_tokens(_tweet(rec, where))[:SENT140_WORDS]
            ids[i, :len(words)] = [vocab.get(w, UNK) for w in words]
        return ids, _labels(y, 2, where)
    return parse


def _vocabulary(paths: list[str]) -> dict[str, int]:
    """The :data:`SENT140_VOCAB` - 2 most frequent training words (ties: alphabetical) ->
    ids 2.. (a first pass over the files, one at a time)."""
    counts: Counter[str] = Counter()
    for path in paths:
        for user, x, _ in _users(path):
            where = f"file {os.path.abspath(path)}, user {user!r}"
            for rec in x:
                counts.update(sent140_tokens(_tweet(rec, where)))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:SENT140_VOCAB - 2]
    return {w: i + 2 for i, (w, _) in enumerate(ranked)}


def load_leaf(name: str, data_dir: str, split: str,
              vocab: dict[str, int] | None = None) -> LeafSplit:
    """One split of a LEAF dataset (see the module's docstring for the storage).

    Args:
        name: ``femnist``, ``shakespeare``, ``sent140`` or ``synthetic_leaf``.
        data_dir: ``--data.data_dir`` (files in ``data_dir/<name>/<split>/*.json``).
        split: ``train`` or ``test``.
        vocab: Sent140's vocabulary (built from this split when ``None``: pass the training
            split's for the test split).

    Raises:
        DataNotFoundError: a missing folder, an unreadable or malformed file, a user without
            samples, ``num_samples`` that disagree with ``user_data``, a user listed twice.
    """
    paths = _files(leaf_folder(name, data_dir, split))
    if name == "sent140" and vocab is None:
        vocab = _vocabulary(paths)
    parse = {"femnist": _femnist, "shakespeare": _shakespeare, "synthetic_leaf": _synthetic,
             "sent140": _sent140(vocab or {})}[name]
    xs, ys, users, seen = [], [], [], {}
    for path in paths:
        for user, x, y in _users(path):
            if user in seen:
                raise DataNotFoundError(
                    f"file {os.path.abspath(path)}: user {user!r} is also in {seen[user]}: a "
                    f"user must appear once per split; remove one of them")
            seen[user] = os.path.abspath(path)
            arr, lab = parse(x, y, f"file {os.path.abspath(path)}, user {user!r}")
            xs.append(_compact(arr) if name == "femnist" else arr)
            ys.append(lab)
            users.append(user)
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in ys])]).astype(np.int64)
    scale = 1.0
    if name == "femnist":
        lossless = all(a.dtype == np.uint8 for a in xs)
        if not lossless:
            xs = [(a.astype(np.float32) / 255 if a.dtype == np.uint8 else a).astype(np.float16)
                  for a in xs]
        scale = 255.0 if lossless else 1.0
    return LeafSplit(np.concatenate(xs), np.concatenate(ys), users, offsets, scale,
                     dict(vocab or {}))


def _compact(pixels: np.ndarray) -> np.ndarray:
    """``uint8`` ``pixels * 255`` when that is exact (to 1e-4 of a grey level), else float32."""
    scaled = pixels * 255.0
    levels = np.rint(scaled)
    if np.abs(scaled - levels).max(initial=0.0) <= 1e-4:
        return levels.astype(np.uint8)
    return pixels.astype(np.float32)
