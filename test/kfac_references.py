"""Dense references and exact-case models for the KFAC, EKFAC, KFOC, inverse tests.

The dense KFAC/EKFAC matrices are assembled from the operators' factors with
explicit index bookkeeping (independent of the canonical converters and products),
and the curvature references come from :mod:`torch.func`.
"""

from __future__ import annotations

from torch import Tensor, arange, cat, float64, kron, manual_seed, rand, randn, zeros
from torch.func import jacrev
from torch.linalg import svd
from torch.nn import (
    BCEWithLogitsLoss,
    Conv2d,
    CrossEntropyLoss,
    Linear,
    Module,
    MSELoss,
    Sequential,
)
from torch.nn.functional import binary_cross_entropy_with_logits, cross_entropy

from curvlinops._losses import loss_terms, reduction_factor
from curvlinops.examples.functorch import _flat_model, _weighted_batches
from test.cases import Case


def block_indices(op) -> list[tuple[str, str, Tensor]]:
    """Global parameter indices of every KFAC block, in canonical (row-major) order."""
    offsets, start = [], 0
    for p in op._params:
        offsets.append((start, p.shape))
        start += p.numel()

    def indices(position):
        offset, shape = offsets[position]
        return (offset + arange(shape.numel())).reshape(shape[0], -1)

    blocks = []
    for layer, roles in op._mapping.items():  # {'weight': position, 'bias': ...}
        joint = not op._separate_weight_and_bias and len(roles) == 2
        groups = (
            {"Wb": list(roles.values())}
            if joint
            else {role[0].replace("w", "W"): [pos] for role, pos in roles.items()}
        )
        for kind, members in groups.items():
            idx = cat([indices(m) for m in members], dim=1).flatten()
            blocks.append((layer, kind, idx))
    return blocks


def _place(dense: Tensor, idx: Tensor, block: Tensor):
    dense[idx.unsqueeze(1), idx.unsqueeze(0)] = block


def kfac_dense(op) -> Tensor:
    """Dense KFAC matrix built from the operator's Kronecker factors."""
    op._ensure_factors()
    dense = zeros(op.shape, dtype=op.dtype)
    for layer, kind, idx in block_indices(op):
        G = op._gradient_covariances[layer]
        A = op._input_covariances[layer] if kind != "b" else G.new_ones(1, 1)
        _place(dense, idx, kron(G, A))
    return dense


def ekfac_dense(op) -> Tensor:
    """Dense EKFAC matrix from eigenvectors and corrected eigenvalues."""
    op._ensure_factors()
    dense = zeros(op.shape, dtype=op.dtype)
    for layer, kind, idx in block_indices(op):
        QG = op._gradient_covariances_eigenvectors[layer]
        QA = (
            op._input_covariances_eigenvectors[layer]
            if kind != "b"
            else QG.new_ones(1, 1)
        )
        Q = kron(QG, QA)
        eigenvalues = op._corrected_eigenvalues[(layer, kind)].flatten()
        _place(dense, idx, Q @ eigenvalues.diag() @ Q.T)
    return dense


def kfoc_dense(op) -> Tensor:
    """Dense KFOC matrix built from the operator's Kronecker factors."""
    dense = zeros(op.shape, dtype=op.dtype)
    for layer, kind, idx in block_indices(op):
        S1, S2 = op.kronecker_factors[layer, kind]
        _place(dense, idx, S1 if S2 is None else kron(S1, S2))
    return dense


def optimal_kronecker(block: Tensor, d_out: int, d_in: int) -> Tensor:
    """The Frobenius-optimal Kronecker product, from an SVD of the rearranged block.

    The block is ``[d_out * d_in, d_out * d_in]`` in row-major ``(i, j)`` order; its
    rearrangement has rows ``(i, k)`` and columns ``(j, l)`` (Van Loan-Pitsianis).
    """
    shape = (d_out, d_in, d_out, d_in)
    rearranged = block.reshape(shape).permute(0, 2, 1, 3).reshape(d_out**2, d_in**2)
    U, S, Vh = svd(rearranged)
    return S[0] * kron(U[:, 0].reshape(d_out, d_out), Vh[0].reshape(d_in, d_in))


def restrict_to_blocks(dense: Tensor, op) -> Tensor:
    """Keep only the entries of a dense matrix that lie in KFAC's blocks."""
    result = zeros(dense.shape, dtype=dense.dtype)
    for _, _, idx in block_indices(op):
        _place(result, idx, dense[idx.unsqueeze(1), idx.unsqueeze(0)])
    return result


def _term_losses(loss_func, output: Tensor, y: Tensor) -> Tensor:
    """Un-reduced loss terms (summed over the C outputs of each term)."""
    f, y_t = loss_terms(loss_func, output, y)
    if isinstance(loss_func, CrossEntropyLoss):
        return cross_entropy(f, y_t, reduction="none")
    if isinstance(loss_func, BCEWithLogitsLoss):
        return binary_cross_entropy_with_logits(f, y_t, reduction="none").sum(-1)
    return ((f - y_t) ** 2).sum(-1)


