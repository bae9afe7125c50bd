"""Tests for curvlinops.structured.kronecker."""

from functools import reduce

import pytest
import torch
from torch import Generator, eye, float32, float64, kron, randn, zeros
from torch.linalg import LinAlgError

from curvlinops import EighDecomposedLinearOperator, KroneckerProductLinearOperator
from test.structured.closed_forms import check_closed_forms, dense_logdet
from test.utils import assert_close


def random_matrix(n: int, seed: int, spd: bool = False):
    """A seeded float64 matrix; symmetric positive definite if ``spd``."""
    A = randn(n, n, generator=Generator().manual_seed(seed), dtype=float64)
    return A @ A.T / n + eye(n, dtype=float64) if spd else A + 2 * eye(n)


SIZES = [(4,), (3, 2), (2, 3, 2)]


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("spd", [False, True], ids=["general", "spd"])
def test_kronecker_product_matches_torch_kron(sizes, spd):
    factors = [random_matrix(n, seed, spd) for seed, n in enumerate(sizes)]
    K = KroneckerProductLinearOperator(*factors)
    assert K._in_shape == K._out_shape == [torch.Size(sizes)]
    assert K.SELF_ADJOINT == spd
    damped = EighDecomposedLinearOperator if spd else None
    check_closed_forms(K, reduce(kron, factors), KroneckerProductLinearOperator, damped)


def test_kronecker_logdet_of_factors_with_negative_determinants():
    """An even multiplicity makes the product's determinant positive."""
    A = random_matrix(2, 0)
    A = A * torch.tensor([[1.0], [-1.0]], dtype=float64)  # flip a row: det < 0
    B = random_matrix(2, 1)
    assert A.det() < 0
    K = KroneckerProductLinearOperator(A, B)
    dense = kron(A, B)
    assert_close(K.logdet, dense_logdet(dense))
    assert torch.isfinite(K.logdet)
    K_odd = KroneckerProductLinearOperator(A, random_matrix(3, 1))
    assert K_odd.det < 0 and torch.isnan(K_odd.logdet)


def test_kronecker_product_is_never_formed():
    """Factors of size 300 give N = 90000: the dense matrix would need 65 GB."""
    A, B = random_matrix(300, 0, spd=True), random_matrix(300, 1, spd=True)
    K = KroneckerProductLinearOperator(A, B)
    X = randn(300, 300, dtype=float64, generator=Generator().manual_seed(2))
    assert_close(K @ X.flatten(), (A @ X @ B.T).flatten())
    assert_close(K.trace, A.trace() * B.trace())


def test_kronecker_rejects_bad_factors():
    A = random_matrix(3, 0)
    with pytest.raises(ValueError, match="at least one"):
        KroneckerProductLinearOperator()
    with pytest.raises(ValueError, match=r"factors\[1\] must be a square matrix"):
        KroneckerProductLinearOperator(A, randn(2, 3, dtype=float64))
    with pytest.raises(ValueError, match="square matrix, got shape"):
        KroneckerProductLinearOperator(randn(2, 2, 2, dtype=float64))
    with pytest.raises(TypeError, match="must be a tensor"):
        KroneckerProductLinearOperator(A, [[1.0]])
    with pytest.raises(ValueError, match="dtype"):
        KroneckerProductLinearOperator(A, A.to(float32))
    with pytest.raises(ValueError, match="device"):
        KroneckerProductLinearOperator(A, A.to("meta"))
    with pytest.raises(ValueError, match="floating"):
        KroneckerProductLinearOperator(torch.ones(2, 2, dtype=torch.int64))


def test_kronecker_inverse_errors():
    singular = zeros(2, 2, dtype=float64)
    singular[0, 0] = 1.0
    K = KroneckerProductLinearOperator(random_matrix(3, 0, spd=True), singular)
    with pytest.raises(LinAlgError, match="factor 1 .* singular"):
        K.inverse()
    assert_close(
        K.inverse(damping=1.0)
        @ eye(6, dtype=float64)
        @ (kron(K.factors[0], singular) + eye(6, dtype=float64)),
        eye(6, dtype=float64),
    )
    with pytest.raises(NotImplementedError, match="factor 0 is not symmetric"):
        KroneckerProductLinearOperator(random_matrix(2, 0)).inverse(damping=0.1)
    with pytest.raises(ValueError, match="non-negative"):
        K.inverse(damping=-1.0)
