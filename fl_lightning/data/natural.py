"""Datasets that arrive already split into devices (a *natural* partition).

* :func:`synthetic` -- the FedProx paper's Synthetic(alpha, beta) and Synthetic IID data
  (Li et al., MLSys 2020, section 5.1; ``data/synthetic_*/generate_synthetic.py`` and
  ``data/synthetic_iid/generate_iid.py`` of ``litian96/FedProx``), re-implemented here.
* :func:`powerlaw_devices` -- the paper's MNIST split: every device holds two digits, a few
  samples of each plus a power-law (lognormal) share of the rest
  (``data/mnist/generate_niid.py``).
* :func:`split_devices` -- each device's samples shuffled and cut 90/10 into train and test,
  as both official scripts do.

A :class:`NaturalData` holds the pooled train and test arrays and, per device, the indices of
its train and its test samples. Every function is a pure function of its arguments and
``seed`` (a private ``numpy.random.default_rng``): the official scripts draw from numpy's
unseeded global stream, so their files cannot be regenerated draw for draw; the distributions
are the same (see ``docs/data.md``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from fl_lightning.errors import ConfigError

__all__ = ["NaturalData", "powerlaw_devices", "split_devices", "synthetic",
           "SYNTHETIC_CLASSES", "SYNTHETIC_DIM"]

SYNTHETIC_DIM = 60
SYNTHETIC_CLASSES = 10
#: ``sizes = lognormal(SIZE_MEAN, SIZE_SIGMA).astype(int) + SIZE_MIN`` (official constants).
SIZE_MEAN, SIZE_SIGMA, SIZE_MIN = 4.0, 2.0, 50
#: ``x ~ N(v_k, diag(j^-COV_POWER))``, ``j = 1..60``.
COV_POWER = 1.2
TRAIN_SHARE = 0.9


@dataclass
class NaturalData:
    """Pooled samples and each device's train / test indices into them.

    Attributes:
        train_x, train_y: every device's training samples, device after device.
        test_x, test_y: every device's test samples, device after device.
        train_parts, test_parts: per device, int64 indices into the train / test arrays.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_parts: list[np.ndarray]
    test_parts: list[np.ndarray]


def _prior_std(value, option: str) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or float(value) < 0:
        raise ConfigError(
            f"{option}={value!r} is invalid: it is the standard deviation of a Gaussian prior, "
            "a finite number >= 0 (the paper uses 0, 0.5 and 1)"
        )
    return float(value)


def synthetic_sizes(num_devices: int, rng: np.random.Generator) -> np.ndarray:
    """Samples per device: ``int(lognormal(4, 2)) + 50``."""
    return rng.lognormal(SIZE_MEAN, SIZE_SIGMA, num_devices).astype(np.int64) + SIZE_MIN


def synthetic_devices(
    alpha: float, beta: float, iid: bool = False, num_devices: int = 30, seed: int = 0,
    dim: int = SYNTHETIC_DIM, num_classes: int = SYNTHETIC_CLASSES,
) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, np.ndarray]]:
    """Every device's ``(x, y)`` before the train/test split, and the drawn priors.

    Synthetic(alpha, beta): per device ``k``, ``u_k ~ N(0, alpha^2)``, ``B_k ~ N(0, beta^2)``,
    ``v_k ~ N(B_k, I)``, ``W_k ~ N(u_k, 1)`` entrywise ``(dim, classes)``, ``b_k ~ N(u_k, 1)``;
    ``x ~ N(v_k, diag(j^-1.2))`` and ``y = argmax(W_k^T x + b_k)`` (the argmax of the softmax).
    ``alpha`` and ``beta`` are standard deviations, as in the official ``np.random.normal(0,
    alpha)``. Synthetic IID (``iid=True``): one ``W, b ~ N(0, 1)`` for all devices and
    ``v_k = 0``. Sizes: ``int(lognormal(4, 2)) + 50`` per device.

    Returns:
        ``(xs, ys, priors)``: per device float64 ``(n_k, dim)`` inputs and int64 labels;
        ``priors`` holds ``sizes``, ``u``, ``B``, ``v``, ``W``, ``b`` (arrays over devices).
    """
    a = _prior_std(alpha, "--data.synthetic_alpha")
    b_std = _prior_std(beta, "--data.synthetic_beta")
    if isinstance(num_devices, bool) or int(num_devices) < 1:
        raise ConfigError(
            f"--data.num_clients={num_devices!r} is invalid: the synthetic data needs >= 1 device"
        )
    k = int(num_devices)
    rng = np.random.default_rng(int(seed))
    sizes = synthetic_sizes(k, rng)
    std_x = np.power(np.arange(1, dim + 1, dtype=np.float64), -COV_POWER / 2)
    if iid:
        u = np.zeros(k)
        big_b = np.zeros(k)
        v = np.zeros((k, dim))
        w_one = rng.normal(0.0, 1.0, (dim, num_classes))
        b_one = rng.normal(0.0, 1.0, num_classes)
        w = np.broadcast_to(w_one, (k, dim, num_classes)).copy()
        bias = np.broadcast_to(b_one, (k, num_classes)).copy()
    else:
        u = rng.normal(0.0, a, k)
        big_b = rng.normal(0.0, b_std, k)
        v = rng.normal(big_b[:, None], 1.0, (k, dim))
        w = rng.normal(u[:, None, None], 1.0, (k, dim, num_classes))
        bias = rng.normal(u[:, None], 1.0, (k, num_classes))
    xs, ys = [], []
    for i in range(k):
        x = v[i] + rng.standard_normal((int(sizes[i]), dim)) * std_x
        xs.append(x)
        ys.append(np.argmax(x @ w[i] + bias[i], axis=1).astype(np.int64))
    priors = {"sizes": sizes, "u": u, "B": big_b, "v": v, "W": w, "b": bias}
    return xs, ys, priors


