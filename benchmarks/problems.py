"""Benchmark problems: one mini-batch of data for an MLP, a CNN, and a transformer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, manual_seed, nn, rand, randint
from torch.nn.functional import scaled_dot_product_attention


@dataclass
class Problem:
    """A model with loss function, parameters and one mini-batch of data."""

    name: str
    model: nn.Module
    loss_func: nn.Module
    X: Tensor
    y: Tensor

    @property
    def params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def data(self) -> list[tuple[Tensor, Tensor]]:
        return [(self.X, self.y)]


class Transformer(nn.Module):
    """Pre-norm-free transformer block: embedding, multi-head attention, MLP, head."""

    def __init__(self, vocab_dim=64, dim=64, heads=4, num_classes=10):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(vocab_dim, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        )
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        batch, seq, dim = h.shape
        qkv = self.qkv(h).reshape(batch, seq, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(attended.transpose(1, 2).reshape(batch, seq, dim))
        h = h + self.mlp(h)
        return self.head(h).mean(1)


def mlp() -> Problem:
    """MNIST-sized MLP 784-128-64-10 with batch size 256."""
    manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    X, y = rand(256, 784), randint(0, 10, (256,))
    return Problem("mlp", model, nn.CrossEntropyLoss(), X, y)


def cnn() -> Problem:
    """Three Conv2d layers on 32x32 RGB images with batch size 64."""
    manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )
    X, y = rand(64, 3, 32, 32), randint(0, 10, (64,))
    return Problem("cnn", model, nn.CrossEntropyLoss(), X, y)


def transformer() -> Problem:
    """A small transformer block on sequences of length 32, batch size 32."""
    manual_seed(0)
    X, y = rand(32, 32, 64), randint(0, 10, (32,))
    return Problem("transformer", Transformer(), nn.CrossEntropyLoss(), X, y)


PROBLEMS = {"mlp": mlp, "cnn": cnn, "transformer": transformer}
