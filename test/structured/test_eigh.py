"""Tests for curvlinops.structured.eigh."""

import pytest
import torch
from torch import Generator, float32, float64, kron, rand, randn, tensor
from torch.linalg import LinAlgError, eigh, qr

from curvlinops import EighDecomposedLinearOperator, KroneckerProductLinearOperator
from test.structured.closed_forms import check_closed_forms
from test.utils import compare_matmat


def orthonormal(n: int, seed: int):
    """A seeded orthonormal matrix."""
    return qr(randn(n, n, generator=Generator().manual_seed(seed), dtype=float64))[0]


def eigenvalues(shape, seed: int, negative: int = 0):
    """Seeded eigenvalues in [0.5, 1.5]; the first ``negative`` ones negated."""
    values = rand(*shape, generator=Generator().manual_seed(seed), dtype=float64)
    values = (values + 0.5).flatten()
    values[:negative] *= -1
    return values.reshape(shape)


@pytest.mark.parametrize("negative", [0, 1, 2], ids=lambda n: f"{n}negative")
def test_eigh_with_matrix_eigenvectors(negative):
    Q, values = orthonormal(5, 0), eigenvalues((5,), 1, negative)
    E = EighDecomposedLinearOperator(values, Q)
    assert E._in_shape == [torch.Size([5])]
    dense = Q @ values.diag() @ Q.T
    check_closed_forms(
        E, dense, EighDecomposedLinearOperator, EighDecomposedLinearOperator
    )
    assert torch.isnan(E.logdet) == (negative % 2 == 1)


@pytest.mark.parametrize("sizes", [(3,), (3, 2), (2, 2, 3)], ids=str)
def test_eigh_with_kronecker_eigenvectors(sizes):
    """EKFAC's structure: eigenvalues in the shape of the Kronecker tensor."""
    factors = [orthonormal(n, seed) for seed, n in enumerate(sizes)]
    Q = KroneckerProductLinearOperator(*factors)
    values = eigenvalues(sizes, 7)
    E = EighDecomposedLinearOperator(values, Q)
    assert E._in_shape == [torch.Size(sizes)]
    assert E.eigenvalues.shape == sizes and E.eigenvectors is Q
    Q_dense = factors[0]
    for factor in factors[1:]:
        Q_dense = kron(Q_dense, factor)
    dense = Q_dense @ values.flatten().diag() @ Q_dense.T
    check_closed_forms(
        E, dense, EighDecomposedLinearOperator, EighDecomposedLinearOperator
    )
    flat = EighDecomposedLinearOperator(values.flatten(), Q)  # flat eigenvalues
    assert flat.eigenvalues.shape == sizes


def test_eigh_of_a_singular_matrix():
    X = randn(4, 2, generator=Generator().manual_seed(0), dtype=float64)
    values, vectors = eigh(X @ X.T)
    values[:2] = 0.0  # rank 2, without eigh's rounding errors
    E = EighDecomposedLinearOperator(values, vectors)
    assert E.det == 0 and E.logdet == -float("inf")
    with pytest.raises(LinAlgError, match="singular"):
        E.inverse()
    expected = vectors @ (1 / (values + 0.5)).diag() @ vectors.T
    compare_matmat(E.inverse(damping=0.5), expected)


def test_eigh_rejects_bad_input():
    Q = orthonormal(3, 0)
    values = eigenvalues((3,), 0)
    with pytest.raises(ValueError, match="orthonormal"):
        EighDecomposedLinearOperator(values, Q + 0.01)
    EighDecomposedLinearOperator(values, Q + 0.01, check_orthonormal=False)
    with pytest.raises(ValueError, match="factor 1 .* orthonormal"):
        EighDecomposedLinearOperator(
            eigenvalues((3, 2), 0),
            KroneckerProductLinearOperator(
                Q, tensor([[1.0, 1], [0, 1]], dtype=float64)
            ),
        )
    with pytest.raises(ValueError, match="Expected 3 eigenvalues"):
        EighDecomposedLinearOperator(values[:2], Q)
    with pytest.raises(ValueError, match="dtype"):
        EighDecomposedLinearOperator(values.to(float32), Q)
    with pytest.raises(ValueError, match="square matrix"):
        EighDecomposedLinearOperator(values, Q[:, :2])
    with pytest.raises(TypeError, match="KroneckerProductLinearOperator"):
        EighDecomposedLinearOperator(values, Q.numpy())
