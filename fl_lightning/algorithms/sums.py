"""``RoundSums``: what a streamed server rule accumulates over a round's kept clients.

A server rule written as sums (:meth:`Algorithm.begin_sums`, :meth:`Algorithm.fold`,
:meth:`Algorithm.finish`) takes each client's result as it finishes training and keeps only
accumulators the size of the model, so a round holds ``O(model)`` memory instead of ``O(K x
model)`` (``docs/scale.md``). :meth:`Algorithm.aggregate` runs the same three steps over a
list, so the list and the stream give the same numbers.

The data-size weighted mean is ``(sum_k n_k w_k) / sum_k n_k``, accumulated left to right
over the kept clients and divided once at the end (the arithmetic of the DDP all-reduce,
:func:`fl_lightning.distributed.allreduce_average`): a round with a skipped client ends bit
for bit as the round without it. Before streaming the weights were normalized first
(``sum_k (n_k / n) w_k``); in float64 the two agree within 1e-15 relative, in float32 the last
bits may differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["RoundSums", "accumulate"]


def accumulate(acc: dict[str, Tensor], values: Mapping[str, Tensor], scale: float,
               names: Iterable[str]) -> None:
    """``acc[k] += values[k] * scale`` for every name (the first term is ``values[k] * scale``
    itself, as :func:`fl_lightning.tensors.weighted_mean` starts)."""
    for k in names:
        term = values[k] * scale
        acc[k] = term if k not in acc else acc[k] + term


@dataclass
class RoundSums:
    """The accumulators of one round's server rule.

    Attributes:
        names: the global weights' names (what the mean is taken over).
        num_clients: the population size the round was planned with (``None``: unknown).
        total_samples: the population's samples (``None``: unknown).
        kept: clients folded so far.
        kept_samples: their samples.
        values: the rule's accumulators (``"mean"``: ``sum_k n_k w_k``; an algorithm adds
            its own, e.g. SCAFFOLD's ``"delta_c"``).
        counts: how many terms went into each accumulator.
        scalars: plain-number accumulators (FedNova's ``sum_k n_k a_k``).
    """

    names: list[str]
    num_clients: int | None = None
    total_samples: int | None = None
    kept: int = 0
    kept_samples: int = 0
    values: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)

    def count(self, num_samples: int) -> None:
        """Record one more kept client of ``num_samples`` samples."""
        self.kept += 1
        self.kept_samples += int(num_samples)

    def add(self, key: str, values: Mapping[str, Tensor], scale: float = 1.0) -> None:
        """``values[key][k] += scale * values[k]`` over :attr:`names`; counts the term."""
        accumulate(self.values.setdefault(key, {}), values, scale, self.names)
        self.counts[key] = self.counts.get(key, 0) + 1

    def mean(self, key: str = "mean") -> dict[str, Tensor]:
        """What :meth:`add` put under ``key`` (with the weights ``n_k``) over the kept
        samples: the data-size weighted mean."""
        acc, total = self.values[key], float(self.kept_samples)
        return {k: acc[k] / total for k in self.names}
