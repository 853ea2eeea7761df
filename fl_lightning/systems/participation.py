"""Systems heterogeneity: sampled clients that drop out or do only part of their local work."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from fl_lightning.protocol import RoundPlan
from fl_lightning.systems._common import STREAM_PARTICIPATION, generator, positive_share, ratio

__all__ = ["Participation", "split_participation"]


def split_participation(
    seed: int, round_idx: int, client_ids: Sequence[int], dropout_ratio: float,
    straggler_ratio: float,
) -> tuple[list[int], list[int]]:
    """Which of the sampled clients drop out and which straggle in round ``round_idx``.

    ``d = floor(dropout_ratio * m)`` of the ``m`` sampled clients drop out and
    ``s = floor(straggler_ratio * m)`` of the others straggle, chosen by one random permutation
    seeded by ``(seed, round)``: a pure function of its arguments.

    Returns:
        ``(dropped, stragglers)``: two disjoint lists of client ids.
    """
    m = len(client_ids)
    n_drop = min(int(math.floor(dropout_ratio * m + 1e-9)), max(m - 1, 0))
    n_slow = min(int(math.floor(straggler_ratio * m + 1e-9)), m - n_drop)
    order = torch.randperm(m, generator=generator(seed, round_idx, STREAM_PARTICIPATION)).tolist()
    dropped = [int(client_ids[i]) for i in order[:n_drop]]
    slow = [int(client_ids[i]) for i in order[n_drop:n_drop + n_slow]]
    return dropped, slow


class Participation:
    """Dropouts and stragglers among the clients sampled in a round.

    Of the ``m`` sampled clients, ``floor(dropout_ratio * m)`` never report (they are dropped
    before training, so no compute is spent on them; the server aggregates over the survivors,
    and secure aggregation still treats them as dropped after its masks were set up), and
    ``floor(straggler_ratio * m)`` of the others are stragglers: they run only the first
    ``max(1, floor(straggler_work * tau))`` of their ``tau = E * ceil(n_k / B)`` local steps
    (the FedProx "partial work" setting; FedNova's normalization accounts for the unequal
    step counts). The choice is a seeded permutation of the sampled clients, a pure function of
    ``(seed, round)``, so resumed runs stay exact.

    Args:
        dropout_ratio: share of the sampled clients that drop out, in ``[0, 1)``.
        straggler_ratio: share of the sampled clients that straggle, in ``[0, 1]``.
        straggler_work: share of its local steps that a straggler completes, in ``(0, 1]``.

    Raises:
        ConfigError: for a ratio outside its interval.

    Example:
        >>> p = Participation(dropout_ratio=0.3, straggler_ratio=0.3)
        >>> dropped, slow = p.split(0, 0, list(range(10)))
        >>> len(dropped), len(slow), set(dropped) & set(slow)
        (3, 3, set())
    """

    def __init__(
        self, dropout_ratio: float = 0.0, straggler_ratio: float = 0.0,
        straggler_work: float = 0.5,
    ) -> None:
        self.dropout_ratio = ratio(
            dropout_ratio, "--model.participation.dropout_ratio", "the share of dropped clients"
        )
        self.straggler_ratio = ratio(
            straggler_ratio, "--model.participation.straggler_ratio",
            "the share of straggling clients", high_inclusive=True,
        )
        self.straggler_work = positive_share(
            straggler_work, "--model.participation.straggler_work",
            "the share of local steps a straggler completes", 0.5,
        )

    def split(self, seed: int, round_idx: int, client_ids: Sequence[int]):
        """``(dropped, stragglers)`` among ``client_ids`` (see :func:`split_participation`)."""
        return split_participation(
            seed, round_idx, client_ids, self.dropout_ratio, self.straggler_ratio
        )

    def apply(self, plan: RoundPlan, seed: int) -> tuple[RoundPlan, list[int], list[int]]:
        """The round plan without the dropped clients and with stragglers' steps truncated.

        Returns:
            ``(plan, dropped, stragglers)``.
        """
        dropped, slow = self.split(seed, plan.round, [c.client_id for c in plan.clients])
        gone, slow_set = set(dropped), set(slow)
        clients = []
        for c in plan.clients:
            if c.client_id in gone:
                continue
            if c.client_id in slow_set:
                keep = max(1, int(math.floor(self.straggler_work * len(c.batches) + 1e-9)))
                c = dataclasses.replace(c, batches=c.batches[:keep])
            clients.append(c)
        return dataclasses.replace(plan, clients=clients), dropped, slow
