"""Split a labelled dataset's sample indices among federated clients.

Four procedures are offered (see ``docs/partitioning.md``):

* ``iid``       -- a random permutation cut into near-equal parts;
* ``shard``     -- the label-sorted sharding of McMahan et al. (2017);
* ``lda``       -- per-class Dirichlet(alpha) proportions over the clients (the FedSoL code
  base's procedure, with its balancing trick);
* ``dirichlet`` -- per-client Dirichlet(alpha) class priors and a fixed client size, one sample
  drawn at a time (Hsu et al. 2019 as implemented by pfl-research,
  ``pfl.data.partition.partition_by_dirichlet_class_distribution``; its CIFAR-10 benchmark).

``reference=True`` replays, call for call, the random draws of the official FedSoL code
(``Lee-Gihun/FedSOL``, ``train_tools/preprocessing/partition_strategy.py``) on a private
``np.random.RandomState(seed)``, so that ``seed=19940817`` yields the very client index sets
of that code base, quirks included. ``dirichlet`` always replays the random draws of
pfl-research's benchmark (``np.random.seed(seed)``, then a permutation of the data and the
partition) on a private ``np.random.RandomState(seed)``.

Every function here is pure: it builds its own random generator from ``seed`` and never reads or
changes numpy's or torch's global random state.
"""

from __future__ import annotations

import math
import numbers
import sys
import time

import numpy as np

from fl_lightning.errors import ConfigError

__all__ = ["PARTITION_METHODS", "partition_indices"]

#: Valid values of ``--data.partition``.
PARTITION_METHODS: tuple[str, ...] = ("iid", "shard", "lda", "dirichlet")

#: How many full Dirichlet draws the default ``lda`` makes before it repairs the last one.
LDA_MAX_TRIES = 1000

#: How many draws the reference ``lda`` makes before giving up. The official code retries
#: forever; this bound (hours of CPU) only stops settings that can never succeed, e.g. two
#: classes, 100 clients and alpha=0.1. Progress is printed every ``REFERENCE_REPORT_EVERY``.
REFERENCE_LDA_MAX_TRIES = 10_000_000
REFERENCE_REPORT_EVERY = 1000


