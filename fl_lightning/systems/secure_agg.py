"""Secure aggregation, simulated: pairwise additive masks so that the server sees only the sum."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fl_lightning.systems._common import STREAM_SECURE_AGG, generator
from fl_lightning.validate import integer

__all__ = [
    "SecureAggregation",
    "decode_fixed_point",
    "encode_fixed_point",
    "mask_update",
    "pair_mask",
    "unmask_sum",
]


def encode_fixed_point(x: Tensor, frac_bits: int, modulus_bits: int) -> Tensor:
    """``round(x 2^f) mod 2^k`` as int64 (two's complement wraps negatives into the ring)."""
    return torch.round(x.double() * 2.0**frac_bits).long() & ((1 << modulus_bits) - 1)


def decode_fixed_point(v: Tensor, frac_bits: int, modulus_bits: int) -> Tensor:
    """The signed value of ``v`` in ``[-2^(k-1), 2^(k-1))``, divided by ``2^f`` (float64)."""
    v = v & ((1 << modulus_bits) - 1)
    signed = torch.where(v >= (1 << (modulus_bits - 1)), v - (1 << modulus_bits), v)
    return signed.double() / 2.0**frac_bits


def pair_mask(
    seed: int, round_idx: int, i: int, j: int, size: int, modulus_bits: int,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The mask shared by clients ``i < j``: ``size`` uniform draws from ``Z_{2^k}``, generated
    from the pair's seed ``(seed, round, i, j)`` (the seed the two would agree on by a key
    exchange)."""
    i, j = min(i, j), max(i, j)
    gen = generator(seed, round_idx, i, j, STREAM_SECURE_AGG)
    return torch.randint(0, 1 << modulus_bits, (size,), generator=gen, dtype=torch.long).to(device)


def mask_update(
    encoded: Tensor, client: int, participants: Sequence[int], seed: int, round_idx: int,
    modulus_bits: int,
) -> Tensor:
    """``y_i = x_i + sum_{j > i} m_ij - sum_{j < i} m_ij  (mod 2^k)`` over the other
    participants ``j``: the pairwise masks cancel in the sum over all participants."""
    mask = (1 << modulus_bits) - 1
    y = encoded.clone()
    for j in participants:
        if j == client:
            continue
        m = pair_mask(seed, round_idx, client, j, encoded.numel(), modulus_bits, encoded.device)
        y = (y + m) & mask if j > client else (y - m) & mask
    return y


def unmask_sum(
    masked: Mapping[int, Tensor], participants: Sequence[int], seed: int, round_idx: int,
    modulus_bits: int,
) -> Tensor:
    """The sum of the survivors' encoded updates, from their masked updates only.

    ``masked`` holds the survivors' ``y_i``; the other ``participants`` dropped after the masks
    were agreed. Their pairs' masks do not cancel, so the server recovers the pair seeds of
    each dropped client ``d`` (in the protocol, from the survivors' secret shares of ``d``'s
    key) and removes ``m_id`` from the survivors' sum: ``+m`` if ``d < i`` (``i`` subtracted
    it), ``-m`` if ``d > i``.
    """
    mask = (1 << modulus_bits) - 1
    survivors = sorted(masked)
    total = torch.zeros_like(next(iter(masked.values())))
    for i in survivors:
        total = (total + masked[i]) & mask
    dropped = [d for d in participants if d not in masked]
    for d in dropped:
        for i in survivors:
            m = pair_mask(seed, round_idx, i, d, total.numel(), modulus_bits, total.device)
            total = (total + m) & mask if d < i else (total - m) & mask
    return total


class SecureAggregation:
    """Pairwise-masked secure aggregation (Bonawitz et al., 2017), simulated in one process.

    Each client encodes its weighted update as fixed-point integers ``round(x 2^f) mod 2^k``
    and adds pairwise masks derived from per-pair seeds of ``(seed, round, i, j)``
    (:func:`mask_update`); a single masked update is uniform noise to the server. Masks are
    agreed among all sampled clients before training; the server sums what the survivors send,
    recovers the pair seeds of the clients that dropped out and removes their masks
    (:func:`unmask_sum`). The decoded result equals the fixed-point sum of the survivors'
    updates exactly, and their float sum within ``n 2^-(f+1)`` per coordinate. The server never
    sees an individual update, so robust aggregators (which need them) are rejected.
    Not simulated: key agreement, secret sharing, and the self-masks that protect a client that
    is merely late.

    Args:
        frac_bits: ``f``, fractional bits of the fixed-point encoding.
        modulus_bits: ``k``, the ring ``Z_{2^k}`` (at most 62 so that int64 sums never overflow).

    Raises:
        ConfigError: unless ``1 <= f`` and ``f + 8 <= k <= 62``.

    Example:
        >>> sa = SecureAggregation(frac_bits=16, modulus_bits=48)
        >>> xs = {0: torch.tensor([0.5, -1.0]), 1: torch.tensor([0.25, 2.0]), 2: torch.ones(2)}
        >>> sa.secure_sum(xs, participants=[0, 1, 2, 3], seed=0, round_idx=0).tolist()
        [1.75, 2.0]
    """

    def __init__(self, frac_bits: int = 24, modulus_bits: int = 62) -> None:
        integer(frac_bits, "--model.secure_aggregation.frac_bits", 1, 54, hint="e.g. 24")
        integer(modulus_bits, "--model.secure_aggregation.modulus_bits", frac_bits + 8, 62,
                hint=f"frac_bits + 8 <= modulus_bits with frac_bits={frac_bits}; e.g. 62")
        self.frac_bits = frac_bits
        self.modulus_bits = modulus_bits

    @property
    def bytes_per_value(self) -> int:
        """Width of one ring element on the wire: ``ceil(k / 8)`` bytes."""
        return (self.modulus_bits + 7) // 8

    def masked_updates(
        self, updates: Mapping[int, Tensor], participants: Sequence[int], seed: int,
        round_idx: int,
    ) -> dict[int, Tensor]:
        """What each surviving client sends: its masked, encoded update."""
        limit = 2.0 ** (self.modulus_bits - 1 - self.frac_bits) / max(len(participants), 1)
        for cid, x in updates.items():
            peak = float(x.abs().max()) if x.numel() else 0.0
            if not peak < limit:
                raise ValueError(
                    f"secure aggregation: client {cid}'s update reaches {peak:.3g}, beyond the "
                    f"fixed-point range {limit:.3g}: lower --model.secure_aggregation.frac_bits"
                )
        return {
            cid: mask_update(
                encode_fixed_point(x, self.frac_bits, self.modulus_bits), cid, participants,
                seed, round_idx, self.modulus_bits,
            )
            for cid, x in updates.items()
        }

    def secure_sum(
        self, updates: Mapping[int, Tensor], participants: Sequence[int], seed: int,
        round_idx: int,
    ) -> Tensor:
        """The float64 sum of the survivors' ``updates`` as the server decodes it."""
        masked = self.masked_updates(updates, participants, seed, round_idx)
        total = unmask_sum(masked, participants, seed, round_idx, self.modulus_bits)
        return decode_fixed_point(total, self.frac_bits, self.modulus_bits)
