"""A synthetic population of any size: each client's data generated on demand from its id.

``--data.dataset synthetic_population --data.partition natural --data.num_clients N`` is the
FedProx paper's Synthetic(alpha, beta) family (:mod:`fl_lightning.data.natural`) for cross-device
populations (10^5 clients and more), without a centralized dataset:

* client ``k``'s priors and samples come from ``numpy.random.default_rng([seed, STREAM, k])``:
  ``u_k ~ N(0, alpha^2)``, ``B_k ~ N(0, beta^2)``, ``v_k ~ N(B_k, I_60)``, ``W_k ~ N(u_k, 1)``
  (60 x 10), ``b_k ~ N(u_k, 1)``, ``x ~ N(v_k, diag(j^-1.2))``, ``y = argmax(W_k^T x + b_k)``;
  the same id gives the same data whatever else is generated, in any order, in any process;
* sizes ``min(int(lognormal(4, 2)) + 50, 1000)``: the FedProx law, capped at LEAF's synthetic
  generator's ``MAX_NUM_SAMPLES = 1000`` (uncapped, 10^5 draws hold clients of ~10^5 samples);
  all ``N`` sizes are one vectorized counter-based draw (:mod:`fl_lightning.data.counters`,
  8 bytes per client), which gives ``total_samples`` without generating a sample;
* the global test set is a fixed held-out sample of :data:`TEST_CLIENTS` clients that are not
  in the population (their own stream), all of their samples: the same test set for every
  ``N``, so runs at different scales are compared on the same data.

Only the sampled clients' samples exist in a round (``ClientwiseRounds``); :attr:`generated`
counts the samples made so far (what the tests check instead of the RSS).
"""

from __future__ import annotations

import numpy as np

from fl_lightning.data.counters import counter_bits
from fl_lightning.data.natural import (
    COV_POWER,
    SIZE_MEAN,
    SIZE_MIN,
    SIZE_SIGMA,
    SYNTHETIC_CLASSES,
    SYNTHETIC_DIM,
    _prior_std,
)

__all__ = ["MAX_SIZE", "SyntheticPopulation", "TEST_CLIENTS"]

#: The streams of the population's draws (the key after the seed).
TRAIN_STREAM, TEST_STREAM, SIZE_STREAM = 11, 12, 13
#: LEAF's synthetic ``MAX_NUM_SAMPLES``.
MAX_SIZE = 1000
TEST_CLIENTS = 100


def _normal(bits_a: np.ndarray, bits_b: np.ndarray) -> np.ndarray:
    """Standard normals from two 64-bit draws each (Box-Muller on 53-bit uniforms in (0, 1))."""
    scale = 1.0 / (1 << 53)
    u1 = ((bits_a >> np.uint64(11)).astype(np.float64) + 0.5) * scale
    u2 = ((bits_b >> np.uint64(11)).astype(np.float64) + 0.5) * scale
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


class SyntheticPopulation:
    """Synthetic(alpha, beta) clients made on demand (see the module's docstring).

    Args:
        num_clients: the population ``N``.
        seed: ``--data.seed``.
        alpha, beta: the priors' standard deviations (``--data.synthetic_alpha/beta``).

    Example:
        >>> pop = SyntheticPopulation(100_000, seed=0)
        >>> x, y = pop.client(99_999)
        >>> x.shape == (pop.sizes[99_999], 60), pop.generated == len(y)
        (True, True)
    """

    def __init__(self, num_clients: int, seed: int = 0, alpha: float = 1.0,
                 beta: float = 1.0) -> None:
        self.num_clients = int(num_clients)
        self.seed = int(seed)
        self.alpha = _prior_std(alpha, "--data.synthetic_alpha")
        self.beta = _prior_std(beta, "--data.synthetic_beta")
        self.sizes = self._sizes(np.arange(self.num_clients, dtype=np.int64), SIZE_STREAM)
        self.generated = 0
        self._std_x = np.power(np.arange(1, SYNTHETIC_DIM + 1, dtype=np.float64), -COV_POWER / 2)

    def _sizes(self, ids: np.ndarray, stream: int) -> np.ndarray:
        z = _normal(counter_bits(self.seed, stream, ids, 0),
                    counter_bits(self.seed, stream, ids, 1))
        raw = np.exp(SIZE_MEAN + SIZE_SIGMA * z).astype(np.int64) + SIZE_MIN
        return np.minimum(raw, MAX_SIZE)

    def _generate(self, stream: int, client: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, stream, int(client)])
        u = rng.normal(0.0, self.alpha)
        v = rng.normal(rng.normal(0.0, self.beta), 1.0, SYNTHETIC_DIM)
        w = rng.normal(u, 1.0, (SYNTHETIC_DIM, SYNTHETIC_CLASSES))
        b = rng.normal(u, 1.0, SYNTHETIC_CLASSES)
        x = v + rng.standard_normal((size, SYNTHETIC_DIM)) * self._std_x
        self.generated += size
        return x.astype(np.float32), np.argmax(x @ w + b, axis=1).astype(np.int64)

    def client(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``client``'s training samples: float32 ``(n_k, 60)`` and int64 labels."""
        if not 0 <= int(client) < self.num_clients:
            raise IndexError(f"client {client} is not in the population of {self.num_clients}")
        return self._generate(TRAIN_STREAM, client, int(self.sizes[client]))

    def clients(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The samples of ``ids``, client after client."""
        parts = [self.client(c) for c in ids]
        if not parts:
            return np.zeros((0, SYNTHETIC_DIM), np.float32), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def test_set(self) -> tuple[np.ndarray, np.ndarray]:
        """The held-out clients' samples (the global test set; independent of ``N``)."""
        ids = np.arange(TEST_CLIENTS, dtype=np.int64)
        sizes = self._sizes(ids, TEST_STREAM)
        parts = [self._generate(TEST_STREAM, int(c), int(n)) for c, n in zip(ids, sizes,
                                                                              strict=True)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
