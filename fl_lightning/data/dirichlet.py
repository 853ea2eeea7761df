"""pfl-research's per-client Dirichlet class priors (``--data.partition dirichlet``).

Replays, random draw for random draw, Hsu et al. (2019) as implemented by pfl-research
(``pfl.data.partition.partition_by_dirichlet_class_distribution``; its CIFAR-10 benchmark) on a
private ``np.random.RandomState``; called by :func:`fl_lightning.data.partition.partition_indices`.
"""

from __future__ import annotations

import numpy as np

from fl_lightning.data.partition import _class_pools

__all__ = ["DIRICHLET_SPREAD_BY", "DIRICHLET_SPREAD_EVERY", "pfl_dirichlet"]

#: pfl-research's ``spread_distribution_after_num_fails`` and
#: ``spread_distribution_after_fails_percentage`` defaults: every ``client_size * 20`` class
#: draws of one client, 0.02 is added to each class prior and the priors are renormalized.
DIRICHLET_SPREAD_EVERY = 20
DIRICHLET_SPREAD_BY = 0.02


def pfl_dirichlet(
    y: np.ndarray, num_clients: int, alpha: float, size: int, rs: np.random.RandomState
) -> list[np.ndarray]:
    """pfl-research's CIFAR-10 partition, random draw for random draw.

    pfl shuffles the data (``np.random.permutation``) and then builds one user after the
    other: it draws the user's class priors ``p ~ Dir(alpha, ..., alpha)`` and fills the user
    one sample at a time, each time drawing a class from ``p`` (a uniform ``u``; the first class
    whose cumulative prior exceeds ``u``) and taking the last remaining sample of that class in
    the shuffled order; a draw of an exhausted class takes nothing. After every
    ``size * DIRICHLET_SPREAD_EVERY`` draws of one user, ``DIRICHLET_SPREAD_BY`` is added to each
    prior and the priors are renormalized, so the last users, who find most classes exhausted,
    still fill up. pfl's quirk at that point is kept: it sets the last *prior* (not the last
    cumulative value) to 1 after recomputing the cumulative priors, which tilts the next spread
    towards the last class; and a ``u`` at or above the last cumulative prior (rounding) picks
    class 0, as pfl's ``argmax`` over an all-false mask does.

    The draws of one user are made in blocks (up to the next spread) and the block is cut where
    the user is full; the generator is then rewound and advanced by exactly the draws used, so
    the stream, and every user, equals pfl's scalar loop on the same labels and seed.
    """
    num_samples = len(y)
    order = rs.permutation(num_samples)
    # each class's positions in the shuffled order, ascending; a class is consumed from its end
    pools = _class_pools(y[order])
    num_classes = len(pools)
    flat = np.concatenate(pools)
    start = np.cumsum([0] + [len(p) for p in pools[:-1]])
    left = np.array([len(p) for p in pools], dtype=np.int64)
    period = size * DIRICHLET_SPREAD_EVERY
    concentration = np.full(num_classes, alpha)
    clients: list[np.ndarray] = []
    for _ in range(num_clients):
        clients.append(_pfl_user(rs, concentration, size, period, order, flat, start, left))
    return clients


def _pfl_user(
    rs: np.random.RandomState, concentration: np.ndarray, size: int, period: int,
    order: np.ndarray, flat: np.ndarray, start: np.ndarray, left: np.ndarray,
) -> np.ndarray:
    """One user of :func:`pfl_dirichlet`: its priors, then blocks of draws until it holds
    ``size`` samples.

    Args:
        rs: the partition's generator (advanced by exactly pfl's draws).
        concentration: the Dirichlet parameters, one per class.
        size: samples of the user.
        period: draws between two spreads of the priors.
        order: the shuffled sample order.
        flat, start: each class's positions in ``order`` (concatenated; each class's start).
        left: samples left per class; decreased in place by what the user takes.

    Returns:
        The user's sample indices, int64, in the order pfl assigns them.
    """
    num_classes = len(left)
    priors = rs.dirichlet(concentration)
    cdf = np.cumsum(priors)
    cdf[-1] = 1.0
    got: list[np.ndarray] = []
    need, draws = size, 0
    while need:
        block = period - draws % period
        state = rs.get_state()
        u = rs.random_sample(block)
        cls = np.searchsorted(cdf, u, side="right")
        cls[cls == num_classes] = 0
        rank = _occurrence_rank(cls, num_classes)
        # the k-th draw of class c in the block succeeds iff c had more than k samples left
        hits = np.flatnonzero(rank < left[cls])
        if len(hits) >= need:
            hits = hits[:need]
            used = int(hits[-1]) + 1
            rs.set_state(state)
            rs.random_sample(used)  # the stream advances by the draws pfl made
        else:
            used = block
        c, k = cls[hits], rank[hits]
        got.append(order[flat[start[c] + left[c] - 1 - k]])
        left -= np.bincount(c, minlength=num_classes)
        need -= len(hits)
        draws += used
        if need and draws % period == 0:
            priors = priors + DIRICHLET_SPREAD_BY
            priors = priors / sum(priors.tolist())  # pfl's Python sum (left to right)
            cdf = np.cumsum(priors)
            priors[-1] = 1.0  # pfl's quirk (see pfl_dirichlet)
    return np.concatenate(got).astype(np.int64)

def _occurrence_rank(values: np.ndarray, num_values: int) -> np.ndarray:
    """For each entry, how many earlier entries hold the same value."""
    order = np.argsort(values, kind="stable")
    counts = np.bincount(values, minlength=num_values)
    first = np.cumsum(counts) - counts
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(len(values)) - np.repeat(first, counts)
    return rank
