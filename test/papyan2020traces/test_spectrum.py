"""Tests for curvlinops.papyan2020traces.spectrum."""

import pickle
from copy import deepcopy
from math import log

import numpy
import pytest
from scipy.sparse.linalg import ArpackNoConvergence
from torch import (
    cat,
    equal,
    float64,
    full,
    linalg,
    linspace,
    manual_seed,
    randn,
    tensor,
    trapezoid,
)

import curvlinops.papyan2020traces._boundaries as _boundaries
from curvlinops import (
    GGNLinearOperator,
    LanczosApproximateLogSpectrumCached,
    LanczosApproximateSpectrumCached,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_spectrum,
)
from curvlinops.examples import TensorLinearOperator
from curvlinops.examples.functorch import functorch_ggn
from curvlinops.papyan2020traces.spectrum import (
    fast_lanczos,
    lanczos_approximate_log_spectrum_from_iter,
    lanczos_approximate_spectrum_from_iter,
)
from test.cases import Case
from test.operator_kinds import (
    OPERATOR_KINDS,
    CountingOperator,
    assert_world,
    make_operator,
    seed_everything,
    to_tensor,
)
from test.utils import assert_close

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


def _log_mass(grid, density, center: float, radius: float) -> float:
    """Mass of a density w.r.t. λ in ``[center e^-radius, center e^radius]``."""
    inside = (grid.log() - log(center)).abs() <= radius
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
def test_log_spectral_density_puts_mass_on_eigenvalue_magnitudes(kind):
    """Grid points are λ (not log λ) and the density is w.r.t. λ."""
    A = _matrix_with_eigenvalues(LOG_CLUSTERS)
    seed_everything(0)
    grid, density = lanczos_approximate_log_spectrum(
        make_operator(A, kind), ncv=40, num_repeats=20, kappa=3.0, margin=0.3
    )
    assert_world(density, kind)
    grid, density = to_tensor(grid), to_tensor(density)
    assert (grid > 0).all() and (
        grid.log().diff() - grid.log().diff()[0]
    ).abs().max() < 1e-9
    assert abs(trapezoid(density, grid) - 1) < 1e-3
    for value, multiplicity in LOG_CLUSTERS.items():
        magnitude = abs(value) + 1e-5
        assert abs(_log_mass(grid, density, magnitude, 1.0) - multiplicity / 100) < 0.05


def test_log_spectral_density_of_log_uniform_eigenvalues():
    """Eigenvalues e^u, u uniform on [a, b], have the density 1 / ((b - a) λ).

    (A density w.r.t. log λ would be flat instead, off by up to 7x here.)
    """
    a, b = log(1.0), log(10.0)
    A = linspace(a, b, 400, dtype=float64).exp().diag()
    manual_seed(0)
    grid, density = lanczos_approximate_log_spectrum(
        A, ncv=30, num_repeats=20, kappa=1.2, boundaries=(1.0, 10.0), margin=0.2
    )
    assert abs(trapezoid(density, grid) - 1) < 1e-3
    interior = (grid > 1.5) & (grid < 10 / 1.5)
    expected = 1 / ((b - a) * grid[interior])
    assert ((density[interior] - expected).abs() / expected).max() < 0.15


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
    assert_close_float(grid[0], 1.0 + 1e-3)
    assert_close_float(grid[-1], 100.0 + 1e-3)


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

    monkeypatch.setattr(_boundaries, "eigsh", no_convergence)
    A = _matrix_with_eigenvalues(CLUSTERS)
    spectrum = LanczosApproximateSpectrumCached(A, ncv=10)
    grid, _ = spectrum.approximate_spectrum(margin=0.0)
    nodes = spectrum._nodes()
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


