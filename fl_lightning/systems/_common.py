"""Helpers shared by the systems mechanisms: seed streams and generators."""

from __future__ import annotations

import numpy as np
import torch

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
