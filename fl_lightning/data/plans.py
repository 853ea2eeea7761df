"""Who trains in a round and on which samples: pure functions of ``(seed, round, client)``.

:class:`~fl_lightning.data.module.FederatedDataModule` calls these for the simulation; a real
client that holds only its own samples (``fl_lightning.flower``) calls the same functions with
its local indices, so both see the same batches in the same order. This module imports neither
Lightning nor the data module (a client process starts faster without them).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["AUGMENT_STREAM", "augment_batch", "client_batches", "sample_clients", "sub_seed"]

#: Extra key of the augmentation seed, so it never equals a batch-order seed.
AUGMENT_STREAM = 1


def sub_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the integer keys.

    Example:
        >>> sub_seed(0, 1, 2) == sub_seed(0, 1, 2) != sub_seed(0, 2, 1)
        True
    """
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


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


def client_batches(
    indices: Tensor, seed: int, round_idx: int, client_id: int, local_epochs: int,
    batch_size: int,
) -> list[Tensor]:
    """Mini-batches of ``indices`` for one client's local epochs in round ``round_idx``.

    Each epoch is a fresh random permutation of the client's samples (drawn from
    ``sub_seed(seed, round, client)``) cut into batches of ``batch_size`` (the last one may be
    smaller), as a shuffling ``DataLoader`` would give. ``indices`` may be the client's
    positions in the whole training set (simulation) or ``arange(n_k)`` on a client that holds
    only its own samples: the permutation depends only on ``len(indices)``.

    Example:
        >>> [len(b) for b in client_batches(torch.arange(5), 0, 0, 0, 2, 2)]
        [2, 2, 1, 2, 2, 1]
    """
    gen = torch.Generator().manual_seed(sub_seed(seed, round_idx, client_id))
    batches: list[Tensor] = []
    for _ in range(local_epochs):
        order = indices[torch.randperm(len(indices), generator=gen)]
        batches.extend(order.split(batch_size))
    return batches


def augment_batch(
    augmentation, x: Tensor, seed: int, round_idx: int, client_id: int, step: int
) -> Tensor:
    """``augmentation(x, generator)`` with the generator seeded by ``(seed, round, client,
    step)``; ``x`` unchanged when ``augmentation`` is ``None``."""
    if augmentation is None:
        return x
    gen = torch.Generator(device=x.device)
    gen.manual_seed(sub_seed(seed, round_idx, client_id, step, AUGMENT_STREAM))
    return augmentation(x, gen)
