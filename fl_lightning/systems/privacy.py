"""Client-level differential privacy: DP-FedAvg (McMahan et al., 2018) with an RDP accountant."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from fl_lightning.validate import positive, share

__all__ = ["DPFedAvg", "RDP_ORDERS", "clip_update", "dp_epsilon", "dp_noise_std"]

#: The RDP orders of Opacus' ``RDPAccountant.DEFAULT_ALPHAS``: 1.1, 1.2, ..., 10.9, 12, ..., 63.
RDP_ORDERS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]


def clip_update(delta: Tensor, clip_norm: float) -> Tensor:
    """``Delta * min(1, C / ||Delta||_2)``: the update scaled to norm at most ``C``."""
    norm = float(torch.linalg.vector_norm(delta))
    return delta * (clip_norm / norm) if norm > clip_norm else delta


def dp_noise_std(noise_multiplier: float, clip_norm: float, expected_clients: float) -> float:
    """Standard deviation ``sigma = z C / m`` of the server's Gaussian noise on each coordinate of
    the averaged update (the sum's sensitivity is ``C``; it is divided by the fixed ``m``)."""
    return noise_multiplier * clip_norm / expected_clients


def dp_epsilon(
    sample_rate: float, noise_multiplier: float, rounds: int, delta: float
) -> tuple[float, float]:
    """``(epsilon, best order)`` after ``rounds`` rounds of the subsampled Gaussian mechanism.

    RDP of one round at order ``alpha`` (Mironov et al., 2019; for ``q = 1`` it is
    ``alpha / (2 z^2)``) is composed over the rounds and converted with Balle et al. (2020,
    Thm. 21): ``eps = min_alpha [T rdp(alpha) + log((alpha - 1)/alpha)
    - (log delta + log alpha) / (alpha - 1)]``. Both come from Opacus
    (``opacus.accountants.analysis.rdp``), over :data:`RDP_ORDERS`.
    """
    if rounds <= 0:
        return 0.0, float("nan")
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=rounds,
                      orders=RDP_ORDERS)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": eps is still valid
        warnings.simplefilter("ignore", UserWarning)
        eps, alpha = get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps), float(alpha)


class DPFedAvg:
    """Client-level DP-FedAvg: clip each update to norm ``C``, average with a fixed
    denominator, add Gaussian noise at the server.

    Each reporting client sends ``clip(Delta_k) = Delta_k min(1, C / ||Delta_k||)``; the server
    computes ``sum_k clip(Delta_k) / m + N(0, sigma^2 I)`` with ``m`` the expected number of
    clients per round (``clients_per_round``; dropouts do not shrink it) and
    ``sigma = z C / m`` (:func:`dp_noise_std`). Client weights are uniform, as the sum's
    sensitivity must not depend on data sizes. With a robust aggregator, the aggregator runs
    on the clipped updates and the same noise is added; the accountant's epsilon is then that
    of the mean (a robust rule's sensitivity can differ).

    The privacy loss is tracked with the RDP accountant of the subsampled Gaussian mechanism
    at sampling rate ``q = clients_per_round / N`` (:func:`dp_epsilon`). Clients are sampled
    without replacement here, whereas the accountant assumes Poisson sampling: the reported
    epsilon is the standard approximation used by DP-FedAvg and Opacus.

    Args:
        clip_norm: ``C > 0``.
        noise_multiplier: ``z > 0``.
        delta: the ``delta`` of the reported ``(epsilon, delta)``, in ``(0, 1)``.

    Raises:
        ConfigError: for a value out of range.

    Example:
        >>> dp = DPFedAvg(clip_norm=1.0, noise_multiplier=1.0)
        >>> dp.noise_std(10)
        0.1
    """

    def __init__(
        self, clip_norm: float = 1.0, noise_multiplier: float = 1.0, delta: float = 1e-5
    ) -> None:
        self.clip_norm = positive(clip_norm, "--model.privacy.clip_norm",
                                  "the clipping norm C; e.g. 1.0")
        self.noise_multiplier = positive(noise_multiplier, "--model.privacy.noise_multiplier",
                                         "the noise multiplier z; e.g. 1.0")
        self.delta = share(delta, "--model.privacy.delta",
                           "below 1 / number of clients; e.g. 1e-5", low_open=True)

    def clip(self, delta: Tensor) -> Tensor:
        """The update clipped to norm ``C`` (:func:`clip_update`)."""
        return clip_update(delta, self.clip_norm)

    def noise_std(self, expected_clients: float) -> float:
        """``z C / m`` (:func:`dp_noise_std`)."""
        return dp_noise_std(self.noise_multiplier, self.clip_norm, expected_clients)

    def epsilon(self, sample_rate: float, rounds: int) -> float:
        """Epsilon at :attr:`delta` after ``rounds`` rounds (:func:`dp_epsilon`)."""
        return dp_epsilon(sample_rate, self.noise_multiplier, rounds, self.delta)[0]
