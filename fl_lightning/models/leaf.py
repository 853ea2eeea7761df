"""The LEAF benchmark's models: FEMNIST's CNN, Shakespeare's character LSTM, a Sent140 model.

Architectures of LEAF's ``models/femnist/cnn.py`` and ``models/shakespeare/stacked_lstm.py``
(Caldas et al., 2018). The LSTM is written out step by step (:class:`UnrolledLSTM`, the
equations and parameter layout of ``torch.nn.LSTM``) so that ``torch.func.vmap`` batches it:
``nn.LSTM``'s fused kernel has no batching rule (``aten::mkldnn_rnn_layer`` on CPU), so under the
batched engine it would fall back to a loop over clients with a warning.

Token inputs arrive as int64 ids of shape ``(B, 1, 1, L)`` (the data module's input shape).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fl_lightning.models.base import FederatedNet

__all__ = ["CharLSTM", "FEMNISTCNN", "Sent140BoW", "UnrolledLSTM"]


class FEMNISTCNN(FederatedNet):
    """LEAF's FEMNIST CNN: ``conv5x5(32, same) ReLU pool2 conv5x5(64, same) ReLU pool2 FC2048
    ReLU FC(num_classes)``; 6,603,710 parameters for 28 x 28 inputs and 62 classes.

    Example:
        >>> net = FEMNISTCNN(62, (1, 28, 28))
        >>> sum(p.numel() for p in net.parameters())
        6603710
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 62])
    """

    def __init__(self, num_classes: int = 62, input_shape: Sequence[int] = (1, 28, 28)) -> None:
        super().__init__()
        channels, height, width = (int(v) for v in input_shape)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (height // 4) * (width // 4), 2048), nn.ReLU(),
        )
        self.classifier = nn.Linear(2048, int(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class UnrolledLSTM(nn.Module):
    """A multi-layer ``batch_first`` LSTM computed step by step, with ``nn.LSTM``'s parameters
    (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``, gates in the
    order input, forget, cell, output) and initialization (uniform in ``+-1/sqrt(hidden)``).
    Returns the last layer's hidden state at the last step, ``(B, hidden)``.

    Example:
        >>> ref = nn.LSTM(8, 16, 2, batch_first=True)
        >>> mine = UnrolledLSTM(8, 16, 2)
        >>> _ = mine.load_state_dict(ref.state_dict())
        >>> x = torch.randn(3, 5, 8)
        >>> torch.allclose(mine(x), ref(x)[0][:, -1], atol=1e-6)
        True
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        for k in range(self.num_layers):
            fan_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}",
                                    nn.Parameter(torch.empty(4 * hidden_size, fan_in)))
            self.register_parameter(f"weight_hh_l{k}",
                                    nn.Parameter(torch.empty(4 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
        bound = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        steps = x.shape[1]
        for k in range(self.num_layers):
            w_hh = getattr(self, f"weight_hh_l{k}")
            gates_x = x @ getattr(self, f"weight_ih_l{k}").T + getattr(self, f"bias_ih_l{k}") \
                + getattr(self, f"bias_hh_l{k}")
            h = x.new_zeros(x.shape[0], self.hidden_size)
            c = torch.zeros_like(h)
            outputs = []
            for t in range(steps):
                i, f, g, o = (gates_x[:, t] + h @ w_hh.T).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                if k + 1 < self.num_layers:
                    outputs.append(h)
            if k + 1 < self.num_layers:
                x = torch.stack(outputs, dim=1)
        return h


def _tokens(x: Tensor) -> Tensor:
    """``(B, 1, 1, L)`` (or ``(B, L)``) token ids as ``(B, L)`` int64."""
    return x.reshape(x.shape[0], -1).long()


class CharLSTM(FederatedNet):
    """LEAF's Shakespeare model: embedding 8, 2-layer LSTM 256, ``FC(num_classes)`` on the last
    step's output (the next character); 819,920 parameters for 80 characters.

    Args:
        num_classes: the vocabulary (80: LEAF's characters; also the embedding's size).
        input_shape: ``(1, 1, L)`` (sequence length ``L``, 80 in LEAF).
        embed_dim, hidden_size, num_layers: LEAF's 8, 256, 2.

    Example:
        >>> net = CharLSTM(80, (1, 1, 80))
        >>> sum(p.numel() for p in net.parameters())
        819920
        >>> net(torch.zeros(2, 1, 1, 80, dtype=torch.long)).shape
        torch.Size([2, 80])
    """

    def __init__(self, num_classes: int = 80, input_shape: Sequence[int] = (1, 1, 80),
                 embed_dim: int = 8, hidden_size: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(int(num_classes), int(embed_dim))
        self.lstm = UnrolledLSTM(int(embed_dim), int(hidden_size), int(num_layers))
        self.classifier = nn.Linear(int(hidden_size), int(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.lstm(self.embedding(_tokens(x))))


class Sent140BoW(FederatedNet):
    """A small Sent140 model: a trainable word embedding (LEAF's 300-d GloVe vectors cannot be
    downloaded here), the mean over the tweet's tokens (padding, id 0, left out), ``FC(hidden)
    ReLU FC(num_classes)``.

    Args:
        num_classes: 2 (negative, positive).
        input_shape: ``(1, 1, L)`` token ids (``L = 25``).
        vocab_size: ids ``0..vocab_size - 1`` (the data's
            :data:`~fl_lightning.data.leaf.SENT140_VOCAB`: padding 0, unknown 1, words 2..).
        embed_dim, hidden: 50 and 64.

    Example:
        >>> net = Sent140BoW(2, (1, 1, 25))
        >>> net(torch.zeros(3, 1, 1, 25, dtype=torch.long)).shape
        torch.Size([3, 2])
    """

    def __init__(self, num_classes: int = 2, input_shape: Sequence[int] = (1, 1, 25),
                 vocab_size: int = 10_000, embed_dim: int = 50, hidden: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(int(vocab_size), int(embed_dim))
        self.hidden = nn.Sequential(nn.Linear(int(embed_dim), int(hidden)), nn.ReLU())
        self.classifier = nn.Linear(int(hidden), int(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        ids = _tokens(x)
        mask = (ids != 0).unsqueeze(-1).to(self.embedding.weight.dtype)
        pooled = (self.embedding(ids) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.classifier(self.hidden(pooled))
