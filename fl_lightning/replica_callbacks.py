"""Analysis callbacks under replicas (``--replicas.*``): every replica measured by its own copy.

A :class:`~fl_lightning.callbacks.base.RoundCallback` that declares ``replica_aware = True``
measures only the new global model of a round, from the module it is handed (its network,
its data module), e.g. :class:`~fl_lightning.callbacks.GlobalObjective` and
:class:`~fl_lightning.callbacks.ClassWiseAccuracy`. Replica 0 (the Trainer's own run) keeps
the callback the Trainer holds; every other replica gets a fresh copy (same arguments, empty
history) that measures that replica's module and new global weights after each of its
rounds, so its numbers are those of the run alone. They go to the replica's own outputs:
``<log_dir>/replica_<k>/metrics.csv`` (one column ``<prefix>/<name>`` per declared metric,
:meth:`RoundCallback.replica_metrics`) and ``<log_dir>/replica_<k>/analysis/<prefix>.json``
(history, summary) and figure; checkpoints keep every copy's history. Any other callback with
a round hook (one that reads the clients' results, or the Trainer) would see replica 0 only:
it is refused with one line.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fl_lightning.errors import ConfigError

if TYPE_CHECKING:
    from fl_lightning.protocol import RoundResult
    from fl_lightning.replicas import Replica

__all__ = ["ReplicaCallbacks"]


def _aware(callback: Any) -> bool:
    return bool(getattr(callback, "replica_aware", False))


class ReplicaCallbacks:
    """The replica-aware callbacks of a run and one copy of each per replica ``1..``.

    Args:
        callbacks: the Trainer's callbacks.
        count: the number of replicas.

    Raises:
        ConfigError: a callback with a round hook that is not replica-aware (it would see
            replica 0 only).
    """

    def __init__(self, callbacks: Sequence[Any], count: int) -> None:
        from lightning.pytorch.callbacks import ProgressBar

        for callback in callbacks:
            if (callable(getattr(callback, "on_round_end", None)) and not _aware(callback)
                    and not isinstance(callback, ProgressBar)):
                raise ConfigError(
                    f"--replicas.* cannot be combined with the callback "
                    f"{type(callback).__name__}: it reads each round's clients or trainer and "
                    "would see replica 0 only; remove it (e.g. --trainer.callbacks=[]) or run "
                    "the replicas as separate runs (replica-aware: GlobalObjective, "
                    "ClassWiseAccuracy)"
                )
        self.own = [cb for cb in callbacks if _aware(cb)]
        self.copies: dict[int, list[Any]] = {k: [_fresh(cb) for cb in self.own]
                                             for k in range(1, count)}

    def of(self, k: int) -> list[Any]:
        """Replica ``k``'s callbacks (replica 0: the Trainer's own)."""
        return self.own if k == 0 else self.copies[k]

    def columns(self) -> list[str]:
        """The ``metrics.csv`` columns the callbacks add."""
        return [f"{cb.prefix}/{name}" for cb in self.own for name in cb.replica_metrics()]

    def start(self, replicas: Sequence[Replica]) -> None:
        """At the start of fit (after a checkpoint's state is restored): what each copy's
        ``on_fit_start`` needs of its replica's module (:meth:`RoundCallback.replica_start`:
        ``GlobalObjective``'s exact optimum ``F*``, solved from the replica's weights as the
        run alone does)."""
        for rep in replicas[1:]:
            for cb in self.copies[rep.index]:
                cb.replica_start(rep.module)

    def round_end(self, rep: Replica, result: RoundResult) -> None:
        """After replica ``rep`` (not 0) published ``result``: its copies measure it."""
        if rep.index == 0:
            return
        for cb in self.copies[rep.index]:
            if cb.is_due(result.round):
                start = time.perf_counter()
                metrics = cb.measure(rep.module, result.global_after)
                cb.seconds += time.perf_counter() - start
                cb.history.append({"round": float(result.round + 1),
                                   **{k: float(v) for k, v in metrics.items()}})

    def fill(self, rep: Replica, rows: Sequence[dict[str, Any]]) -> None:
        """Put the callbacks' values of each round into ``rows`` (the replica's metrics)."""
        for cb in self.of(rep.index):
            by_round = {int(r["round"]): r for r in cb.history}
            for row in rows:
                found = by_round.get(int(row["round"]), {})
                for name in cb.replica_metrics():
                    if name in found:
                        row[f"{cb.prefix}/{name}"] = found[name]

    def write(self, rep: Replica, folder: str) -> None:
        """``<folder>/analysis/<prefix>.json`` and figure of each of replica ``rep``'s
        callbacks."""
        callbacks = self.of(rep.index)
        if not callbacks:
            return
        out = os.path.join(folder, "analysis")
        os.makedirs(out, exist_ok=True)
        for cb in callbacks:
            view = copy.copy(cb)  # the Trainer's own keeps writing into the run's analysis/
            view._dir = out
            view.write_history(None)
            if view.history:
                view.plot(None)

    def state_dict(self, k: int) -> list[dict[str, Any]]:
        return [cb.state_dict() for cb in self.copies.get(k, [])]

    def load_state_dict(self, k: int, entry: dict[str, Any]) -> None:
        """Restore replica ``k``'s copies from its checkpoint ``entry``."""
        for cb, state in zip(self.copies.get(k, []), entry.get("callbacks") or [], strict=False):
            cb.load_state_dict(state)


def _fresh(callback: Any) -> Any:
    """A copy of ``callback`` with its arguments and nothing it measured."""
    clone = copy.deepcopy(callback)
    clone.history, clone.seconds, clone._dir = [], 0.0, None
    return clone
