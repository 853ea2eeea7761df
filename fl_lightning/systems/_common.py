"""Helpers shared by the systems mechanisms: seeds, flattening, validation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fl_lightning.errors import ConfigError

#: Stream keys: every mechanism draws from its own seed stream, so adding one never changes the
#: random numbers of another (or the data order, which uses ``(seed, round, client)``).
STREAM_PARTICIPATION = 101
STREAM_MALICIOUS = 102
STREAM_ATTACK = 103
STREAM_COMPRESSION = 104
STREAM_DP_NOISE = 105
STREAM_SECURE_AGG = 106


def sub_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the integer keys."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded by :func:`sub_seed` of ``keys``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(sub_seed(*keys))
    return gen


def ratio(value: float, option: str, what: str, high_inclusive: bool = False) -> float:
    """``value`` as a float in ``[0, 1)`` (or ``[0, 1]``), else a one-line ``ConfigError``."""
    v = float(value)
    ok = math.isfinite(v) and 0.0 <= v and (v <= 1.0 if high_inclusive else v < 1.0)
    if not ok:
        interval = "[0, 1]" if high_inclusive else "[0, 1)"
        raise ConfigError(f"{option}={value!r} is invalid: {what} must be in {interval} (e.g. 0.2)")
    return v


def positive_share(value: float, option: str, what: str, example: float) -> float:
    """``value`` as a float in ``(0, 1]``, else a one-line ``ConfigError``."""
    v = float(value)
    if not (math.isfinite(v) and 0.0 < v <= 1.0):
        raise ConfigError(
            f"{option}={value!r} is invalid: {what} must be in (0, 1] (e.g. {example})"
        )
    return v


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """All entries of ``tensors`` as one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split ``flat`` back into tensors shaped like ``like``."""
    out, start = [], 0
    for t in like:
        out.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out
