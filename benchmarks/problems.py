"""Benchmark problems: one mini-batch of data for an MLP, a CNN, and a transformer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, manual_seed, nn, rand, randint
from torch.nn.functional import scaled_dot_product_attention

KFAC_LAYERS = (nn.Linear, nn.Conv2d)


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

    @property
    def device(self) -> torch.device:
        return self.X.device

    @property
    def kfac_params(self) -> list[Tensor]:
        """Parameters of the layers KFAC supports (Linear, Conv2d)."""
        layers = [m for m in self.model.modules() if isinstance(m, KFAC_LAYERS)]
        return [p for m in layers for p in m.parameters() if p.requires_grad]


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


def mlp(batch_size: int = 256, width: int = 128) -> Problem:
    """MNIST-sized MLP 784-128-64-10 with batch size 256 (or other sizes)."""
    manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, width),
        nn.ReLU(),
        nn.Linear(width, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    X, y = rand(batch_size, 784), randint(0, 10, (batch_size,))
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


def transformer_long() -> Problem:
    """The transformer block on sequences of length 256, batch size 8.

    Attention dominates: its causal attention matrices hold 8 times as many entries
    per token as the short problem's.
    """
    manual_seed(0)
    X, y = rand(8, 256, 64), randint(0, 10, (8,))
    return Problem("transformer256", Transformer(), nn.CrossEntropyLoss(), X, y)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch normalization and a skip connection."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(h)) + self.shortcut(x)).relu()


def resnet18(num_classes: int = 10) -> nn.Module:
    """A ResNet-18 for 32x32 images (11M parameters), BatchNorm in eval mode."""
    layers, c_in = [], 64
    for c_out, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, 1, 1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, num_classes),
    )
    return model.eval()


def _resnet18_problem(batch_size: int, device: torch.device) -> Problem:
    manual_seed(0)
    X = rand(batch_size, 3, 32, 32, device=device)
    y = randint(0, 10, (batch_size,), device=device)
    return Problem("resnet18", resnet18().to(device), nn.CrossEntropyLoss(), X, y)


def resnet18_cpu() -> Problem:
    """ResNet-18 on 32x32 images with batch size 32, on the CPU."""
    return _resnet18_problem(32, torch.device("cpu"))


def resnet18_cuda() -> Problem:
    """ResNet-18 on 32x32 images with batch size 128, on the GPU."""
    return _resnet18_problem(128, torch.device("cuda"))


PROBLEMS = {
    "mlp": mlp,
    "cnn": cnn,
    "transformer": transformer,
    "transformer256": transformer_long,
    "resnet18": resnet18_cpu,
    "resnet18_cuda": resnet18_cuda,
}