def partition_indices(
    labels,
    num_clients: int,
    method: str,
    *,
    shards_per_client: int = 2,
    alpha: float = 0.1,
    seed: int = 0,
    reference: bool = False,
    min_size: int = 10,
    client_size: int | None = None,
) -> list[np.ndarray]:
    """Return one int64 array of sample indices per client.

    Args:
        labels: 1-D numpy array or torch tensor of integer class labels, one per sample.
        num_clients: number of clients (``--data.num_clients``).
        method: ``"iid"``, ``"shard"``, ``"lda"`` or ``"dirichlet"`` (``--data.partition``).
        shards_per_client: shards dealt to each client by ``shard`` (``--data.shards_per_client``).
        alpha: Dirichlet concentration used by ``lda`` and ``dirichlet`` (``--data.alpha``).
        seed: seed of the private random generator. With ``reference=True`` it plays the role
            of the ``np.random.seed`` value set by the official code (19940817 there).
        reference: reproduce the official FedSoL partitions exactly, quirks included.
        min_size: ``lda`` redraws until every client holds at least this many samples.
        client_size: samples of every client under ``dirichlet`` (``--data.client_size``;
            ``None``: ``len(labels) // num_clients``). Only ``dirichlet`` takes it.

    Returns:
        ``num_clients`` int64 arrays. In the default mode they are sorted, pairwise disjoint
        and together cover every sample. In reference mode they keep the official code's order
        and quirks (see ``docs/partitioning.md``). Under ``dirichlet`` each holds exactly
        ``client_size`` samples, in the order pfl-research assigns them; they are pairwise
        disjoint and cover ``num_clients * client_size`` samples.

    Raises:
        ConfigError: for an invalid option or an impossible combination of options.
    """
    y = _as_label_array(labels)
    n, seed = _check_common(y, num_clients, method, seed, reference, client_size)
    if method == "dirichlet":
        return _dirichlet(y, n, alpha, client_size, seed, reference)

    if method == "iid":
        if reference:
            return _reference_iid(len(y), n, np.random.RandomState(seed))
        return _iid(len(y), n, np.random.default_rng(seed))

    if method == "shard":
        s = _check_shards_per_client(shards_per_client, n, len(y))
        if reference:
            return _reference_shard(y, n, s, np.random.RandomState(seed))
        return _shard(y, n, s, np.random.default_rng(seed))

    a = _check_alpha(alpha)
    m = _check_min_size(min_size, n, len(y))
    if reference:
        return _reference_lda(y, n, a, m, np.random.RandomState(seed))
    return _lda(y, n, a, m, np.random.default_rng(seed))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_common(
    y: np.ndarray, num_clients, method, seed, reference: bool, client_size
) -> tuple[int, int]:
    """The checks of :func:`partition_indices` every method shares, in its order.

    Returns:
        ``(num_clients, seed)`` as ints.

    Raises:
        ConfigError: a bad client count, method or seed, or ``client_size`` without
            ``dirichlet``.
    """
    n = _check_num_clients(num_clients, len(y))
    if not isinstance(method, str) or method not in PARTITION_METHODS:
        raise ConfigError(
            f"--data.partition={method!r} is not a known partition method; "
            f"use one of {', '.join(PARTITION_METHODS)}"
        )
    seed = _check_seed(seed, reference or method == "dirichlet")
    if client_size is not None and method != "dirichlet":
        raise ConfigError(
            f"--data.client_size={client_size!r} is only used by --data.partition dirichlet "
            f"(got --data.partition {method}); drop --data.client_size or use dirichlet"
        )
    return n, seed


def _dirichlet(
    y: np.ndarray, n: int, alpha, client_size, seed: int, reference: bool
) -> list[np.ndarray]:
    """The ``dirichlet`` method of :func:`partition_indices`: its checks, then pfl-research's
    draws (:func:`fl_lightning.data.dirichlet.pfl_dirichlet`).

    Raises:
        ConfigError: ``reference`` (no such mode), a bad ``alpha`` or ``client_size``.
    """
    from fl_lightning.data.dirichlet import pfl_dirichlet

    if reference:
        raise ConfigError(
            "--data.reference_partition=true replays the FedSoL code's partitions, which "
            "have no dirichlet mode; --data.partition dirichlet always replays "
            "pfl-research's draws: set --data.reference_partition false"
        )
    a = _check_alpha(alpha)
    size = _check_client_size(client_size, n, len(y))
    return pfl_dirichlet(y, n, a, size, np.random.RandomState(seed))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_label_array(labels) -> np.ndarray:
    if hasattr(labels, "detach") and hasattr(labels, "cpu"):  # a torch tensor
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ConfigError(
            f"labels must be a 1-D array of class ids, got shape {tuple(y.shape)}; "
            "pass one integer label per sample"
        )
    if y.size and y.dtype.kind not in "iu":
        raise ConfigError(
            f"labels must have an integer dtype, got {y.dtype}; "
            "pass integer class ids (e.g. labels.astype(np.int64))"
        )
    return y.astype(np.int64, copy=False)


def _check_num_clients(num_clients, num_samples: int) -> int:
    if not _is_int(num_clients) or num_clients < 1:
        raise ConfigError(f"--data.num_clients={num_clients!r} is invalid; use an integer >= 1")
    if num_clients > num_samples:
        raise ConfigError(
            f"--data.num_clients={num_clients} exceeds the {num_samples} training samples; "
            f"use at most {num_samples} clients"
        )
    return int(num_clients)


def _check_seed(seed, reference: bool) -> int:
    upper = 2**32 - 1
    if not _is_int(seed) or seed < 0 or (reference and seed > upper):
        bound = f"in [0, {upper}]" if reference else ">= 0"
        raise ConfigError(f"partition seed={seed!r} is invalid; use an integer {bound}")
    return int(seed)


