"""Systems heterogeneity: sampled clients that drop out or do only part of their local work."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from fl_lightning.errors import ConfigError
from fl_lightning.protocol import RoundPlan
from fl_lightning.systems._common import STREAM_PARTICIPATION, generator
from fl_lightning.validate import share

__all__ = ["Participation", "split_participation", "straggler_epochs"]

#: Stream of the stragglers' epoch draws (keyed by seed, round, stream, client).
STREAM_STRAGGLER_EPOCHS = 107
STRAGGLER_EPOCHS = ("fixed", "uniform")
STRAGGLER_POLICIES = ("partial", "drop")


def straggler_epochs(seed: int, round_idx: int, client_id: int, local_epochs: int) -> int:
    """Epochs a straggler runs in round ``round_idx``: uniform on ``{1, ..., E - 1}`` (1 when
    ``E <= 2``), drawn from ``(seed, round, client)`` alone.

    The official FedProx code draws ``np.random.randint(low=1, high=E)``, whose upper end is
    exclusive, so a straggler always does less than the ``E`` epochs of the others; the
    paper's text says "between 1 and E". We follow the code.
    """
    high = max(int(local_epochs) - 1, 1)
    gen = generator(seed, round_idx, STREAM_STRAGGLER_EPOCHS, int(client_id))
    return 1 + int(torch.randint(high, (1,), generator=gen))


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

    The FedProx paper's systems heterogeneity is ``straggler_epochs="uniform"``: each straggler
    runs a random number of whole local epochs, uniform on ``{1, ..., E - 1}`` and drawn from
    ``(seed, round, client)`` (:func:`straggler_epochs`). ``straggler_policy`` says what the
    server does with a straggler: ``partial`` aggregates its partial work (FedProx),
    ``drop`` leaves it out of the round as FedAvg does in that paper. The stragglers and
    their draws depend only on ``(seed, round, sampled clients)``, so a FedAvg run with
    ``drop`` and a FedProx run with ``partial`` and the same seed see the same stragglers: FedAvg
    drops exactly the clients FedProx runs partially.

    Args:
        dropout_ratio: share of the sampled clients that drop out, in ``[0, 1)``.
        straggler_ratio: share of the sampled clients that straggle, in ``[0, 1]``.
        straggler_work: share of its local steps that a straggler completes, in ``(0, 1]``
            (``straggler_epochs="fixed"`` only).
        straggler_epochs: ``fixed`` (the first ``straggler_work`` share of the steps) or
            ``uniform`` (a random number of whole epochs, the FedProx paper's setting).
        straggler_policy: ``partial`` (keep the stragglers' partial work) or ``drop``
            (aggregate without them).

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
        straggler_epochs: str = "fixed",
        straggler_policy: str = "partial",
    ) -> None:
        self.dropout_ratio = share(
            dropout_ratio, "--model.participation.dropout_ratio",
            "the share of dropped clients; e.g. 0.2",
        )
        self.straggler_ratio = share(
            straggler_ratio, "--model.participation.straggler_ratio",
            "the share of straggling clients; e.g. 0.2", high_open=False,
        )
        self.straggler_work = share(
            straggler_work, "--model.participation.straggler_work",
            "the share of local steps a straggler completes; e.g. 0.5", low_open=True,
            high_open=False,
        )
        if straggler_epochs not in STRAGGLER_EPOCHS:
            raise ConfigError(
                f"--model.participation.straggler_epochs={straggler_epochs!r} is unknown: use "
                "fixed (straggler_work of the steps) or uniform (1..E-1 epochs, FedProx paper)"
            )
        if straggler_policy not in STRAGGLER_POLICIES:
            raise ConfigError(
                f"--model.participation.straggler_policy={straggler_policy!r} is unknown: use "
                "partial (keep the stragglers' work, FedProx) or drop (FedAvg)"
            )
        self.straggler_epochs = straggler_epochs
        self.straggler_policy = straggler_policy

    def split(self, seed: int, round_idx: int, client_ids: Sequence[int]):
        """``(dropped, stragglers)`` among ``client_ids`` (see :func:`split_participation`)."""
        return split_participation(
            seed, round_idx, client_ids, self.dropout_ratio, self.straggler_ratio
        )

    def check(self, algorithm, clients_per_round: int | None = None) -> None:
        """Reject a partial-work policy for an algorithm that cannot aggregate partial work,
        and a drop policy that would leave a round without clients."""
        if self.straggler_policy == "drop" and clients_per_round is not None:
            gone, slow = self.split(0, 0, list(range(int(clients_per_round))))
            if len(gone) + len(slow) >= clients_per_round:
                raise ConfigError(
                    f"--model.participation.straggler_policy=drop with straggler_ratio="
                    f"{self.straggler_ratio} drops all {clients_per_round} sampled clients of a "
                    "round: lower straggler_ratio or use straggler_policy partial"
                )
        uses = self.straggler_ratio > 0 and self.straggler_policy == "partial"
        source = getattr(algorithm, "proximal", None)
        able = getattr(algorithm, "partial_work", True) and getattr(source, "partial_work", True)
        if uses and not able:
            raise ConfigError(
                f"--model.participation.straggler_policy=partial cannot be used with "
                f"--model.algorithm={type(algorithm).__name__}: its server state assumes every "
                "client solved its local problem (FedDyn's gradient correction); use "
                "--model.participation.straggler_policy drop"
            )

    def straggler_steps(self, seed: int, round_idx: int, client_id: int, steps: int,
                        num_samples: int, batch_size: int) -> int:
        """Local steps a straggler keeps of its ``steps`` planned ones."""
        if self.straggler_epochs == "uniform":
            per_epoch = -(-int(num_samples) // max(int(batch_size), 1))
            epochs = max(1, steps // max(per_epoch, 1))
            return min(steps, straggler_epochs(seed, round_idx, client_id, epochs) * per_epoch)
        return max(1, int(math.floor(self.straggler_work * steps + 1e-9)))

    def apply(self, plan: RoundPlan, seed: int) -> tuple[RoundPlan, list[int], list[int]]:
        """The round plan without the dropped clients and with stragglers' steps truncated
        (or, with ``straggler_policy="drop"``, without the stragglers).

        Returns:
            ``(plan, dropped, stragglers)``; with ``drop`` the stragglers are returned in
            ``dropped`` and ``stragglers`` is empty.
        """
        dropped, slow = self.split(seed, plan.round, [c.client_id for c in plan.clients])
        if self.straggler_policy == "drop":
            dropped, slow = dropped + slow, []
        gone, slow_set = set(dropped), set(slow)
        clients = []
        for c in plan.clients:
            if c.client_id in gone:
                continue
            if c.client_id in slow_set:
                size = len(c.batches[0]) if c.batches else 1
                keep = self.straggler_steps(seed, plan.round, c.client_id, len(c.batches),
                                            c.num_samples, size)
                c = dataclasses.replace(c, batches=c.batches[:keep])
            clients.append(c)
        return dataclasses.replace(plan, clients=clients), dropped, slow
