"""The option checks of :class:`~fl_lightning.data.module.FederatedDataModule` (``--data.*``).

Each bad value raises one :class:`~fl_lightning.errors.ConfigError` line naming the option, the
value and the fix; the data module's constructor calls them, then stores the values.
"""

from __future__ import annotations

import math

from fl_lightning.data.datasets import NATURAL, dataset_info
from fl_lightning.errors import ConfigError
from fl_lightning.suggest import did_you_mean

__all__ = ["AUGMENTATIONS", "PARTITIONS", "check_options", "check_priors"]

PARTITIONS = ("iid", "shard", "lda", "dirichlet", "natural", "powerlaw")
AUGMENTATIONS = ("paper", "none")


def check_options(
    dataset: str, num_clients: int, partition: str, shards_per_client: int, alpha: float,
    client_size: int | None, seed: int, sampling: str, eval_batch_size: int, augment: str,
    verify_checksums: bool,
) -> bool:
    """Check the data module's options (the arguments of its constructor, same names), in the
    constructor's order (the priors of ``synthetic`` are :func:`check_priors`).

    Returns:
        Whether ``dataset`` arrives split into devices (``synthetic``, ``synthetic_iid``).

    Raises:
        ConfigError: the first bad value.
    """
    natural = _check_partition(dataset, partition)
    if isinstance(num_clients, bool) or int(num_clients) < 1:
        raise ConfigError(
            f"--data.num_clients={num_clients!r} is invalid: it must be an integer >= 1"
        )
    bad_alpha = not (math.isfinite(float(alpha)) and float(alpha) > 0)
    if partition in ("lda", "dirichlet") and bad_alpha:
        raise ConfigError(
            f"--data.alpha={alpha!r} is invalid: the Dirichlet concentration must be a finite "
            "number > 0 "
            "(e.g. 0.1 for strong, 1.0 for mild heterogeneity)"
        )
    if client_size is not None and partition != "dirichlet":
        raise ConfigError(
            f"--data.client_size={client_size!r} is only used by --data.partition "
            f"dirichlet (got --data.partition {partition}): drop it or use dirichlet"
        )
    if partition == "shard" and int(shards_per_client) < 1:
        raise ConfigError(
            f"--data.shards_per_client={shards_per_client!r} is invalid: it must be >= 1"
        )
    if isinstance(seed, bool) or int(seed) < 0:
        raise ConfigError(f"--data.seed={seed!r} is invalid: use an integer >= 0")
    if int(eval_batch_size) < 1:
        raise ConfigError(
            f"--data.eval_batch_size={eval_batch_size!r} is invalid: it must be >= 1"
        )
    if sampling not in ("seeded", "official"):
        raise ConfigError(
            f"--data.sampling={sampling!r} is unknown: use 'seeded' or 'official'"
        )
    if augment not in AUGMENTATIONS:
        raise ConfigError(
            f"--data.augment={augment!r} is unknown: use 'paper' (the official code's "
            "augmentation) or 'none'"
        )
    if not isinstance(verify_checksums, bool):
        raise ConfigError(
            f"--data.verify_checksums={verify_checksums!r} is invalid: use true or false"
        )
    return natural


def _check_partition(dataset: str, partition: str) -> bool:
    """``partition`` is known and fits ``dataset``; returns whether ``dataset`` is natural.

    Raises:
        ConfigError: unknown partition, or one the dataset cannot take.
    """
    if partition not in PARTITIONS:
        raise ConfigError(
            f"--data.partition={partition!r} is unknown"
            f"{did_you_mean(str(partition), PARTITIONS, prefix='--data.partition ')}: use one "
            f"of {', '.join(PARTITIONS)}"
        )
    natural = dataset_info(dataset).name in NATURAL
    if natural and partition != "natural":
        raise ConfigError(
            f"--data.partition={partition} is invalid for --data.dataset {dataset}: it "
            "arrives already split into devices (users); use --data.partition natural"
        )
    if partition == "natural" and not natural:
        raise ConfigError(
            f"--data.partition natural is invalid for --data.dataset {dataset}: it arrives "
            "centralized; use synthetic, synthetic_iid, synthetic_population or a LEAF set "
            "(femnist, shakespeare, sent140, synthetic_leaf), or a partition such as lda"
        )
    if partition == "powerlaw" and dataset_info(dataset).name != "mnist":
        raise ConfigError(
            f"--data.partition powerlaw is the FedProx paper's MNIST split (got "
            f"--data.dataset {dataset}): use --data.dataset mnist or another partition"
        )
    return natural


def check_priors(synthetic_alpha: float, synthetic_beta: float) -> None:
    """``--data.synthetic_alpha`` and ``--data.synthetic_beta`` are valid prior deviations.

    Raises:
        ConfigError: either is not a finite number > 0 (:mod:`fl_lightning.data.natural`).
    """
    from fl_lightning.data.natural import _prior_std

    _prior_std(synthetic_alpha, "--data.synthetic_alpha")
    _prior_std(synthetic_beta, "--data.synthetic_beta")
