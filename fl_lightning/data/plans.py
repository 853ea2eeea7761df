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

from typing import Any

import numpy as np
import torch
from torch import Tensor

from fl_lightning.data.counters import AUGMENT_STREAM, ORDER_STREAM, counter_bits
from fl_lightning.protocol import ClientPlan

__all__ = ["RoundAugmentation", "augment_batch", "augment_draws", "client_batches", "client_plans",
           "epoch_keys", "epoch_segments", "round_arrays", "sample_clients"]


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


def epoch_segments(sizes: np.ndarray, local_epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each entry of a round's index plan (every client's epochs in turn, client ``k``
    having ``sizes[k]`` samples) lies: its segment (client ``k``'s epoch ``e`` is segment
    ``k * local_epochs + e``) and its position within that segment."""
    seg_len = np.repeat(sizes, local_epochs)
    seg = np.repeat(np.arange(len(seg_len)), seg_len)
    starts = np.concatenate([[0], np.cumsum(seg_len)[:-1]]).astype(np.int64)
    return seg, np.arange(len(seg), dtype=np.int64) - starts[seg]


def round_arrays(
    own: list[np.ndarray], clients: list[int], seed: int, round_idx: int, local_epochs: int,
    batch_size: int, augmentation: Any = None, image_size: tuple[int, ...] = (0, 0),
) -> tuple[np.ndarray, np.ndarray | None]:
    """A round's index plan and, with ``augmentation``, its per-sample draws ``(T, 5)``, as
    host arrays.

    The plan holds every client's epochs in step order (client ``c``'s samples are the
    training-set indices ``own[c]``), each epoch sorted by :func:`epoch_keys`; the draws are
    keyed ``(seed, round, client, step, position in batch)`` for images of ``image_size``
    ``(height, width)``. The same batches and draws as :func:`client_batches` and
    :func:`augment_batch` give one client.
    """
    idx = np.concatenate([own[c] for c in clients for _ in range(local_epochs)]) if clients \
        else np.zeros(0, np.int64)
    sizes = np.array([len(own[c]) for c in clients], dtype=np.int64)
    seg, pos = epoch_segments(sizes, local_epochs)
    client_t = np.asarray(clients, dtype=np.int64)[seg // max(local_epochs, 1)]
    epoch_t = seg % max(local_epochs, 1)
    keys = epoch_keys(seed, round_idx, client_t, epoch_t, idx)
    idx = idx[np.lexsort((keys, seg))]  # stable: per segment, by key
    if augmentation is None:
        return idx, None
    per_epoch = -(-sizes // batch_size)
    step_t = epoch_t * np.repeat(per_epoch, local_epochs)[seg] + pos // batch_size
    height, width = image_size
    return idx, augment_draws(augmentation, seed, round_idx, client_t, step_t, pos % batch_size,
                              height, width)


def client_plans(
    flat: Tensor, ids: list[int], sizes: list[int], local_epochs: int, batch_size: int
) -> tuple[list[ClientPlan], dict[int, tuple[int, int, int]]]:
    """The clients' plans from a round's index plan ``flat`` (client ``ids[k]``'s
    ``local_epochs`` epochs of ``sizes[k]`` entries each, in turn): their batches are views of
    ``flat``; and the layout ``client_id -> (start, num_samples, steps_per_epoch)``."""
    clients, layout, start = [], {}, 0
    for c, n in zip(ids, sizes, strict=True):
        batches = [b for e in range(local_epochs)
                   for b in flat[start + e * n:start + (e + 1) * n].split(batch_size)]
        clients.append(ClientPlan(client_id=c, num_samples=n, batches=batches))
        layout[c] = (start, n, -(-n // batch_size))
        start += n * local_epochs
    return clients, layout


class RoundAugmentation:
    """The training augmentation of one round, with its draws already on the device.

    ``transform(x, round, client_id, step)`` augments one client's batch at one local step
    (the :data:`~fl_lightning.engine.BatchTransform` protocol); :meth:`many` augments the
    stacked batches ``(K, B, C, H, W)`` of several clients at the same step in one call (the
    batched engine uses it). The draws of the plan's ``(client, step)`` are slices of the
    round's device tensor; any other ``(round, client, step)`` falls back to the data module's
    :meth:`~fl_lightning.data.module.FederatedDataModule.augment_batch`, which gives the same
    values.

    Attributes:
        round: the round the draws were made for.
        draws: ``(T, 5)`` integer draws, row ``t`` for entry ``t`` of the round's index plan.
        layout: ``client_id -> (start, num_samples, steps_per_epoch)`` in the index plan.
    """

    def __init__(self, datamodule: Any, round_idx: int, draws: Tensor,
                 layout: dict[int, tuple[int, int, int]], batch_size: int) -> None:
        self.datamodule = datamodule
        self.augmentation = datamodule.augmentation
        self.round = round_idx
        self.draws = draws
        self.layout = layout
        self.batch_size = batch_size

    def step_draws(self, client_id: int, step: int, size: int) -> Tensor | None:
        """The ``(size, 5)`` draws of the client's batch at ``step`` (``None`` if not planned)."""
        where = self.layout.get(client_id)
        if where is None:
            return None
        start, n, per_epoch = where
        epoch, chunk = divmod(step, per_epoch)
        begin = start + epoch * n + chunk * self.batch_size
        if size != min(self.batch_size, n - chunk * self.batch_size):
            return None
        return self.draws[begin:begin + size]

    def __call__(self, x: Tensor, round_idx: int, client_id: int, step: int) -> Tensor:
        draws = self.step_draws(client_id, step, len(x)) if round_idx == self.round else None
        if draws is None or draws.device != x.device:
            return self.datamodule.augment_batch(x, round_idx, client_id, step)
        return self.augmentation(x, draws)

    def many(self, x: Tensor, round_idx: int, client_ids: list[int], step: int) -> Tensor:
        """Augment ``x`` ``(K, B, C, H, W)``, row ``k`` being client ``client_ids[k]``'s batch."""
        parts = [self.step_draws(c, step, x.shape[1]) if round_idx == self.round else None
                 for c in client_ids]
        if any(p is None or p.device != x.device for p in parts):
            return torch.stack([self(x[k], round_idx, c, step) for k, c in enumerate(client_ids)])
        draws = torch.cat(parts) if len(parts) > 1 else parts[0]
        return self.augmentation(x.flatten(0, 1), draws).view(x.shape)
