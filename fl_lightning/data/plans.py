"""Who trains in a round and on which samples: pure functions of ``(seed, round, client)``.

:class:`~fl_lightning.data.module.FederatedDataModule` plans a whole round at once for the
simulation; a real client that holds only its own samples (``fl_lightning.flower``) calls the
per-client functions here with its own indices and gets the same batches in the same order and
the same augmentation draws. The orders and draws come from counter-based random bits
(:mod:`fl_lightning.data.counters`), keyed ``(seed, round, client, epoch, sample)`` and
``(seed, round, client, step, position in batch)``. This module imports neither Lightning nor
the data module (a client process starts faster without them).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fl_lightning.data.counters import AUGMENT_STREAM, ORDER_STREAM, counter_bits

__all__ = ["augment_batch", "augment_draws", "client_batches", "epoch_keys", "sample_clients"]


def sample_clients(
    num_clients: int, clients_per_round: int, seed: int, round_idx: int, sampling: str = "seeded"
) -> list[int]:
    """The ids of the clients that train in round ``round_idx`` (without replacement).

    ``seeded`` draws from ``numpy.random.default_rng([seed, round])``; ``official`` reproduces
    the official FedSoL code's ``numpy.random.seed(round)`` draw (independent of ``seed``).

    Example:
        >>> sample_clients(10, 3, seed=0, round_idx=0) == sample_clients(10, 3, 0, 0)
        True
    """
    if sampling == "official":
        rng = np.random.RandomState(round_idx)
    else:
        rng = np.random.default_rng([seed, round_idx])
    return [int(c) for c in rng.choice(num_clients, clients_per_round, replace=False)]


def epoch_keys(seed: int, round_idx: int, client, epoch, index) -> np.ndarray:
    """The sort keys of the per-epoch sample order: sample ``index`` (its position in the whole
    training set) of ``client`` in ``epoch`` of ``round_idx``; arrays broadcast."""
    return counter_bits(seed, ORDER_STREAM, round_idx, client, epoch, index)


def client_batches(
    indices: Tensor | np.ndarray, seed: int, round_idx: int, client_id: int, local_epochs: int,
    batch_size: int, positions: bool = False,
) -> list[Tensor]:
    """Mini-batches of one client's samples for its local epochs in round ``round_idx``.

    Each epoch is a permutation of the client's samples (sorted by :func:`epoch_keys` of their
    training-set indices ``indices``) cut into batches of ``batch_size`` (the last one may be
    smaller), as a shuffling ``DataLoader`` would give. The batches hold training-set indices,
    or with ``positions=True`` positions into ``indices`` (for a client that holds only
    ``x[indices]``); the order is the one the data module's round plan gives.

    Example:
        >>> [len(b) for b in client_batches(torch.arange(5), 0, 0, 0, 2, 2)]
        [2, 2, 1, 2, 2, 1]
    """
    own = np.asarray(indices, dtype=np.int64)
    batches: list[Tensor] = []
    for epoch in range(local_epochs):
        order = np.argsort(epoch_keys(seed, round_idx, client_id, epoch, own), kind="stable")
        chosen = order if positions else own[order]
        batches.extend(torch.from_numpy(np.ascontiguousarray(chosen)).split(batch_size))
    return batches


def augment_draws(
    augmentation, seed: int, round_idx: int, client, step, sample, height: int, width: int
) -> np.ndarray:
    """Augmentation draws ``(..., 5)`` of the samples keyed ``(seed, round, client, step,
    sample)`` (``sample``: position in the batch); arrays broadcast."""
    bits = counter_bits(
        seed, AUGMENT_STREAM, round_idx, np.asarray(client)[..., None],
        np.asarray(step)[..., None], np.asarray(sample)[..., None], np.arange(5),
    )
    return augmentation.draw(bits, height, width)


def augment_batch(
    augmentation, x: Tensor, seed: int, round_idx: int, client_id: int, step: int
) -> Tensor:
    """``x`` augmented with the draws keyed ``(seed, round, client, step, sample)``; ``x``
    unchanged when ``augmentation`` is ``None``."""
    if augmentation is None:
        return x
    draws = augment_draws(augmentation, seed, round_idx, client_id, step, np.arange(len(x)),
                          x.shape[-2], x.shape[-1])
    return augmentation(x, torch.from_numpy(draws).to(x.device))
