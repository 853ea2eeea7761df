"""Byzantine-robust aggregation of client updates: median, trimmed mean, (Multi-)Krum, norm
bounding. Each replaces the server's weighted mean of the updates ``Delta_k = w_k - w_g``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fl_lightning.errors import ConfigError
from fl_lightning.validate import integer, positive, share

__all__ = [
    "CoordinateMedian",
    "Krum",
    "NormBounding",
    "RobustAggregator",
    "TrimmedMean",
    "coordinate_median",
    "krum_select",
    "norm_bounded_mean",
    "trimmed_mean",
]


def coordinate_median(updates: Tensor) -> Tensor:
    """Coordinate-wise median of the rows of ``updates`` (``[n, d]``); for even ``n`` the mean
    of the two middle values."""
    n = updates.shape[0]
    s = updates.sort(dim=0).values
    if n % 2:
        return s[n // 2]
    return (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean(updates: Tensor, beta: float) -> Tensor:
    """Coordinate-wise ``beta``-trimmed mean: per coordinate, drop the ``b = floor(beta n)``
    largest and ``b`` smallest values and average the ``n - 2b`` others (Yin et al., 2018)."""
    n = updates.shape[0]
    b = int(math.floor(beta * n + 1e-9))
    if n - 2 * b < 1:
        raise ValueError(f"trimmed mean with beta={beta} leaves no value among {n}")
    return updates.sort(dim=0).values[b:n - b].mean(dim=0)


def krum_select(updates: Tensor, num_byzantine: int, multi: int = 1) -> list[int]:
    """Multi-Krum (Blanchard et al., 2017): the ``multi`` rows with the lowest Krum score.

    ``score(i) = sum of ||u_i - u_j||^2 over the n - f - 2 rows j != i closest to u_i``.
    """
    n = updates.shape[0]
    closest = n - num_byzantine - 2
    if closest < 1 or not 1 <= multi <= n:
        raise ValueError(f"Krum needs n > f + 2 and 1 <= multi <= n (n={n}, f={num_byzantine})")
    flat = updates.double()
    sq = (flat * flat).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T).clamp_min(0.0)
    dist.fill_diagonal_(math.inf)
    scores = dist.sort(dim=1).values[:, :closest].sum(1)
    order = sorted(range(n), key=lambda i: (float(scores[i]), i))
    return order[:multi]


def norm_bounded_mean(updates: Tensor, weights: Tensor, max_norm: float) -> Tensor:
    """Weighted mean of the updates, each first scaled to norm at most ``max_norm``:
    ``sum_k p_k Delta_k min(1, M / ||Delta_k||)`` (Sun et al., 2019)."""
    norms = torch.linalg.vector_norm(updates, dim=1)
    scale = (max_norm / norms.clamp_min(1e-30)).clamp(max=1.0)
    p = weights / weights.sum()
    return (updates * (scale * p).unsqueeze(1)).sum(0)


class RobustAggregator:
    """The server's replacement for the weighted mean of the client updates.

    It receives the stacked updates ``U = [Delta_1; ...; Delta_n]`` (``[n, d]``) and the
    clients' data sizes, and returns one update; the server then sets ``w_g + aggregate`` as the
    round's aggregate (before DP noise and the server optimizer). It needs each client's update,
    so it cannot be combined with secure aggregation.

    Example:
        >>> CoordinateMedian()(torch.tensor([[0.0], [1.0], [9.0]]), torch.ones(3)).tolist()
        [1.0]
    """

    name = "mean"

    def __call__(self, updates: Tensor, weights: Tensor) -> Tensor:
        p = weights / weights.sum()
        return (updates * p.unsqueeze(1)).sum(0)

    def check(self, num_reporting: int) -> None:
        """Raise ``ConfigError`` if the rule is undefined for ``num_reporting`` clients."""


class CoordinateMedian(RobustAggregator):
    """Coordinate-wise median of the updates (Yin et al., 2018): unweighted; tolerates fewer
    than half of the clients being malicious in each coordinate.

    Example:
        >>> CoordinateMedian()(torch.tensor([[0.0, 5.0], [1.0, 6.0]]), torch.ones(2)).tolist()
        [0.5, 5.5]
    """

    name = "median"

    def __call__(self, updates: Tensor, weights: Tensor) -> Tensor:
        return coordinate_median(updates)


class TrimmedMean(RobustAggregator):
    """Coordinate-wise ``beta``-trimmed mean (Yin et al., 2018); see :func:`trimmed_mean`.

    Args:
        beta: share trimmed at each end, in ``[0, 0.5)``; set it at least to the share of
            attackers expected among the reporting clients.

    Raises:
        ConfigError: if ``beta`` is outside ``[0, 0.5)``.

    Example:
        >>> u = torch.tensor([[-100.0], [1.0], [2.0], [3.0], [100.0]])
        >>> TrimmedMean(beta=0.2)(u, torch.ones(5)).tolist()
        [2.0]
    """

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.2) -> None:
        self.beta = share(beta, "--model.aggregator.beta",
                          "the share trimmed at each end; e.g. 0.2", high=0.5)

    def __call__(self, updates: Tensor, weights: Tensor) -> Tensor:
        return trimmed_mean(updates, self.beta)


class Krum(RobustAggregator):
    """Krum / Multi-Krum (Blanchard et al., 2017): average the ``multi`` updates with the lowest
    score ``sum_{j in N_i} ||Delta_i - Delta_j||^2`` over their ``n - f - 2`` nearest others.

    Args:
        num_byzantine: ``f``, the number of attackers to tolerate among the reporting clients;
            Krum requires ``n > 2 f + 2``.
        multi: how many updates to average (1 is Krum, more is Multi-Krum).

    Raises:
        ConfigError: for ``f < 0``, ``multi < 1``, or (at setup) too few clients per round.

    Example:
        >>> u = torch.tensor([[0.0], [0.1], [0.2], [0.15], [50.0]])
        >>> Krum(num_byzantine=1)(u, torch.ones(5)).tolist()
        [0.15000000596046448]
    """

    name = "krum"

    def __init__(self, num_byzantine: int = 1, multi: int = 1) -> None:
        integer(num_byzantine, "--model.aggregator.num_byzantine", 0,
                hint="the number of attackers per round to tolerate")
        integer(multi, "--model.aggregator.multi", 1, hint="1 is Krum, more is Multi-Krum")
        self.num_byzantine = num_byzantine
        self.multi = multi

    def check(self, num_reporting: int) -> None:
        n, f = num_reporting, self.num_byzantine
        if n <= 2 * f + 2:
            raise ConfigError(
                f"--model.aggregator.num_byzantine={f} is too many for {n} reporting "
                f"clients per round: Krum needs n > 2f + 2, so use num_byzantine <= "
                f"{max((n - 3) // 2, 0)} or sample more clients (--model.sample_ratio)"
            )
        if self.multi > n - f:
            raise ConfigError(
                f"--model.aggregator.multi={self.multi} is too many for {n} reporting "
                f"clients and num_byzantine={f}: use multi <= {n - f}"
            )

    def __call__(self, updates: Tensor, weights: Tensor) -> Tensor:
        chosen = krum_select(updates, self.num_byzantine, self.multi)
        return updates[chosen].mean(0)


class NormBounding(RobustAggregator):
    """Norm bounding (Sun et al., 2019): scale every update to norm at most ``max_norm``, then
    take the data-size weighted mean; see :func:`norm_bounded_mean`.

    Args:
        max_norm: ``M > 0``, the largest update norm accepted as is.

    Example:
        >>> u = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
        >>> NormBounding(max_norm=1.0)(u, torch.ones(2)).tolist()
        [0.30000001192092896, 0.4000000059604645]
    """

    name = "norm_bounding"

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = positive(max_norm, "--model.aggregator.max_norm",
                                 "the update norm bound; e.g. 1.0")

    def __call__(self, updates: Tensor, weights: Tensor) -> Tensor:
        return norm_bounded_mean(updates, weights, self.max_norm)
