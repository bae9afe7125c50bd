"""Tests for curvlinops.papyan2020traces._quadrature: Lanczos quadrature."""

import pytest
from torch import arange, cat, float64, full, linalg, manual_seed, randn, stack

from curvlinops._adapter import adapt
from curvlinops.papyan2020traces._quadrature import lanczos_iterations
from test.operator_kinds import ColumnDrawer, decaying_matrix, make_operator
from test.utils import assert_close


def lanczos_quadrature(A, ncv: int, num_repeats: int, use_eigh_tridiagonal=False):
    """Nodes and weights: eigenvalues and squared first eigenvector entries of T."""
    evals, evecs = lanczos_iterations(A, ncv, num_repeats, use_eigh_tridiagonal)
    return evals, evecs[:, 0, :] ** 2


def _symmetric_matrix(dim: int = 12):
    manual_seed(0)
    X = randn(dim, dim, dtype=float64)
    return X + X.T


@pytest.mark.parametrize("kind", ["operator", "numpy"])
def test_quadrature_reproduces_moments_of_start_vectors(kind):
    """Quadrature with n nodes is exact for polynomials of degree below 2n.

    That is, sum_k w_k theta_k^p = v^T A^p v for the normalized start vector v.
    """
    A, ncv, num_repeats = _symmetric_matrix(), 4, 3
    seed = 0
    V = ColumnDrawer(kind, seed, global_torch_rng=True).draw(num_repeats, 12, "normal")
    V = V / V.norm(dim=0)
    ColumnDrawer(kind, seed, global_torch_rng=True)  # reset the random state
    nodes, weights = lanczos_quadrature(adapt(make_operator(A, kind)), ncv, num_repeats)
    assert nodes.shape == weights.shape == (num_repeats, ncv)
    for power in range(2 * ncv):
        moments = (weights * nodes**power).sum(dim=1)
        expected = (V * (linalg.matrix_power(A, power) @ V)).sum(dim=0)
        assert_close(moments, expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("use_eigh_tridiagonal", [False, True])
def test_full_lanczos_recovers_the_eigenvalues(use_eigh_tridiagonal: bool):
    A = decaying_matrix(15, 0.7)
    nodes, weights = lanczos_quadrature(adapt(A), 15, 2, use_eigh_tridiagonal)
    for n in nodes:
        assert_close(n, linalg.eigvalsh(A), rtol=1e-8, atol=1e-10)
    assert_close(weights.sum(dim=1), full((2,), 1.0, dtype=float64))


def test_invariant_krylov_space_gives_exact_quadrature():
    """Few distinct eigenvalues make the Krylov space invariant.

    The process restarts with zero weight, so the quadrature keeps exact weights.
    """
    manual_seed(0)
    eigenvalues = cat([full((5,), -2.0), full((7,), 1.0), full((8,), 3.0)])
    Q, _ = linalg.qr(randn(20, 20, dtype=float64))
    A = Q @ eigenvalues.to(float64).diag() @ Q.T
    nodes, weights = lanczos_quadrature(adapt(A), 10, 4)
    assert weights.isfinite().all() and nodes.isfinite().all()
    assert_close(weights.sum(dim=1), full((4,), 1.0, dtype=float64))
    for value in (-2.0, 1.0, 3.0):  # every eigenvalue is a node with positive weight
        is_node = (nodes - value).abs() < 1e-8
        assert (is_node & (weights > 1e-3)).any(dim=1).all()
    # all remaining nodes carry no weight
    is_eigenvalue = stack([(nodes - v).abs() < 1e-8 for v in (-2.0, 1.0, 3.0)]).any(0)
    assert (weights[~is_eigenvalue] < 1e-12).all()


def test_weights_average_to_the_spectral_density():
    """Averaged over start vectors, node weights match eigenvalue multiplicities."""
    manual_seed(0)
    eigenvalues = cat([full((30,), 0.0), arange(1, 11, dtype=float64)])
    A = eigenvalues.diag().to(float64)
    nodes, weights = lanczos_quadrature(adapt(A), 12, 400)  # 11 distinct: exact
    mass_at_zero = weights[nodes.abs() < 1e-6].sum() / 400
    assert abs(mass_at_zero - 30 / 40) < 0.03
