"""Small tensor helpers with one home: data-size weights and the weighted mean, flattening a
list or dict of tensors into one vector and back, the precision table and an exception on one
line.

Example:
    >>> weighted_mean([torch.tensor([1.0]), torch.tensor([3.0])], [0.25, 0.75]).tolist()
    [2.5]
    >>> data_weights([1, 3]).tolist()
    [0.25, 0.75]
    >>> unflatten(flatten([torch.ones(2), torch.zeros(1, 1)]), [torch.ones(2),
    ...           torch.zeros(1, 1)])[1].shape
    torch.Size([1, 1])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from fl_lightning.errors import exception_line  # re-exported: its home needs no PyTorch

__all__ = [
    "PRECISION_DTYPES",
    "data_weights",
    "exception_line",
    "flatten",
    "flatten_dict",
    "unflatten",
    "unflatten_dict",
    "weighted_mean",
]

#: Lightning ``--trainer.precision`` values the federated module runs -> the weights' dtype
#: (``bf16-mixed`` keeps float32 weights and autocasts the local step).
PRECISION_DTYPES: dict[str, torch.dtype] = {
    "32-true": torch.float32,
    "32": torch.float32,
    "64-true": torch.float64,
    "64": torch.float64,
    "bf16-mixed": torch.float32,
}


def data_weights(sizes: Iterable[float], dtype: torch.dtype | None = None) -> Tensor:
    """``n_k / sum_j n_j`` for the data sizes ``n_k``, as a tensor of ``dtype`` (default: the
    default dtype), computed in that dtype."""
    sizes = torch.tensor([float(n) for n in sizes], dtype=dtype)
    return sizes / sizes.sum()


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_k weights[k] * tensors[k]``, accumulated left to right (``t_0 w_0``, then ``+ t_k
    w_k``), so every caller gets the same rounding; ``weights`` are already normalized
    (:func:`data_weights`)."""
    acc = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        acc = acc + t * w
    return acc


def flatten(tensors: Iterable[Tensor]) -> Tensor:
    """All entries of ``tensors`` as one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split ``flat`` back into views shaped like ``like``."""
    out, start = [], 0
    for t in like:
        out.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def flatten_dict(params: Mapping[str, Tensor]) -> Tensor:
    """The values of a parameter dict, in its order, as one flat vector."""
    return flatten(params.values())


def unflatten_dict(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``flat`` split into a dict shaped like ``like`` (same keys, in order)."""
    return dict(zip(like, unflatten(flat, list(like.values())), strict=True))
