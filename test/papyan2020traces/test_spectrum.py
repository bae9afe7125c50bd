"""Tests for curvlinops.papyan2020traces.spectrum."""

from math import log

import numpy
import pytest
from scipy.sparse.linalg import ArpackNoConvergence
from torch import cat, float64, full, linalg, manual_seed, randn, trapezoid

import curvlinops.papyan2020traces._quadrature as quadrature
from curvlinops import (
    GGNLinearOperator,
    LanczosApproximateLogSpectrumCached,
    LanczosApproximateSpectrumCached,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_spectrum,
)
from curvlinops.examples import TensorLinearOperator
from curvlinops.examples.functorch import functorch_ggn
from test.cases import Case
from test.operator_kinds import (
    OPERATOR_KINDS,
    CountingOperator,
    assert_world,
    make_operator,
    seed_everything,
    to_tensor,
)

# eigenvalue -> multiplicity
CLUSTERS = {-2.0: 30, 1.0: 50, 5.0: 20}
LOG_CLUSTERS = {1e-3: 40, -1.0: 30, 1e2: 30}


def _matrix_with_eigenvalues(clusters: dict[float, int]):
    manual_seed(0)
    eigenvalues = cat([full((n,), value) for value, n in clusters.items()])
    Q, _ = linalg.qr(randn(len(eigenvalues), len(eigenvalues), dtype=float64))
    return Q @ eigenvalues.to(float64).diag() @ Q.T


def _mass(grid, density, center: float, radius: float) -> float:
    """Probability mass of the density in ``[center - radius, center + radius]``."""
    inside = (grid - center).abs() <= radius
    return trapezoid(density[inside], grid[inside]).item()


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_spectral_density_puts_mass_on_eigenvalues(kind):
    A = _matrix_with_eigenvalues(CLUSTERS)
    seed_everything(0)
    grid, density = lanczos_approximate_spectrum(
        make_operator(A, kind), ncv=40, num_repeats=20
    )
    assert_world(density, kind)
    grid, density = to_tensor(grid), to_tensor(density)
    assert grid.shape == density.shape == (1024,)
    assert (density >= 0).all()
    assert abs(trapezoid(density, grid) - 1) < 1e-3
    for value, multiplicity in CLUSTERS.items():
        assert abs(_mass(grid, density, value, 0.5) - multiplicity / 100) < 0.05


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_log_spectral_density_puts_mass_on_log_eigenvalues(kind):
    A = _matrix_with_eigenvalues(LOG_CLUSTERS)
    seed_everything(0)
    grid, density = lanczos_approximate_log_spectrum(
        make_operator(A, kind), ncv=40, num_repeats=20, kappa=3.0, margin=0.3
    )
    assert_world(density, kind)
    grid, density = to_tensor(grid), to_tensor(density)
    assert abs(trapezoid(density, grid) - 1) < 1e-3
    for value, multiplicity in LOG_CLUSTERS.items():
        log_value = log(abs(value) + 1e-5)
        assert abs(_mass(grid, density, log_value, 1.0) - multiplicity / 100) < 0.05


def test_grid_spans_given_boundaries_with_margin():
    A = _matrix_with_eigenvalues(CLUSTERS)
    grid, _ = lanczos_approximate_spectrum(
        A, ncv=5, num_points=11, boundaries=(-3.0, 7.0), margin=0.1
    )
    assert grid.shape == (11,)
    assert_close_float(grid[0], -4.0), assert_close_float(grid[-1], 8.0)
    grid, _ = lanczos_approximate_log_spectrum(
        A, ncv=5, boundaries=(1.0, 100.0), margin=0.0, epsilon=1e-3
    )
    assert_close_float(grid[0], log(1.0 + 1e-3))
    assert_close_float(grid[-1], log(100.0 + 1e-3))


def assert_close_float(a, b):
    assert abs(float(a) - b) < 1e-10, (float(a), b)


def test_estimated_boundaries_enclose_the_spectrum():
    A = _matrix_with_eigenvalues(CLUSTERS)
    grid, _ = lanczos_approximate_spectrum(A, ncv=5, margin=0.0, boundaries_tol=1e-6)
    assert_close_float(grid[0], -2.0), assert_close_float(grid[-1], 5.0)
    grid, _ = lanczos_approximate_spectrum(A, ncv=5, margin=0.0, boundaries=(None, 9))
    assert_close_float(grid[0], -2.0), assert_close_float(grid[-1], 9.0)