def _check_shards_per_client(shards_per_client, num_clients: int, num_samples: int) -> int:
    s = shards_per_client
    if not _is_int(s) or s < 1:
        raise ConfigError(f"--data.shards_per_client={s!r} is invalid; use an integer >= 1")
    if num_clients * s > num_samples:
        raise ConfigError(
            f"--data.shards_per_client={s} with --data.num_clients={num_clients} asks for "
            f"{num_clients * s} shards but there are only {num_samples} samples; "
            "lower --data.shards_per_client or --data.num_clients"
        )
    return int(s)


def _check_alpha(alpha) -> float:
    ok = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
    if not ok or not math.isfinite(float(alpha)) or float(alpha) <= 0:
        raise ConfigError(
            f"--data.alpha={alpha!r} is invalid; use a finite number > 0 "
            "(e.g. 0.1 for strong label skew, 100 for near-iid)"
        )
    return float(alpha)


def _check_min_size(min_size, num_clients: int, num_samples: int) -> int:
    if not _is_int(min_size) or min_size < 0:
        raise ConfigError(f"lda min_size={min_size!r} is invalid; use an integer >= 0")
    if num_clients * min_size > num_samples:
        raise ConfigError(
            f"--data.num_clients={num_clients} clients cannot each hold {min_size} of "
            f"{num_samples} samples in the lda partition; lower --data.num_clients to at most "
            f"{num_samples // max(min_size, 1)}"
        )
    return int(min_size)


def _check_client_size(client_size, num_clients: int, num_samples: int) -> int:
    if client_size is None:
        return num_samples // num_clients  # >= 1: num_clients <= num_samples was checked
    if not _is_int(client_size) or client_size < 1:
        raise ConfigError(
            f"--data.client_size={client_size!r} is invalid; use an integer >= 1 (or leave it "
            "unset for len(train set) // num_clients)"
        )
    if num_clients * client_size > num_samples:
        raise ConfigError(
            f"--data.partition dirichlet cannot give --data.num_clients={num_clients} clients "
            f"--data.client_size={client_size} samples each ({num_clients * client_size} > "
            f"{num_samples} training samples); lower --data.client_size to at most "
            f"{num_samples // num_clients} or --data.num_clients to at most "
            f"{num_samples // client_size}"
        )
    return int(client_size)


def _lda_gave_up(alpha: float, num_clients: int, min_size: int) -> ConfigError:
    return ConfigError(
        f"--data.alpha={alpha} with --data.num_clients={num_clients}: no reference lda draw "
        f"gave every client >= {min_size} samples in {REFERENCE_LDA_MAX_TRIES} tries (the "
        "official code would retry forever); raise --data.alpha, lower --data.num_clients or "
        "use --data.reference_partition false (its lda always finds a partition)"
    )


def _class_pools(y: np.ndarray) -> list[np.ndarray]:
    """Indices of each class, classes in ascending label order, indices ascending."""
    _, inverse = np.unique(y, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    return [chunk.astype(np.int64) for chunk in np.split(order, np.cumsum(counts)[:-1])]


# --------------------------------------------------------------------------------------------
# Default procedures (numpy Generator, disjoint and covering)
# --------------------------------------------------------------------------------------------


def _iid(num_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    parts = np.array_split(rng.permutation(num_samples), num_clients)
    return [np.sort(p).astype(np.int64) for p in parts]


def _shard(
    y: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    by_label = np.argsort(y, kind="stable")
    shards = np.array_split(by_label, num_clients * shards_per_client)
    dealt = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[j] for j in row])).astype(np.int64) for row in dealt]


