"""Seeded test problems: architectures x losses x reductions, all in float64.

A :class:`Case` builds a model, a loss function, its parameters and mini-batches of
data (of uneven sizes, so the batch weighting is exercised). Architectures cover an
MLP, a CNN with stride/padding/groups, sequence outputs (weight sharing), dict
inputs, BatchNorm in eval mode, and multi-head attention through
``scaled_dot_product_attention`` (whose fused CPU kernel lacks forward-mode and
second derivatives).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

from torch import Tensor, float64, manual_seed, rand, randint, randn
from torch.nn import (
    BatchNorm1d,
    BCEWithLogitsLoss,
    Conv2d,
    CrossEntropyLoss,
    Flatten,
    Linear,
    Module,
    MSELoss,
    Sequential,
    Sigmoid,
    Tanh,
)
from torch.nn.functional import scaled_dot_product_attention

BATCH_SIZES = (3, 2)
NUM_CLASSES = 3


class Permute(Module):
    """Move the feature axis to position 1, as ``CrossEntropyLoss`` expects."""

    def forward(self, x: Tensor) -> Tensor:
        return x.movedim(-1, 1)


class DictInputModel(Module):
    """An MLP that reads its input from a dict and scales it."""

    def __init__(self):
        super().__init__()
        self.net = Sequential(Linear(5, 4), Tanh(), Linear(4, NUM_CLASSES))

    def forward(self, X: MutableMapping) -> Tensor:
        return self.net(X["x"] * X["scale"])


class TinyTransformer(Module):
    """One multi-head self-attention block on sequences, mean-pooled to classes."""

    def __init__(self, dim: int = 4, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = Linear(3, dim)
        self.qkv = Linear(dim, 3 * dim)
        self.out = Linear(dim, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        batch, seq, dim = h.shape
        qkv = self.qkv(h).reshape(batch, seq, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [batch, heads, seq, head_dim]
        attended = scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.out(h + attended.reshape(batch, seq, dim)).mean(1)


def _mlp(sequence_ce: bool) -> tuple[Module, tuple[int, ...]]:
    return Sequential(Linear(5, 4), Tanh(), Linear(4, NUM_CLASSES)), (5,)


def _cnn(sequence_ce: bool) -> tuple[Module, tuple[int, ...]]:
    model = Sequential(
        Conv2d(2, 4, 3, stride=2, padding=1),
        Tanh(),
        Conv2d(4, 4, 3, padding=1, groups=2),
        Sigmoid(),
        Flatten(),
        Linear(4 * 3 * 3, NUM_CLASSES),
    )
    return model, (2, 6, 6)


def _sequence(sequence_ce: bool) -> tuple[Module, tuple[int, ...]]:
    layers = [Linear(4, 5), Tanh(), Linear(5, NUM_CLASSES)]
    return Sequential(*layers, *([Permute()] if sequence_ce else [])), (2, 4)


def _batchnorm_eval(sequence_ce: bool) -> tuple[Module, tuple[int, ...]]:
    bn = BatchNorm1d(4)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 1.5)
    model = Sequential(Linear(5, 4), bn, Tanh(), Linear(4, NUM_CLASSES))
    return model.eval(), (5,)


def _transformer(sequence_ce: bool) -> tuple[Module, tuple[int, ...]]:
    return TinyTransformer(), (3, 3)


def _dict_input(sequence_ce: bool) -> tuple[Module, tuple[int, ...]]:
    return DictInputModel(), (5,)


ARCHITECTURES: dict[str, Callable] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "sequence": _sequence,
    "dict_input": _dict_input,
    "batchnorm_eval": _batchnorm_eval,
    "transformer": _transformer,
}
LOSSES = {"mse": MSELoss, "ce": CrossEntropyLoss, "bce": BCEWithLogitsLoss}
REDUCTIONS = ("mean", "sum")


def _labels(loss: str, output: Tensor) -> Tensor:
    """Draw labels that fit a model output and a loss."""
    if loss == "ce":  # output [N, C, *]
        shape = (output.shape[0], *output.shape[2:])
        return randint(0, output.shape[1], shape)
    if loss == "bce":
        return randint(0, 2, output.shape).to(float64)
    return randn(output.shape, dtype=float64)


@dataclass(frozen=True)
class Case:
    """A seeded problem: architecture, loss, reduction (and optional seed)."""

    architecture: str
    loss: str
    reduction: str = "mean"
    seed: int = 0

    @property
    def id(self) -> str:
        return f"{self.architecture}-{self.loss}-{self.reduction}"

    @property
    def is_dict_input(self) -> bool:
        return self.architecture == "dict_input"

    @property
    def batch_size_fn(self) -> Callable | None:
        return (lambda X: X["x"].shape[0]) if self.is_dict_input else None

    @property
    def input_key(self) -> str | None:
        return "x" if self.is_dict_input else None

    def make(self) -> tuple[Module, Module, list[Tensor], list]:
        """Build model, loss function, parameters, and data (all float64)."""
        manual_seed(self.seed)
        sequence_ce = self.loss == "ce"
        model, in_shape = ARCHITECTURES[self.architecture](sequence_ce)
        model = model.to(float64)
        loss_func = LOSSES[self.loss](reduction=self.reduction)
        data = []
        for batch_size in BATCH_SIZES:
            X = rand(batch_size, *in_shape, dtype=float64)
            if self.is_dict_input:
                X = {"x": X, "scale": rand(batch_size, 1, dtype=float64) + 0.5}
            data.append((X, _labels(self.loss, model(X).detach())))
        params = [p for p in model.parameters() if p.requires_grad]
        return model, loss_func, params, data

    def kwargs(self) -> dict:
        """Keyword arguments for operators that the case needs (dict inputs)."""
        return {"batch_size_fn": self.batch_size_fn} if self.is_dict_input else {}


CASES = [
    Case(arch, loss, reduction)
    for arch in ARCHITECTURES
    for loss in LOSSES
    for reduction in REDUCTIONS
]
CASE_IDS = [case.id for case in CASES]
