"""Rounds planned and materialized client by client: only the round's clients' data exist.

:class:`ClientwiseRounds` is the data module's *lazy* path (LEAF files and the synthetic
population). It knows every client's size and can produce any client's samples on demand
(``materialize(ids) -> (x, y)``, the clients' samples one after another); a round then

* samples its clients (:func:`~fl_lightning.data.plans.sample_clients`) and plans their batches
  with indices into the *round's* buffer (the sampled clients' samples, in sampled order), in
  time and memory O(samples of the sampled clients) (the population's sizes are one array);
* hands the engines that buffer through the optional ``RoundSource.round_tensors(plan, device,
  dtype)`` (:class:`~fl_lightning.round.FederatedRound` uses it instead of ``train_tensors``).

The per-epoch sample order sorts the same counter-based keys as the eager path
(``(seed, round, client, epoch, key_base[client] + position)``): for LEAF, ``key_base`` is the
client's first row in the pooled arrays, so the lazy plan visits exactly the samples the eager
plan visits, in the same order; for the population it is 0 (a client's order then depends on
nothing but its id).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fl_lightning.data.leaf import LEAF, TOKENS, load_leaf
from fl_lightning.data.plans import client_plans, epoch_keys, epoch_segments, sample_clients
from fl_lightning.errors import ConfigError
from fl_lightning.protocol import RoundPlan

__all__ = ["ClientwiseRounds", "RoundIndices", "as_input", "no_whole_set", "setup_lazy"]

#: ``materialize(ids) -> (x, y)``: host arrays of the clients' samples, client after client.
Materialize = Callable[[list[int]], tuple[np.ndarray, np.ndarray]]


class RoundIndices(Sequence):
    """``client_indices`` of the round's buffer: ``len`` is the population, item ``c`` the
    positions of client ``c``'s samples in the round's tensors (empty when not sampled); what
    data-level attacks (label flipping) read."""

    def __init__(self, num_clients: int, layout: dict[int, tuple[int, int]]) -> None:
        self.num_clients = num_clients
        self.layout = layout

    def __len__(self) -> int:
        return self.num_clients

    def __getitem__(self, client: int) -> Tensor:  # type: ignore[override]
        if not -self.num_clients <= client < self.num_clients:
            raise IndexError(client)
        start, n = self.layout.get(int(client) % self.num_clients, (0, 0))
        return torch.arange(start, start + n, dtype=torch.long)


class ClientwiseRounds:
    """Round plans and round tensors of clients materialized on demand.

    Args:
        sizes: every client's number of training samples (int64, one entry per client).
        materialize: the clients' samples, client after client (host arrays).
        to_input: host ``x`` -> the model's input tensor on ``(device, dtype)``.
        seed, sampling: as the data module's (client sampling and sample order).
        key_base: per client, the number added to a sample's position in its order key
            (``None``: 0).
    """

    def __init__(self, sizes: np.ndarray, materialize: Materialize,
                 to_input: Callable[[np.ndarray, torch.device, torch.dtype | None], Tensor],
                 seed: int, sampling: str, key_base: np.ndarray | None = None) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.total_samples = int(self.sizes.sum())
        self.materialize = materialize
        self.to_input = to_input
        self.seed = int(seed)
        self.sampling = sampling
        self.key_base = key_base
        self._ids: dict[int, list[int]] = {}
        self._cache: tuple | None = None

    @property
    def num_clients(self) -> int:
        return len(self.sizes)

    def round_plan(self, round_idx: int, clients_per_round: int, local_epochs: int,
                   batch_size: int, device: torch.device | str | None = None) -> RoundPlan:
        """The round's clients and their batches, as indices into :meth:`round_tensors`."""
        ids = sample_clients(self.num_clients, clients_per_round, self.seed, round_idx,
                             self.sampling)
        self._ids = {round_idx: ids}
        sizes = self.sizes[ids] if ids else np.zeros(0, np.int64)
        epochs = max(int(local_epochs), 1)
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        seg, pos = epoch_segments(sizes, epochs)
        who = seg // epochs
        id_arr = np.asarray(ids, dtype=np.int64)
        base = 0 if self.key_base is None else self.key_base[id_arr][who]
        keys = epoch_keys(self.seed, round_idx, id_arr[who], seg % epochs, pos + base)
        flat = torch.from_numpy((first[who] + pos)[np.lexsort((keys, seg))])
        if device is not None and torch.device(device) != flat.device:
            flat = flat.to(device)
        clients, _ = client_plans(flat, ids, sizes.tolist(), int(local_epochs), batch_size)
        return RoundPlan(round=round_idx, clients=clients, num_clients=self.num_clients,
                         total_samples=self.total_samples)

    def round_tensors(self, plan: RoundPlan, device: torch.device | str,
                      dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        """The round's buffer ``(x, y)`` on ``device``: every client sampled in ``plan.round``
        (dropped ones included, so the plan's indices stay valid), in sampled order; made once
        per ``(round, device, dtype)``. The new tensors exist before the last round's are let
        go, so a cache keyed by a tensor's address never sees a reused one."""
        key = (plan.round, torch.device(device), dtype)
        if self._cache is None or self._cache[0] != key:
            ids = self._ids.get(plan.round)
            if ids is None:  # a plan made elsewhere: its own clients, in its order
                ids = [c.client_id for c in plan.clients]
            x, y = self.materialize(ids)
            tensors = (self.to_input(x, key[1], dtype),
                       torch.as_tensor(y, dtype=torch.long).to(key[1]))
            self._cache = (key, tensors, self._layout(ids))
        return self._cache[1]

    def round_indices(self) -> RoundIndices:
        """:class:`RoundIndices` of the last :meth:`round_tensors` buffer."""
        layout = self._cache[2] if self._cache is not None else {}
        return RoundIndices(self.num_clients, layout)

    def _layout(self, ids: list[int]) -> dict[int, tuple[int, int]]:
        out, start = {}, 0
        for c in ids:
            n = int(self.sizes[c])
            out[c] = (start, n)
            start += n
        return out


def as_input(dm, x, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """Stored samples ``x`` (host array or tensor, compact for LEAF) as the model's input on
    ``device``: token ids (Shakespeare, Sent140) as int64; ``uint8`` pixels divided by
    ``dm.input_scale`` and ``float16`` values in ``dtype`` (default float32); other floats in
    ``dtype`` (default: as stored). The compact form is what crosses to the device."""
    t = torch.as_tensor(x).to(device)
    if dm.dataset in TOKENS:
        return t.long().reshape(-1, *dm.input_shape)
    if t.dtype in (torch.uint8, torch.float16):
        t = t.to(dtype or torch.float32)
        if dm.input_scale != 1.0:
            t = t / dm.input_scale
    elif dtype is not None:
        t = t.to(dtype)
    return t.reshape(-1, *dm.input_shape)


def no_whole_set(dm, what: str) -> ConfigError:
    """The one line for a feature that needs the synthetic population's whole training set."""
    return ConfigError(
        f"--data.dataset synthetic_population (--data.num_clients={dm.num_clients}) makes each "
        f"client's data when it is sampled and has no {what}: use --data.dataset synthetic "
        "for callbacks, personalization or reports over every client's data"
    )


def setup_lazy(dm) -> bool:
    """Set up ``dm`` (a ``FederatedDataModule``) for the lazy path if its dataset takes it (a
    LEAF set or ``synthetic_population``); returns whether it did."""
    if dm.dataset == "synthetic_population":
        from fl_lightning.data.population import SyntheticPopulation

        pop = SyntheticPopulation(dm.num_clients, dm.seed, dm.synthetic_alpha, dm.synthetic_beta)
        x, y = pop.test_set()
        dm.population = pop
        dm.test_x, dm.test_y = torch.from_numpy(x), torch.from_numpy(y)
        dm.rounds = ClientwiseRounds(pop.sizes, pop.clients, lambda v, d, t: as_input(dm, v, d, t),
                                     dm.seed, dm.sampling)
        return True
    if dm.dataset not in LEAF:
        return False
    train = load_leaf(dm.dataset, dm.data_dir, "train")
    test = load_leaf(dm.dataset, dm.data_dir, "test", vocab=train.vocab)
    k = _leaf_clients(dm, train.users)
    o = train.offsets
    dm.input_scale = train.scale if train.scale == test.scale else 1.0
    if train.scale != test.scale:  # one split lossless uint8, the other float16
        train.x, test.x = _as_float16(train), _as_float16(test)
    dm.train_x = torch.from_numpy(train.x[:o[k]])
    dm.train_y = torch.from_numpy(train.y[:o[k]])
    dm.test_x, dm.test_y = torch.from_numpy(test.x), torch.from_numpy(test.y)
    dm.client_indices = [torch.arange(o[c], o[c + 1], dtype=torch.long) for c in range(k)]
    where = {u: (test.offsets[i], test.offsets[i + 1]) for i, u in enumerate(test.users)}
    dm.test_parts = [torch.arange(*where.get(u, (0, 0)), dtype=torch.long)
                     for u in train.users[:k]]
    dm.leaf_users = train.users[:k]
    dm.leaf_vocab = train.vocab

    def materialize(ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        rows = [slice(o[c], o[c + 1]) for c in ids]
        if not rows:
            return train.x[:0], train.y[:0]
        return (np.concatenate([train.x[r] for r in rows]),
                np.concatenate([train.y[r] for r in rows]))

    dm.rounds = ClientwiseRounds(np.diff(o[:k + 1]), materialize,
                                 lambda v, d, t: as_input(dm, v, d, t), dm.seed, dm.sampling,
                                 key_base=o[:k])
    return True


def _as_float16(split) -> np.ndarray:
    return (split.x.astype(np.float32) / split.scale).astype(np.float16)


def _leaf_clients(dm, users: list[str]) -> int:
    """How many of the training users become clients: ``--data.num_clients`` (the first ones,
    in file order); more than there are is one line, fewer a one-line note on stderr."""
    if dm.num_clients > len(users):
        raise ConfigError(
            f"--data.num_clients={dm.num_clients} is more than the {len(users)} users of "
            f"--data.dataset {dm.dataset} in {dm.data_dir}: use --data.num_clients {len(users)} "
            "(every user) or fewer (the first ones, in file order)"
        )
    if dm.num_clients < len(users):
        import sys

        print(f"fl-lightning: --data.dataset {dm.dataset}: the first {dm.num_clients} of "
              f"{len(users)} users are the clients (--data.num_clients {len(users)} for all)",
              file=sys.stderr, flush=True)
    return dm.num_clients
