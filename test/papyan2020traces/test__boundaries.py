"""Tests for curvlinops.papyan2020traces._boundaries: extreme eigenvalue estimates."""

import pytest
from scipy.sparse.linalg import ArpackNoConvergence
from torch import float64, linalg, manual_seed, randn

import curvlinops.papyan2020traces._boundaries as boundaries_module
from curvlinops.papyan2020traces.spectrum import (
    approximate_boundaries,
    approximate_boundaries_abs,
)
from test.operator_kinds import make_operator, seed_everything


def _symmetric(dim: int):
    manual_seed(0)
    X = randn(dim, dim, dtype=float64)
    return (X + X.T) / 2


@pytest.mark.parametrize("dim", [12, 60], ids=["dense", "arpack"])
@pytest.mark.parametrize("kind", ["operator", "numpy"])
def test_boundaries_are_the_extreme_eigenvalues(dim: int, kind: str):
    A = _symmetric(dim)
    eigenvalues = linalg.eigvalsh(A)
    magnitudes = eigenvalues.abs().sort().values
    seed_everything(0)
    low, high = approximate_boundaries(make_operator(A, kind), tol=1e-10)
    assert isinstance(low, float) and isinstance(high, float)
    assert abs(low - eigenvalues[0]) < 1e-8 and abs(high - eigenvalues[-1]) < 1e-8
    low, high = approximate_boundaries_abs(make_operator(A, kind), tol=1e-10)
    assert abs(low - magnitudes[0]) < 1e-6 and abs(high - magnitudes[-1]) < 1e-8


def test_given_boundaries_are_kept():
    A = _symmetric(12)
    eigenvalues = linalg.eigvalsh(A)
    assert approximate_boundaries(A, boundaries=(-100.0, 100.0)) == (-100.0, 100.0)
    low, high = approximate_boundaries(A, boundaries=(None, 100.0))
    assert abs(low - eigenvalues[0]) < 1e-10 and high == 100.0
    low, high = approximate_boundaries_abs(A, boundaries=(0.5, None))
    assert low == 0.5 and abs(high - eigenvalues.abs().max()) < 1e-10
    with pytest.raises(ValueError, match="boundaries"):
        approximate_boundaries(A, boundaries=(1.0, 0.0))


def test_no_convergence_raises(monkeypatch):
    def no_convergence(*args, **kwargs):
        raise ArpackNoConvergence("no convergence", [], [])

    monkeypatch.setattr(boundaries_module, "eigsh", no_convergence)
    with pytest.raises(
        RuntimeError, match="ARPACK did not converge to the eigenvalue 'LA'"
    ):
        approximate_boundaries(_symmetric(30), boundaries=(0.0, None))