def _lda(
    y: np.ndarray, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Up to ``LDA_MAX_TRIES`` draws; if none gives every client ``min_size`` samples, the last
    draw is repaired (:func:`_top_up`), so a partition is always found, in bounded time."""
    pools = _class_pools(y)
    fair_share = len(y) / num_clients
    for _ in range(LDA_MAX_TRIES):
        # a try is drawn on sizes only; its client lists are built once it is kept
        drawn: list[tuple[np.ndarray, np.ndarray]] = []
        sizes = np.zeros(num_clients, dtype=np.int64)
        for pool in pools:
            members = rng.permutation(pool)
            weights = rng.dirichlet(np.full(num_clients, alpha))
            open_ = sizes < fair_share  # clients at or above their fair share get nothing more
            weights = weights * open_
            total = weights.sum()
            if not total > 0:  # every open client drew an exact zero: share evenly instead
                weights = open_ / open_.sum() if open_.any() else np.ones(num_clients)
                total = weights.sum()
            cuts = (np.cumsum(weights / total) * len(members)).astype(np.int64)[:-1]
            cuts = np.clip(cuts, 0, len(members))
            drawn.append((members, cuts))
            sizes += np.diff(np.concatenate(([0], cuts, [len(members)])))
        if sizes.min() >= min_size:
            break
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for members, cuts in drawn:
        for client, part in enumerate(np.split(members, cuts)):
            pieces[client].append(part)
    if sizes.min() >= min_size:
        return [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]
    clients = [np.concatenate(p).astype(np.int64) for p in pieces]
    return [np.sort(c) for c in _top_up(clients, min_size, rng)]


def _top_up(
    clients: list[np.ndarray], min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Give each client below ``min_size`` samples drawn at random from the largest client.

    Short clients are served smallest first (ties: lowest id); the donor is always the client
    that holds the most samples at that moment (ties: lowest id) and never drops below
    ``min_size`` itself. The moved samples are the donor's, so the receiver's labels follow the
    donor's (mostly one or two classes under a small alpha): the skew stays. Needs
    ``num_clients * min_size <= num_samples`` (checked by the caller).
    """
    clients = [c.copy() for c in clients]
    sizes = np.array([len(c) for c in clients])
    for short in np.argsort(sizes, kind="stable"):
        while len(clients[short]) < min_size:
            sizes = np.array([len(c) for c in clients])
            donor = int(np.argmax(sizes))
            take = min(min_size - len(clients[short]), int(sizes[donor]) - min_size)
            chosen = rng.choice(len(clients[donor]), size=take, replace=False)
            keep = np.ones(len(clients[donor]), dtype=bool)
            keep[chosen] = False
            clients[short] = np.concatenate((clients[short], clients[donor][chosen]))
            clients[donor] = clients[donor][keep]
    return clients


# --------------------------------------------------------------------------------------------
# Reference procedures: same sequence of RandomState calls as the official FedSoL code
# --------------------------------------------------------------------------------------------


def _reference_iid(
    num_samples: int, num_clients: int, rs: np.random.RandomState
) -> list[np.ndarray]:
    # Each client reshuffles what is left and takes the first N // K of it; the last
    # N % K samples are never assigned.
    per_client = num_samples // num_clients
    remaining = np.arange(num_samples, dtype=np.int64)
    clients = []
    for _ in range(num_clients):
        rs.shuffle(remaining)
        clients.append(remaining[:per_client].copy())
        remaining = remaining[per_client:]
    return clients


def _reference_shard(
    y: np.ndarray, num_clients: int, shards_per_client: int, rs: np.random.RandomState
) -> list[np.ndarray]:
    pools = _class_pools(y)
    num_classes = len(pools)
    # Same float expression (and truncation) as the official code.
    shards_per_class = int(shards_per_client * num_clients / num_classes)
    if shards_per_class < 1:
        raise ConfigError(
            f"--data.shards_per_client={shards_per_client} with --data.num_clients="
            f"{num_clients} gives 0 shards per class for {num_classes} classes in reference "
            f"mode; make shards_per_client * num_clients >= {num_classes}"
        )

    # Per class: equal contiguous shards; the remainder goes one sample each to the first shards.
    shards_of: list[list[np.ndarray]] = []
    for pool in pools:
        extra = len(pool) % shards_per_class
        body = pool[: len(pool) - extra].reshape(shards_per_class, -1)
        tail = pool[len(pool) - extra :]
        shards_of.append(
            [np.append(row, tail[i]) if i < extra else row.copy() for i, row in enumerate(body)]
        )

    # A shuffled deck of shard labels, padded (by repeating its 2nd, 3rd, ... entries) to a
    # multiple of num_clients, then dealt row by row.
    deck = np.repeat(np.arange(num_classes), shards_per_class)
    rs.shuffle(deck)
    deck_list = deck.tolist()
    repeat_from = 0
    while len(deck_list) % num_clients:
        repeat_from += 1
        deck_list.append(deck_list[repeat_from])
    hands = np.asarray(deck_list).reshape(num_clients, -1)

    clients: list[np.ndarray] = []
    for client, hand in enumerate(hands):
        picked = []
        for label in hand:
            left = shards_of[label]
            if not left:  # a padded label whose shards are used up: skipped (no random draw)
                continue
            picked.append(left.pop(rs.choice(len(left), replace=False)))
        if picked:
            clients.append(np.concatenate(picked).astype(np.int64))
        elif client > 0:  # official quirk: an empty-handed client copies its predecessor
            clients.append(clients[-1].copy())
        else:
            raise ConfigError(
                f"--data.shards_per_client={shards_per_client}: client 0 received no shard "
                "in reference mode; raise --data.shards_per_client or use reference=False"
            )
    return clients


def _reference_lda(
    y: np.ndarray, num_clients: int, alpha: float, min_size: int, rs: np.random.RandomState
) -> list[np.ndarray]:
    """The official ``while min_size < 10`` loop, draw for draw, without its bound on time.

    A failed try is replayed on sizes only: its client lists are never built, and each
    client's closing shuffle runs on a scratch buffer of the same length, which consumes the
    same random numbers (``RandomState.shuffle`` draws depend on the length alone). Only the
    successful try builds and shuffles the real lists. CIFAR-10 shaped labels (10 x 5,000),
    100 clients, alpha=0.05 and the official seed take 3,482 tries.
    """
    # The class pools are shuffled in place and keep their order from one try to the next,
    # exactly as the official per-label lists do.
    pools = _class_pools(y)
    cap = len(y) // num_clients
    scratch = np.empty(len(y), dtype=np.int64)
    started = time.monotonic()
    for tries in range(1, REFERENCE_LDA_MAX_TRIES + 1):
        sizes = np.zeros(num_clients, dtype=np.int64)
        cuts = []
        for pool in pools:
            rs.shuffle(pool)
            weights = rs.dirichlet(np.repeat(alpha, num_clients))
            weights *= sizes < cap
            with np.errstate(invalid="ignore", divide="ignore"):
                weights /= weights.sum()
                bounds = (np.cumsum(weights) * len(pool)).astype(int)[:-1]
            edges = np.concatenate(([0], bounds, [len(pool)]))
            cuts.append(edges)
            sizes += np.diff(edges)
        if sizes.min() >= min_size:
            clients = [
                np.concatenate([pool[e[i] : e[i + 1]] for pool, e in zip(pools, cuts, strict=True)])
                for i in range(num_clients)
            ]
            for c in clients:
                rs.shuffle(c)
            return clients
        for size in sizes:
            rs.shuffle(scratch[:size])
        if tries % REFERENCE_REPORT_EVERY == 0:
            print(
                f"fl-lightning: reference lda partition: {tries} tries so far "
                f"({time.monotonic() - started:.0f} s), smallest client {sizes.min()} < "
                f"{min_size} samples; the official code retries until it succeeds",
                file=sys.stderr, flush=True,
            )
    raise _lda_gave_up(alpha, num_clients, min_size)