@pytest.mark.parametrize("log_scale", [False, True], ids=["linear", "log"])
def test_cached_densities_average_densities_of_single_processes(log_scale: bool):
    """The classes are built from the densities of one Lanczos process each."""
    A = _matrix_with_eigenvalues(LOG_CLUSTERS if log_scale else CLUSTERS)
    manual_seed(0)
    cls = (
        LanczosApproximateLogSpectrumCached
        if log_scale
        else LanczosApproximateSpectrumCached
    )
    spectrum = cls(A, ncv=12, boundaries=(1e-3, 100.0) if log_scale else (-2.0, 5.0))
    if log_scale:
        grid, density = spectrum.approximate_log_spectrum(num_repeats=3, kappa=2.0)
        single = [
            lanczos_approximate_log_spectrum_from_iter(
                it, (1e-3, 100.0), 1024, 2.0, 0.05, 1e-5
            )
            for it in spectrum._iterations(3)
        ]
    else:
        grid, density = spectrum.approximate_spectrum(num_repeats=3, kappa=2.0)
        single = [
            lanczos_approximate_spectrum_from_iter(it, (-2.0, 5.0), 1024, 2.0, 0.05)
            for it in spectrum._iterations(3)
        ]
    assert_close(grid, single[0][0])
    assert_close(density, sum(d for _, d in single) / 3)


def test_log_spectrum_method_defaults_to_kappa_3():
    """As in 3.x, the cached class's method uses kappa=3.0, the function 1.04."""
    A = _matrix_with_eigenvalues(LOG_CLUSTERS)
    spectrum = LanczosApproximateLogSpectrumCached(A, ncv=10, boundaries=(1e-3, 1e2))
    _, default = spectrum.approximate_log_spectrum()
    _, kappa_3 = spectrum.approximate_log_spectrum(kappa=3.0)
    _, kappa_104 = spectrum.approximate_log_spectrum(kappa=1.04)
    assert default.equal(kappa_3) and not default.allclose(kappa_104)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_fast_lanczos_is_one_quadrature_in_the_callers_world(kind):
    """Full Lanczos (ncv = N) gives the eigenvalues; the weights sum to one."""
    A = _matrix_with_eigenvalues({-1.0: 4, 2.0: 3, 7.0: 3})
    A = A + 1e-3 * linspace(0, 1, 10, dtype=float64).diag()  # distinct eigenvalues
    seed_everything(0)
    evals, evecs = fast_lanczos(make_operator(A, kind), ncv=10)
    assert_world(evals, kind), assert_world(evecs, kind)
    evals, evecs = to_tensor(evals), to_tensor(evecs)
    assert_close(evals, linalg.eigvalsh(A), rtol=1e-8, atol=1e-8)
    assert_close((evecs[0] ** 2).sum(), tensor(1.0, dtype=float64))
    seed_everything(0)
    evals_tri, _ = fast_lanczos(
        make_operator(A, kind), ncv=10, use_eigh_tridiagonal=True
    )
    assert_close(to_tensor(evals_tri), evals, rtol=1e-10, atol=1e-12)
    grid, density = lanczos_approximate_spectrum_from_iter(
        (evals.numpy(), evecs.numpy()), (-1.0, 7.0), 100, 3.0, 0.05
    )
    assert isinstance(density, numpy.ndarray)  # NumPy in, NumPy out
    with pytest.raises(ValueError, match="ncv"):
        fast_lanczos(A, ncv=11)


def test_cached_spectra_of_curvature_operators_copy_and_pickle():
    """Copies of a spectrum with cached quadratures (of a GGN used before) agree."""
    model, loss_func, params, data = Case("mlp", "ce").make()
    G = GGNLinearOperator(model, loss_func, params, data)
    manual_seed(0)
    spectrum = LanczosApproximateSpectrumCached(G, ncv=8, boundaries=(0.0, 1.0))
    grid, density = spectrum.approximate_spectrum(num_repeats=2, num_points=50)
    for copied in (deepcopy(spectrum), pickle.loads(pickle.dumps(spectrum))):
        copied_grid, copied_density = copied.approximate_spectrum(
            num_repeats=2, num_points=50
        )
        assert equal(copied_grid, grid) and equal(copied_density, density)