def test_boundaries_fall_back_to_lanczos_nodes(monkeypatch):
    """If ARPACK does not converge, the extreme Lanczos nodes are the boundaries."""

    def no_convergence(*args, **kwargs):
        raise ArpackNoConvergence("no convergence", [], [])

    monkeypatch.setattr(quadrature, "eigsh", no_convergence)
    A = _matrix_with_eigenvalues(CLUSTERS)
    spectrum = LanczosApproximateSpectrumCached(A, ncv=10)
    grid, _ = spectrum.approximate_spectrum(margin=0.0)
    nodes = spectrum._quadratures(1)[0][0]
    assert_close_float(grid[0], nodes.min().item())
    assert_close_float(grid[-1], nodes.max().item())


def test_cached_lanczos_iterations_are_reused():
    A = CountingOperator(TensorLinearOperator(_matrix_with_eigenvalues(CLUSTERS)))
    spectrum = LanczosApproximateSpectrumCached(A, ncv=8, boundaries=(-2.0, 5.0))
    assert A.num_columns == 8  # the symmetry probe (A is not SELF_ADJOINT)
    A.num_columns = 0
    grid, density = spectrum.approximate_spectrum(num_repeats=2)
    assert A.num_columns == 2 * 8
    for kwargs in ({"num_points": 50}, {"kappa": 2.0}, {"margin": 0.2}, {}):
        spectrum.approximate_spectrum(num_repeats=2, **kwargs)
    assert A.num_columns == 2 * 8
    spectrum.approximate_spectrum(num_repeats=5)
    assert A.num_columns == 5 * 8  # only the three missing repeats ran
    grid_again, density_again = spectrum.approximate_spectrum(num_repeats=2)
    assert grid_again.equal(grid) and density_again.equal(density)

    log_spectrum = LanczosApproximateLogSpectrumCached(A, ncv=8, boundaries=(1, 5))
    A.num_columns = 0
    log_spectrum.approximate_log_spectrum(num_repeats=3)
    log_spectrum.approximate_log_spectrum(num_repeats=3, epsilon=1e-2, kappa=2.0)
    assert A.num_columns == 3 * 8


def test_spectrum_of_ggn_is_matrix_free():
    """The GGN (rank 15 of 39) has most of its spectral mass at zero."""
    model, loss_func, params, data = Case("mlp", "ce").make()
    G = GGNLinearOperator(model, loss_func, params, data, check_deterministic=False)
    G = CountingOperator(G)
    eigenvalues = linalg.eigvalsh(functorch_ggn(model, loss_func, params, data))
    manual_seed(0)
    grid, density = lanczos_approximate_spectrum(G, ncv=20, num_repeats=5)
    assert 5 * 20 <= G.num_columns < 5 * 20 + 2 * G.shape[0]  # Lanczos + boundaries
    assert abs(trapezoid(density, grid) - 1) < 1e-2
    radius = 0.1 * eigenvalues.max().item()  # about five standard deviations
    mass_near_zero = _mass(grid, density, 0.0, radius)
    fraction_near_zero = (eigenvalues.abs() <= radius).double().mean().item()
    assert abs(mass_near_zero - fraction_near_zero) < 0.1


def test_constant_spectrum():
    """All eigenvalues equal (zero-width spectrum): the density peaks there."""
    A = 3.0 * numpy.eye(30)
    numpy.random.seed(0)
    grid, density = lanczos_approximate_spectrum(A, ncv=4)
    assert isinstance(grid, numpy.ndarray)
    assert abs(grid[density.argmax()] - 3.0) < 1e-2


def test_spectrum_rejects_bad_input():
    A = _matrix_with_eigenvalues(CLUSTERS)
    for ncv in (1, 101, 3.0):
        with pytest.raises(ValueError, match="ncv"):
            lanczos_approximate_spectrum(A, ncv=ncv)
    with pytest.raises(ValueError, match="square"):
        lanczos_approximate_spectrum(A[:, :50], ncv=5)
    with pytest.raises(ValueError, match="kappa"):
        lanczos_approximate_spectrum(A, ncv=5, kappa=1.0)
    with pytest.raises(ValueError, match="margin"):
        lanczos_approximate_spectrum(A, ncv=5, margin=-0.1)
    with pytest.raises(ValueError, match="num_repeats"):
        lanczos_approximate_spectrum(A, ncv=5, num_repeats=0)
    with pytest.raises(ValueError, match="num_points"):
        lanczos_approximate_spectrum(A, ncv=5, num_points=1)
    with pytest.raises(ValueError, match="boundaries"):
        lanczos_approximate_spectrum(A, ncv=5, boundaries=(1.0, 0.0))
    with pytest.raises(ValueError, match="boundaries"):
        lanczos_approximate_spectrum(A, ncv=5, boundaries=(1.0,))
    with pytest.raises(ValueError, match="boundaries_tol"):
        lanczos_approximate_spectrum(A, ncv=5, boundaries_tol=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        lanczos_approximate_log_spectrum(A, ncv=5, epsilon=0.0)
