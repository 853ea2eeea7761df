"""Checks and input handling shared by the models."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fl_lightning.validate import invalid

__all__ = ["check_input_shape", "to_rgb"]


def check_input_shape(model: str, input_shape: Sequence[int], min_size: int = 1):
    """``(C, H, W)`` as ints; ``C`` must be 1 or 3 and ``H, W >= min_size``.

    Raises:
        ConfigError: one line naming the option, the shape, what the model accepts.
    """
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape[1:]) < min_size:
        raise invalid("--model.net.input_shape", tuple(input_shape),
                      f"(C, H, W) with C in (1, 3) and H, W >= {min_size}",
                      f"{model}; it follows the data set")
    return shape


def to_rgb(x: Tensor) -> Tensor:
    """Repeat a 1-channel batch to 3 channels (what PIL's ``convert("RGB")`` does to grayscale)."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