def functorch_ef(model, loss_func, params, data, input_key=None) -> Tensor:
    """Empirical Fisher: scaled sum of the loss terms' gradient outer products."""
    f, _, theta = _flat_model(model, loss_func, params)
    ef = zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for X, y, weight in _weighted_batches(loss_func, data, input_key):
        output = f(theta, X).detach()
        scale = weight / reduction_factor(
            loss_func, loss_terms(loss_func, output, y)[0]
        )
        J = jacrev(lambda t: _term_losses(loss_func, f(t, X), y))(theta)  # noqa: B023
        ef.add_(J.T @ J, alpha=scale)
    return ef


# Models on which KFAC is exact


class MeanOverPositions(Module):
    """Average over all axes between batch and features (features last)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(start_dim=1, end_dim=-2).mean(1)


class ChannelsLast(Module):
    """Move the channel axis of ``[B, C, H, W]`` last: ``[B, H, W, C]``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.movedim(1, -1)


class Chunked(Module):
    """Apply a network to chunks of the positions of ``[B, R, D]``, one call each.

    Every layer of the network is used once per chunk, on 2 and 1 positions. The
    outputs are concatenated along the positions (expand's setting) or averaged over
    all positions (``pool=True``, reduce's setting).
    """

    def __init__(self, net: Module, pool: bool = False):
        super().__init__()
        self.net, self.pool = net, pool

    def forward(self, x: Tensor) -> Tensor:
        out = cat([self.net(chunk) for chunk in x.split([2, 1], dim=1)], dim=1)
        return out.mean(1) if self.pool else out


def deep_linear(structure: str) -> tuple[Module, tuple[int, ...]]:
    """A deep linear network and its input shape (per datum).

    ``'mlp'``: on vectors; ``'sequence'``: position-wise on sequences of length 3;
    ``'pooled'``: position-wise, then averaged over positions (reduce's exact case);
    ``'conv'``: a convolution then a 1x1 convolution, channels last (expand);
    ``'conv_pooled'``: the same convolutions, pooled, then a linear layer (reduce);
    ``'circular'``: as ``'conv'`` with circular padding;
    ``'chunked'``, ``'chunked_pooled'``: as ``'sequence'`` and ``'pooled'``, but
    every layer is called once per chunk of positions (several uses per layer).
    """
    convs = [Conv2d(2, 3, 3, stride=2, padding=1), Conv2d(3, 2, 1)]
    circular = Conv2d(2, 3, 3, padding=1, padding_mode="circular")
    models = {
        "circular": (Sequential(circular, Conv2d(3, 2, 1), ChannelsLast()), (2, 4, 4)),
        "chunked": (Chunked(Sequential(Linear(4, 3), Linear(3, 2))), (3, 4)),
        "chunked_pooled": (
            Sequential(
                Chunked(Sequential(Linear(4, 3), Linear(3, 3)), pool=True), Linear(3, 2)
            ),
            (3, 4),
        ),
        "mlp": (Sequential(Linear(4, 3), Linear(3, 2)), (4,)),
        "sequence": (Sequential(Linear(4, 3), Linear(3, 2)), (3, 4)),
        "pooled": (
            Sequential(Linear(4, 3), Linear(3, 3), MeanOverPositions(), Linear(3, 2)),
            (3, 4),
        ),
        "conv": (Sequential(*convs, ChannelsLast()), (2, 5, 5)),
        "conv_pooled": (
            Sequential(*convs, ChannelsLast(), MeanOverPositions(), Linear(2, 2)),
            (2, 5, 5),
        ),
    }
    return models[structure]


def exact_case(structure: str, reduction: str, batch_sizes=(3, 2), seed: int = 0):
    """Deep linear network, square loss, and float64 data in several batches."""
    manual_seed(seed)
    model, in_shape = deep_linear(structure)
    model = model.to(float64)
    data = []
    for batch_size in batch_sizes:
        X = rand(batch_size, *in_shape, dtype=float64)
        data.append((X, randn(model(X).shape, dtype=float64)))
    return model, MSELoss(reduction=reduction), list(model.parameters()), data


# Conformance cases: (case, fisher_type, kfac_approx)

CONFORMANCE = [
    (Case("mlp", "ce"), "mc", "expand"),
    (Case("mlp", "bce", "sum"), "empirical", "reduce"),
    (Case("cnn", "mse"), "type-2", "expand"),
    (Case("cnn", "ce", "sum"), "mc", "reduce"),
    (Case("sequence", "ce"), "empirical", "expand"),
    (Case("sequence", "bce"), "type-2", "reduce"),
    (Case("dict_input", "mse", "sum"), "forward-only", "expand"),
    (Case("batchnorm_eval", "ce"), "type-2", "expand"),
    (Case("transformer", "ce"), "mc", "expand"),
    (Case("transformer", "mse", "sum"), "type-2", "reduce"),
]


def linear_params(model) -> list[Tensor]:
    """Parameters of the model's Linear and Conv2d layers (KFAC's supported ones)."""
    layers = [m for m in model.modules() if isinstance(m, (Linear, Conv2d))]
    return [p for layer in layers for p in layer.parameters()]
