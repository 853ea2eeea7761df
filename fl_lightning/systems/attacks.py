"""Attacks by a fixed, seeded share of malicious clients: label flipping and corrupted updates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fl_lightning.systems._common import STREAM_MALICIOUS, generator
from fl_lightning.validate import positive
from fl_lightning.validate import share as share_of

__all__ = [
    "Attack",
    "GaussianUpdate",
    "LabelFlip",
    "Scaling",
    "SignFlip",
    "flip_labels",
    "malicious_clients",
]


def malicious_clients(seed: int, num_clients: int, share: float) -> list[int]:
    """The ``floor(share * N)`` malicious clients of a population of ``N``: the first ones of a
    random permutation seeded by ``seed`` alone, so the set is the same in every round."""
    count = int(math.floor(share * num_clients + 1e-9))
    order = torch.randperm(num_clients, generator=generator(seed, STREAM_MALICIOUS))
    return sorted(order[:count].tolist())


def flip_labels(y: Tensor, indices: Sequence[Tensor], num_classes: int) -> Tensor:
    """A copy of ``y`` where the samples in ``indices`` have label ``C - 1 - y`` (the classic
    label-flipping attack: 0 <-> 9, 1 <-> 8, ... for ``C = 10``)."""
    out = y.clone()
    if len(indices):
        idx = torch.cat([torch.as_tensor(i, dtype=torch.long) for i in indices]).to(y.device)
        out[idx] = num_classes - 1 - y[idx]
    return out


class Attack:
    """A share of the population is malicious; subclasses say what malicious clients do.

    The malicious clients are a fixed subset of ``floor(share * N)`` clients drawn once from the
    data seed (:func:`malicious_clients`); whether they are sampled in a round is up to the
    client sampling, so a round sees ``share * m`` of them on average. A data-level attack
    (:attr:`flips_labels`) trains malicious clients on corrupted labels; an update-level attack
    replaces the update ``Delta_k = w_k - w_g`` a malicious client sends by :meth:`corrupt`.

    Args:
        share: share of the population that is malicious, in ``[0, 1)``.

    Raises:
        ConfigError: if ``share`` is outside ``[0, 1)``.

    Example:
        >>> len(SignFlip(share=0.2).malicious(0, 100))
        20
    """

    name = "none"
    flips_labels = False

    def __init__(self, share: float = 0.2) -> None:
        self.share = share_of(share, "--model.attack.share",
                              "the share of malicious clients; e.g. 0.2")

    def malicious(self, seed: int, num_clients: int) -> list[int]:
        """The malicious clients' ids (see :func:`malicious_clients`)."""
        return malicious_clients(seed, num_clients, self.share)

    def corrupt(self, delta: Tensor, gen: torch.Generator) -> Tensor:
        """The update a malicious client sends instead of its honest ``delta`` (flat)."""
        del gen
        return delta


class LabelFlip(Attack):
    """Label flipping: malicious clients train on labels ``C - 1 - y`` and send the honest
    update of that poisoned training.

    Example:
        >>> LabelFlip(share=0.1).flips_labels
        True
    """

    name = "label_flip"
    flips_labels = True


class SignFlip(Attack):
    """Sign flipping: a malicious client sends ``-scale * Delta_k``.

    Args:
        share: share of malicious clients.
        scale: how much the flipped update is amplified (``> 0``; 1 is the plain flip).

    Example:
        >>> SignFlip(scale=2.0).corrupt(torch.tensor([1.0, -0.5]), None).tolist()
        [-2.0, 1.0]
    """

    name = "sign_flip"

    def __init__(self, share: float = 0.2, scale: float = 1.0) -> None:
        super().__init__(share)
        self.scale = positive(scale, "--model.attack.scale", "the flip scale; e.g. 1.0")

    def corrupt(self, delta: Tensor, gen: torch.Generator) -> Tensor:
        return delta * -self.scale


class GaussianUpdate(Attack):
    """Gaussian updates: a malicious client sends ``N(0, std^2 I)`` noise, drawn from the seed
    of ``(seed, round, client)``.

    Args:
        share: share of malicious clients.
        std: standard deviation of each coordinate (``> 0``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> GaussianUpdate(std=1.0).corrupt(torch.zeros(10_000), g).std().round(decimals=1)
        tensor(1.)
    """

    name = "gaussian"

    def __init__(self, share: float = 0.2, std: float = 1.0) -> None:
        super().__init__(share)
        self.std = positive(std, "--model.attack.std", "the noise std; e.g. 1.0")

    def corrupt(self, delta: Tensor, gen: torch.Generator) -> Tensor:
        noise = torch.randn(delta.shape, generator=gen, device=delta.device, dtype=delta.dtype)
        return noise * self.std


class Scaling(Attack):
    """Scaling ("boosting", Bhagoji et al. 2019): a malicious client sends ``factor * Delta_k``,
    by default of an update trained on flipped labels, so that a few attackers outweigh the
    honest majority in a mean.

    Args:
        share: share of malicious clients.
        factor: the boost (``> 0``; e.g. 10).
        flip_labels: train the boosted update on flipped labels (``C - 1 - y``).

    Example:
        >>> Scaling(factor=10.0).corrupt(torch.tensor([0.5]), None).tolist()
        [5.0]
    """

    name = "scaling"

    def __init__(self, share: float = 0.2, factor: float = 10.0, flip_labels: bool = True) -> None:
        super().__init__(share)
        self.factor = positive(factor, "--model.attack.factor", "the boost factor; e.g. 10")
        self.flips_labels = bool(flip_labels)

    def corrupt(self, delta: Tensor, gen: torch.Generator) -> Tensor:
        return delta * self.factor

