"""Training-time augmentation as batched tensor operations on the device.

The official FedSoL code augments one PIL image at a time in DataLoader workers. Here the whole
mini-batch, already normalized and already on the device, is augmented at once, each sample
with its own random draws, which the caller passes in (the data module makes them per round,
counter-based, from ``(seed, round, client, step, sample)``: see
:mod:`fl_lightning.data.counters`; so both engines and a resumed run augment exactly like the
uninterrupted one, on CPU and GPU alike). Because the batch is normalized before augmentation,
padding uses the *normalized* value of a black pixel, ``(0 - mean) / std`` per channel; random
crop and flip commute with the per-channel normalization, and cutout zeroes pixels after
normalization as the official code does. The result therefore has the same distribution as the
official per-image pipeline.

The paper's recipes (:func:`paper_augmentation`, paper appendix C.2 and the official
``train_tools/preprocessing``):

================  ==========================================================================
dataset           training augmentation
================  ==========================================================================
mnist, cifar10    random crop with 4 pixels of zero padding, horizontal flip, cutout 16
svhn              random crop with 4 pixels of zero padding, horizontal flip
cinic10           random crop with 4 pixels of *reflect* padding, horizontal flip
MedMNIST flags    horizontal flip
digits            none (not a dataset of the paper)
================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fl_lightning.data.counters import uniform_ints

__all__ = ["BatchAugment", "paper_augmentation"]

PADDING_MODES = ("constant", "reflect")


class BatchAugment:
    """Random crop with padding, horizontal flip and cutout, per sample, on a whole batch.

    For a batch ``x`` of shape ``(B, C, H, W)`` and each sample ``b`` independently:

    1. **crop** (``crop_padding = p > 0``): pad by ``p`` on every side (with ``fill`` or by
       reflection), take offsets ``i, j`` in ``{0, ..., 2p}`` and keep
       ``x_pad[b, :, i:i+H, j:j+W]`` (``torchvision.transforms.RandomCrop(H, padding=p)``);
    2. **flip** (``flip=True``): with probability 1/2 reverse the width axis;
    3. **cutout** (``cutout = L > 0``): take a centre ``(cy, cx)`` uniformly over the image and
       set ``x[b, :, y1:y2, x1:x2] = 0`` with ``y1 = clip(cy - L//2, 0, H)``,
       ``y2 = clip(cy + L//2, 0, H)`` (same for ``x``), as DeVries & Taylor's cutout in the
       official code.

    The random numbers are not drawn here: :meth:`__call__` takes them as ``draws``, an
    integer tensor ``(B, 5)`` whose row ``b`` is ``(i, j, flip, cy, cx)`` for sample ``b``
    (:data:`DRAWS`), so equal draws give equal outputs on any device. :meth:`draw` turns 64
    random bits per entry (e.g. :func:`fl_lightning.data.counters.counter_bits`) into such
    draws; the data module makes them per round from ``(seed, round, client, step, sample)``.
    Crop and flip are one gather; no tensor is created on the host.

    Args:
        crop_padding: ``p``; 0 disables the crop.
        padding_mode: ``"constant"`` (pad with ``fill``) or ``"reflect"``.
        fill: per-channel value of the padding (one value for every channel, or one per channel).
        flip: random horizontal flip.
        cutout: side ``L`` of the cutout square; 0 disables it.

    Raises:
        ValueError: for a negative size or an unknown padding mode.

    Example:
        >>> aug = BatchAugment(crop_padding=4, flip=True, cutout=16)
        >>> x = torch.randn(8, 3, 32, 32)
        >>> aug(x, aug.random_draws(x, torch.Generator().manual_seed(0))).shape
        torch.Size([8, 3, 32, 32])
    """

    #: The five per-sample draws, in the column order of ``draws``.
    DRAWS = ("crop_row", "crop_col", "flip", "cutout_y", "cutout_x")

    def __init__(
        self,
        crop_padding: int = 0,
        padding_mode: str = "constant",
        fill: float | Sequence[float] = 0.0,
        flip: bool = False,
        cutout: int = 0,
    ) -> None:
        if int(crop_padding) < 0 or int(cutout) < 0:
            raise ValueError(f"crop_padding={crop_padding} and cutout={cutout} must be >= 0")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode={padding_mode!r}: use one of {PADDING_MODES}")
        self.crop_padding = int(crop_padding)
        self.padding_mode = padding_mode
        self.fill = tuple(float(v) for v in (fill if isinstance(fill, Sequence) else (fill,)))
        self.flip = bool(flip)
        self.cutout = int(cutout)
        self._consts: dict[tuple, tuple[Tensor, Tensor, Tensor | None]] = {}

    @property
    def is_identity(self) -> bool:
        return self.crop_padding == 0 and not self.flip and self.cutout == 0

    def __repr__(self) -> str:
        return (
            f"BatchAugment(crop_padding={self.crop_padding}, padding_mode={self.padding_mode!r}, "
            f"fill={self.fill}, flip={self.flip}, cutout={self.cutout})"
        )

    def draw(self, bits: np.ndarray, height: int, width: int) -> np.ndarray:
        """Draws ``(..., 5)`` (``int64``) from random bits ``(..., 5)`` (``uint64``): offsets
        uniform in ``{0, ..., 2p}``, flip in ``{0, 1}``, cutout centres uniform in
        ``{0, ..., H-1}`` and ``{0, ..., W-1}``."""
        span = 2 * self.crop_padding + 1
        return np.stack(
            [
                uniform_ints(bits[..., 0], span),
                uniform_ints(bits[..., 1], span),
                uniform_ints(bits[..., 2], 2),
                uniform_ints(bits[..., 3], height),
                uniform_ints(bits[..., 4], width),
            ],
            axis=-1,
        )

    def random_draws(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Draws for ``x`` from a ``torch.Generator`` (for interactive use; the data module
        uses counter-based draws instead)."""
        bits = torch.randint(0, 2**62, (len(x), 5), generator=generator).numpy()
        draws = self.draw(bits.astype(np.uint64) << np.uint64(2), x.shape[-2], x.shape[-1])
        return torch.from_numpy(draws).to(x.device)

    def _constants(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``arange(H)``, ``arange(W)`` and the fill ``(C, 1, 1)``, cached per device/dtype."""
        _, channels, height, width = x.shape
        key = (x.device, x.dtype, channels, height, width)
        if key not in self._consts:
            fill = None
            if self.crop_padding and self.padding_mode == "constant":
                if len(self.fill) not in (1, channels):
                    raise ValueError(f"fill has {len(self.fill)} values for {channels} channels")
                fill = torch.tensor(self.fill, dtype=x.dtype).expand(channels).reshape(
                    channels, 1, 1).to(x.device)
            self._consts[key] = (
                torch.arange(height, device=x.device), torch.arange(width, device=x.device), fill
            )
        return self._consts[key]

    def __call__(self, x: Tensor, draws: Tensor) -> Tensor:
        """Augment ``x`` ``(B, C, H, W)`` with ``draws`` ``(B, 5)`` on ``x``'s device; returns a
        new tensor (``x`` is not modified)."""
        if x.ndim != 4:
            raise ValueError(f"BatchAugment expects (B, C, H, W) batches, got {tuple(x.shape)}")
        if self.is_identity or len(x) == 0:
            return x
        batch, channels, height, width = x.shape
        ys, xs, fill = self._constants(x)
        p = self.crop_padding
        rows = ys.expand(batch, height)
        cols = xs.expand(batch, width)
        if p:
            rows = rows + (draws[:, 0:1] - p)
            cols = cols + (draws[:, 1:2] - p)
        if self.flip:
            cols = torch.where(draws[:, 2:3] == 1, cols.flip(1), cols)
        valid = None
        if p and self.padding_mode == "reflect":
            rows = torch.where(rows < 0, -rows, rows)
            rows = torch.where(rows >= height, 2 * (height - 1) - rows, rows)
            cols = torch.where(cols < 0, -cols, cols)
            cols = torch.where(cols >= width, 2 * (width - 1) - cols, cols)
        elif p:
            valid = ((rows >= 0) & (rows < height))[:, None, :, None] & (
                (cols >= 0) & (cols < width)
            )[:, None, None, :]
            rows = rows.clamp(0, height - 1)
            cols = cols.clamp(0, width - 1)
        flat = (rows[:, :, None] * width + cols[:, None, :]).view(batch, 1, height * width)
        out = x.reshape(batch, channels, height * width).gather(
            2, flat.expand(batch, channels, height * width)
        ).view(batch, channels, height, width)
        if valid is not None:
            out = torch.where(valid, out, fill)
        if self.cutout:
            half = self.cutout // 2
            cy, cx = draws[:, 3:4], draws[:, 4:5]
            in_y = (ys >= (cy - half).clamp(0, height)) & (ys < (cy + half).clamp(0, height))
            in_x = (xs >= (cx - half).clamp(0, width)) & (xs < (cx + half).clamp(0, width))
            out = out.masked_fill(in_y[:, None, :, None] & in_x[:, None, None, :], 0.0)
        return out


def paper_augmentation(dataset: str) -> BatchAugment | None:
    """The official FedSoL code's training augmentation for ``dataset`` (``None``: none).

    Example:
        >>> paper_augmentation("svhn").cutout, paper_augmentation("digits") is None
        (0, True)
    """
    from fl_lightning.data.datasets import NATURAL, dataset_info, normalization

    name = dataset_info(dataset).name
    if name == "digits" or name in NATURAL:  # LEAF and the synthetic sets: none
        return None
    mean, std = normalization(name)
    black = tuple(-m / s for m, s in zip(mean, std, strict=True))
    if name in ("mnist", "cifar10"):
        return BatchAugment(crop_padding=4, fill=black, flip=True, cutout=16)
    if name == "svhn":
        return BatchAugment(crop_padding=4, fill=black, flip=True)
    if name == "cinic10":
        return BatchAugment(crop_padding=4, padding_mode="reflect", flip=True)
    return BatchAugment(flip=True)  # MedMNIST
