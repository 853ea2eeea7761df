"""Update compression: stochastic uniform quantization and top-k sparsification with error
feedback. Each counts the bytes a client uploads."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fl_lightning.algorithms.state import ClientStateStore, check_state_device
from fl_lightning.validate import integer, share

__all__ = ["Compressor", "StochasticQuantizer", "TopK", "stochastic_quantize", "top_k"]

#: Bytes of a float32 value and of an int32 index on the wire.
VALUE_BYTES = 4
INDEX_BYTES = 4


def stochastic_quantize(x: Tensor, bits: int, gen: torch.Generator) -> Tensor:
    """Unbiased stochastic uniform quantization of ``x`` to ``2^b`` levels on ``[min, max]``.

    With ``s = 2^b - 1``, ``h = (max - min) / s`` and ``u = (x - min) / h``, each entry becomes
    ``min + h (floor(u) + B)`` with ``B ~ Bernoulli(u - floor(u))``, so ``E[Q(x)] = x``.
    """
    lo, hi = x.min(), x.max()
    if not bool(hi > lo):
        return x.clone()
    levels = (1 << bits) - 1
    step = (hi - lo) / levels
    u = (x - lo) / step
    noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    q = torch.floor(u + noise).clamp_(0, levels)
    return lo + q * step


def top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` entries of largest magnitude: ``(indices, values)`` (ties broken by torch)."""
    idx = torch.topk(x.abs(), k, sorted=False).indices
    return idx, x[idx]


class Compressor:
    """Client-side compression of the update ``Delta_k = w_k - w_g`` (flat, all parameters).

    :meth:`compress` returns what the server reconstructs and the bytes the client sent; the
    server then treats the reconstruction as the client's update.

    Example:
        >>> Compressor().compress(torch.ones(3), [3], 0, None)[1]
        12
    """

    name = "none"

    def compress(
        self, delta: Tensor, sizes: Sequence[int], client_id: int, gen: torch.Generator | None
    ) -> tuple[Tensor, int]:
        """``(reconstructed update, bytes sent)``; uncompressed: every value at its width."""
        del sizes, client_id, gen
        return delta, delta.numel() * delta.element_size()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state


class StochasticQuantizer(Compressor):
    """Stochastic uniform quantization to ``b`` bits per value, per parameter tensor
    (:func:`stochastic_quantize`; unbiased). Random draws are seeded by
    ``(seed, round, client)``.

    Bytes sent per tensor: ``ceil(numel b / 8)`` for the packed levels plus 8 for its float32
    ``min`` and ``max``.

    Args:
        bits: ``b``, an integer in ``[1, 16]``.

    Raises:
        ConfigError: for ``b`` outside ``[1, 16]``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> q, sent = StochasticQuantizer(bits=1).compress(torch.tensor([0.0, 1.0]), [2], 0, g)
        >>> q.tolist(), sent
        ([0.0, 1.0], 9)
    """

    name = "quantize"

    def __init__(self, bits: int = 8) -> None:
        self.bits = integer(bits, "--model.compressor.bits", 1, 16, hint="e.g. 8")

    def compress(self, delta, sizes, client_id, gen):
        out, sent = [], 0
        for chunk in delta.split(list(sizes)):
            out.append(stochastic_quantize(chunk, self.bits, gen))
            sent += math.ceil(chunk.numel() * self.bits / 8) + 2 * VALUE_BYTES
        return torch.cat(out), sent


class TopK(Compressor):
    """Top-k sparsification with error feedback (Stich et al., 2018; Karimireddy et al., 2019).

    Client ``k`` keeps a residual ``e_k`` (0 at first). Each round it forms
    ``v = Delta_k + e_k``, sends the ``K = max(1, ceil(ratio d))`` entries of ``v`` of largest
    magnitude (over all ``d`` parameters), and keeps ``e_k <- v - sent``. Hence
    ``sent + e_k(new) = Delta_k + e_k(old)`` in every round, and over rounds the sum of what was
    sent plus the final residual equals the sum of the updates. The residuals survive restarts
    (they are saved in checkpoints).

    Bytes sent: ``K`` float32 values and ``K`` int32 indices, ``8 K``.

    Args:
        ratio: share of the entries sent, in ``(0, 1]``.
        error_feedback: keep the residual (without it, what is not sent is lost).
        state_device: where the residuals are kept between rounds (e.g. ``cpu``).

    Raises:
        ConfigError: for ``ratio`` outside ``(0, 1]``.

    Example:
        >>> sent, nbytes = TopK(ratio=0.5).compress(torch.tensor([3.0, -1.0, 0.5, -4.0]), [4], 0,
        ...                                         None)
        >>> sent.tolist(), nbytes
        ([3.0, 0.0, 0.0, -4.0], 16)
    """

    name = "top_k"

    def __init__(
        self, ratio: float = 0.1, error_feedback: bool = True, state_device: str | None = None
    ) -> None:
        self.ratio = share(ratio, "--model.compressor.ratio", "the share of entries sent; e.g. 0.1",
                           low_open=True, high_open=False)
        self.error_feedback = bool(error_feedback)
        self.residuals = ClientStateStore(check_state_device(state_device))

    def compress(self, delta, sizes, client_id, gen):
        k = max(1, math.ceil(self.ratio * delta.numel()))
        v = delta
        if self.error_feedback:
            e = self.residuals.get(client_id, lambda: {}, delta.device).get("e", {}).get("flat")
            if e is not None:
                v = delta + e.to(delta.dtype)
        idx, values = top_k(v, k)
        sent = torch.zeros_like(v)
        sent[idx] = values
        if self.error_feedback:
            self.residuals.put(client_id, {"e": {"flat": v - sent}})
        return sent, k * (VALUE_BYTES + INDEX_BYTES)

    def residual(self, client_id: int) -> Tensor | None:
        """Client ``client_id``'s current residual ``e_k`` (``None`` before its first round)."""
        return self.residuals.get(client_id, lambda: {}).get("e", {}).get("flat")

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": self.residuals.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.residuals.load_state_dict(state.get("residuals", {}))
