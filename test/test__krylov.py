"""Tests for curvlinops._krylov: edge cases of the batched CG and LSMR kernels."""

from torch import cat, eye, float64, linalg, manual_seed, randn, zeros

from curvlinops._krylov import conjugate_gradients, lsmr
from test.utils import assert_close


def _problem(rows: int = 6, cols: int = 6):
    manual_seed(0)
    A = randn(rows, cols, dtype=float64)
    if rows == cols:
        A = A @ A.T + eye(rows, dtype=float64)
    B = cat([randn(rows, 1, dtype=float64), zeros(rows, 1, dtype=float64)], dim=1)
    return A, B


def test_cg_with_zero_right_hand_side():
    """A zero column is solved by zero right away and does not disturb others."""
    A, B = _problem()
    X, converged, _ = conjugate_gradients(A.__matmul__, B, None, 1e-12, 0.0, 100)
    assert converged.all()
    assert_close(X, linalg.solve(A, B))
    assert (X[:, 1] == 0).all()


def test_lsmr_with_zero_right_hand_side():
    A, B = _problem(8, 5)
    X, converged = lsmr(A.__matmul__, A.T.__matmul__, B, 0.0, 1e-12, 1e-12, 1e8, 50)
    assert converged.all()
    assert_close(X, linalg.pinv(A) @ B, rtol=1e-8)
    assert (X[:, 1] == 0).all()


def test_lsmr_exact_breakdown():
    """An identity operator ends the bidiagonalization after one step."""
    identity = eye(4, dtype=float64)
    B = randn(4, 3, dtype=float64)
    X, converged = lsmr(
        identity.__matmul__, identity.__matmul__, B, 0.0, 1e-12, 1e-12, 1e8, 10
    )
    assert converged.all()
    assert_close(X, B)
