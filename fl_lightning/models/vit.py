"""A small Vision Transformer for 28x28 / 32x32 inputs: SL-ViT (Lee, Lee & Song, 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fl_lightning.models._common import check_input_shape, to_rgb
from fl_lightning.models.base import FederatedNet
from fl_lightning.validate import invalid

__all__ = ["SLViT"]

#: One-pixel shifts (left, right, top, bottom padding) of the shifted patch tokenization.
_SHIFTS = ((1, -1, 0, 0), (-1, 1, 0, 0), (0, 0, 1, -1), (0, 0, -1, 1))


class _ShiftedPatchTokens(nn.Module):
    """Shifted patch tokenization: the image and its copies shifted by one pixel right, left,
    down and up (zero fill) are stacked on the channel axis, cut into ``p x p`` patches,
    flattened, layer-normalized and linearly projected to ``dim``."""

    def __init__(self, channels: int, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        patch_dim = 5 * channels * patch * patch
        self.norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x, *(F.pad(x, s) for s in _SHIFTS)], dim=1)
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return self.proj(self.norm(x.reshape(b, (h // p) * (w // p), p * p * c)))


class _LocalitySelfAttention(nn.Module):
    """Multi-head self-attention with a learnable temperature and the diagonal masked out:
    ``softmax(mask_diag(q k^T * exp(t)))  v`` with ``t`` initialised to ``log(d_head^-1/2)``."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.log_temperature = nn.Parameter(torch.tensor(math.log(dim_head**-0.5)))
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * self.log_temperature.exp()
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        scores = scores.masked_fill(eye, -torch.finfo(scores.dtype).max)
        attn = scores.softmax(dim=-1) @ v
        return self.out(attn.transpose(1, 2).reshape(b, n, -1))


class _Block(nn.Module):
    """Pre-norm transformer block: ``x + LSA(LN(x))`` then ``x + MLP(LN(x))`` (GELU MLP)."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _LocalitySelfAttention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SLViT(FederatedNet):
    """Vision Transformer for small datasets with shifted patch tokenization and locality
    self-attention (SL-ViT), the ViT of the FedSoL paper.

    The image (1-channel inputs repeated to 3 channels) is tokenized into ``(H/p) (W/p)``
    patches by shifted patch tokenization (the image concatenated with its copies shifted by
    one pixel right, left, down and up; ``p = min(H // 4, 16)`` by default, so 8 for 32x32 and 7
    for 28x28), a learnable class token is prepended and learnable position embeddings added
    (both initialised from ``N(0, 1)``), ``depth`` pre-norm blocks of locality self-attention
    (learnable softmax temperature, each token's attention to itself masked) and a GELU MLP
    follow, and ``head`` = ``LayerNorm(dim), Linear(dim, num_classes)`` (the last child module)
    classifies the class token. No dropout. The defaults are the paper's: ``dim=192``,
    ``depth=9``, ``heads=12``, ``dim_head=64``, ``mlp_dim=192``: 6,176,275 parameters for 32x32
    inputs and 10 classes.

    Args:
        num_classes: number of output logits.
        input_shape: ``(C, H, W)``, ``C`` in (1, 3), ``H`` and ``W`` divisible by the patch size.
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads.
        dim_head: width of one head.
        mlp_dim: hidden width of the MLP.
        patch_size: side of a patch (default ``min(H // 4, 16)``).

    Raises:
        ValueError: if the image is not divisible into patches.

    Example:
        >>> net = SLViT(10, (3, 32, 32))
        >>> sum(p.numel() for p in net.parameters())
        6176275
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (3, 32, 32),
        dim: int = 192,
        depth: int = 9,
        heads: int = 12,
        dim_head: int = 64,
        mlp_dim: int = 192,
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        _, height, width = check_input_shape("SLViT", input_shape, min_size=2)
        patch = int(patch_size) if patch_size is not None else min(height // 4, 16)
        if patch < 1 or height % patch or width % patch:
            raise invalid("--model.net.patch_size", patch,
                          f"a divisor of the image size {height}x{width}", "SLViT")
        num_patches = (height // patch) * (width // patch)
        self.tokens = _ShiftedPatchTokens(3, patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(
            *(_Block(dim, heads, dim_head, mlp_dim) for _ in range(depth))
        )
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, int(num_classes)))

    def forward_features(self, x: Tensor) -> Tensor:
        """The class token after the last block (before the head's LayerNorm)."""
        x = self.tokens(to_rgb(x))
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embedding
        return self.blocks(x)[:, 0]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))