def split_devices(
    xs: list[np.ndarray], ys: list[np.ndarray], seed: int, train_share: float = TRAIN_SHARE,
) -> NaturalData:
    """Shuffle each device's samples and keep the first ``int(0.9 n_k)`` for training."""
    rng = np.random.default_rng([int(seed), 1])
    tr_x, tr_y, te_x, te_y, tr_parts, te_parts = [], [], [], [], [], []
    n_tr = n_te = 0
    for x, y in zip(xs, ys, strict=True):
        order = rng.permutation(len(y))
        cut = int(train_share * len(y))
        tr, te = order[:cut], order[cut:]
        tr_x.append(x[tr])
        tr_y.append(y[tr])
        te_x.append(x[te])
        te_y.append(y[te])
        tr_parts.append(np.arange(n_tr, n_tr + len(tr), dtype=np.int64))
        te_parts.append(np.arange(n_te, n_te + len(te), dtype=np.int64))
        n_tr += len(tr)
        n_te += len(te)
    dim = xs[0].shape[1:] if xs else (0,)

    def cat(parts: list[np.ndarray], shape: tuple) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(shape)

    return NaturalData(
        cat(tr_x, (0, *dim)), cat(tr_y, (0,)).astype(np.int64),
        cat(te_x, (0, *dim)), cat(te_y, (0,)).astype(np.int64), tr_parts, te_parts,
    )


def synthetic(
    alpha: float, beta: float, iid: bool = False, num_devices: int = 30, seed: int = 0,
) -> NaturalData:
    """Synthetic(alpha, beta) (or Synthetic IID) split 90/10 per device (see
    :func:`synthetic_devices`)."""
    xs, ys, _ = synthetic_devices(alpha, beta, iid, num_devices, seed)
    return split_devices(xs, ys, seed)


def powerlaw_devices(
    labels, num_devices: int = 1000, classes_per_device: int = 2, min_per_class: int = 5,
    sigma: float = 2.0, seed: int = 0,
) -> list[np.ndarray]:
    """The FedProx paper's MNIST partition: two digits per device, power-law sizes.

    Device ``d`` holds the classes ``(d + j) mod C``, ``j < classes_per_device``. First every
    device takes ``min_per_class`` samples of each of its classes (in class order); then each
    (device, class) slot draws a share ``s ~ lognormal(0, sigma)``, the shares of the slots of
    one class are scaled to sum to that class's remaining samples, and the slot takes the next
    ``int(share)`` samples of the class if they are all left (official: ``idx + n < len``).
    Samples within a class are taken in their order in ``labels``.

    Raises:
        ConfigError: when some class has fewer samples than its slots need at the start
            (``min_per_class`` times the number of devices holding it).
    """
    y = np.asarray(labels).astype(np.int64)
    classes = np.unique(y)
    c = len(classes)
    d = int(num_devices)
    s = int(classes_per_device)
    if d < 1 or s < 1 or s > c:
        raise ConfigError(
            f"--data.num_clients={num_devices!r} with {classes_per_device} classes per device is "
            f"invalid for the powerlaw partition of {c} classes: use >= 1 devices and 1..{c} "
            "classes per device"
        )
    pools = [np.flatnonzero(y == cls) for cls in classes]
    slots = [[(dev, j) for dev in range(d) for j in range(s) if (dev + j) % c == cl]
             for cl in range(c)]
    for cl in range(c):
        need = len(slots[cl]) * int(min_per_class)
        if need > len(pools[cl]):
            most = len(pools[cl]) * c // (s * int(min_per_class))
            raise ConfigError(
                f"--data.partition powerlaw with --data.num_clients={d}: class {classes[cl]} has "
                f"{len(pools[cl])} samples but the {len(slots[cl])} devices holding it need "
                f"{min_per_class} each ({need}); use at most about {most} devices"
            )
    rng = np.random.default_rng(int(seed))
    share = rng.lognormal(0.0, float(sigma), (d, s))
    parts: list[list[np.ndarray]] = [[] for _ in range(d)]
    taken = np.zeros(c, dtype=np.int64)
    for cl in range(c):
        for dev, _ in slots[cl]:
            parts[dev].append(pools[cl][taken[cl]:taken[cl] + min_per_class])
            taken[cl] += min_per_class
    for cl in range(c):
        rest = len(pools[cl]) - taken[cl]
        total = sum(share[dev, j] for dev, j in slots[cl])
        for dev, j in slots[cl]:
            n = int(rest * share[dev, j] / total) if total > 0 else 0
            if taken[cl] + n < len(pools[cl]):
                parts[dev].append(pools[cl][taken[cl]:taken[cl] + n])
                taken[cl] += n
    return [np.concatenate(p).astype(np.int64) for p in parts]
