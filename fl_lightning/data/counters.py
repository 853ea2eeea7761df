"""Counter-based random numbers: draws that are pure functions of integer keys.

A draw is ``bits = counter_bits(seed, stream, k_1, ..., k_n)``: the keys are folded one by one
through the SplitMix64 finalizer,

``h_0 = mix(seed + G)``,  ``h_i = mix((h_{i-1} XOR k_i) + G)``,  ``bits = h_n``,

with ``mix(z) = z3 = z2 XOR (z2 >> 31)``, ``z2 = (z1 XOR (z1 >> 27)) * 0x94D049BB133111EB``,
``z1 = (z XOR (z >> 30)) * 0xBF58476D1CE4E5B9`` and ``G = 0x9E3779B97F4A7C15``, all modulo
``2**64``. The keys broadcast like numpy arrays, so one call draws for every
``(client, step, sample)`` of a round at once. There is no generator state: the same keys give
the same bits on any machine, in any order, for any subset of the keys, which is what lets the
sequential and the batched engine, a resumed run and a CPU or GPU run see identical data.

The arithmetic runs on the host in numpy ``uint64`` (wrap-around is exact there); the data
module draws a whole round at once and copies the result to the device in one transfer.

Streams used by the project (the second key, so streams never collide):
:data:`ORDER_STREAM` (per-epoch sample order) and :data:`AUGMENT_STREAM` (augmentation).

Example:
    >>> a = counter_bits(0, AUGMENT_STREAM, np.arange(3))
    >>> bool((a == counter_bits(0, AUGMENT_STREAM, np.arange(3))).all())
    True
    >>> uniform_ints(a, 5).tolist() == uniform_ints(a, 5).tolist()
    True
"""

from __future__ import annotations

import numpy as np

__all__ = ["AUGMENT_STREAM", "ORDER_STREAM", "counter_bits", "uniform_ints"]

ORDER_STREAM = 1
AUGMENT_STREAM = 2

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _as_u64(key) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
        return np.asarray(int(key) & _MASK64, dtype=np.uint64)
    return np.asarray(key).astype(np.int64).astype(np.uint64)


def counter_bits(seed: int, *keys) -> np.ndarray:
    """64 random bits (``uint64``) per broadcast combination of ``keys``, a pure function of
    ``(seed, keys)``. Keys are integers or integer arrays (negative values are taken modulo
    ``2**64``)."""
    with np.errstate(over="ignore"):
        h = _mix(np.atleast_1d(_as_u64(seed)) + _GOLDEN)
        for key in keys:
            h = _mix((h ^ _as_u64(key)) + _GOLDEN)
    return h


def uniform_ints(bits: np.ndarray, n: int) -> np.ndarray:
    """Integers uniform in ``{0, ..., n - 1}`` (``int64``) from the top 32 of ``bits``:
    ``floor(u32 * n / 2**32)`` (exact for ``n < 2**31``)."""
    top = (bits >> np.uint64(32)).astype(np.int64)
    return (top * int(n)) >> 32
