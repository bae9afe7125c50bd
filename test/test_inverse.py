"""Tests for curvlinops.inverse: CG, LSMR and Neumann inverses."""

import warnings

import numpy
import pytest
from scipy.sparse.linalg import cg, lsmr
from torch import eye, float64, linalg, manual_seed, rand, randn, zeros

from curvlinops import (
    CGInverseLinearOperator,
    GGNLinearOperator,
    LSMRInverseLinearOperator,
    NeumannInverseLinearOperator,
)
from curvlinops.examples import IdentityLinearOperator
from curvlinops.examples.functorch import functorch_ggn
from test.cases import Case
from test.operator_kinds import OPERATOR_KINDS, make_operator
from test.utils import assert_close, compare_matmat

DAMPING = 0.1
GGN_CASES = [Case("mlp", "ce", "mean"), Case("sequence", "mse", "sum")]


def _spd_matrix(dim: int = 8, seed: int = 0):
    manual_seed(seed)
    X = randn(dim, dim, dtype=float64)
    return X @ X.T / dim + eye(dim, dtype=float64)


def _damped_ggn(case: Case):
    """Damped GGN operator ``G + damping * I`` and its dense counterpart."""
    model, loss_func, params, data = case.make()
    G = GGNLinearOperator(
        model, loss_func, params, data, check_deterministic=False, **case.kwargs()
    )
    identity = IdentityLinearOperator([p.shape for p in params], G.device, G.dtype)
    G_dense = functorch_ggn(model, loss_func, params, data, case.input_key)
    return G + DAMPING * identity, G_dense + DAMPING * eye(G.shape[0], dtype=float64)


# CG


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_cg_inverse_of_every_operator_kind(kind):
    A = _spd_matrix()
    A_inv = CGInverseLinearOperator(make_operator(A, kind), tol=1e-12)
    compare_matmat(A_inv, linalg.inv(A))


@pytest.mark.parametrize("case", GGN_CASES, ids=[c.id for c in GGN_CASES])
def test_cg_inverse_of_damped_ggn(case: Case):
    G, G_dense = _damped_ggn(case)
    G_inv = CGInverseLinearOperator(G, tol=1e-12)
    B = randn(G.shape[0], 3, dtype=float64)
    assert_close(G_inv @ B, linalg.solve(G_dense, B), rtol=1e-7, atol=1e-9)
    x = G_inv.to_scipy() @ B[:, 0].numpy()
    assert_close(x, linalg.solve(G_dense, B[:, 0]), rtol=1e-7, atol=1e-9)


def test_cg_matches_scipy_iterates():
    """After a fixed number of iterations, every column is SciPy's CG iterate."""
    A, B = _spd_matrix(20), randn(20, 3, dtype=float64)
    A_inv = CGInverseLinearOperator(A, maxiter=4)
    with pytest.warns(RuntimeWarning, match="3 of 3 columns did not converge"):
        X = A_inv @ B
    for x, b in zip(X.T, B.T):
        expected, _ = cg(A.numpy(), b.numpy(), rtol=1e-5, maxiter=4)
        assert_close(x, expected, rtol=1e-10, atol=1e-12)


def test_cg_stops_converged_columns():
    """A column that converges early keeps its solution while others iterate."""
    A = _spd_matrix(10)
    B = randn(10, 2, dtype=float64)
    x_exact = linalg.solve(A, B[:, 0])
    num_iterations = []
    A_inv = CGInverseLinearOperator(
        A, x0=x_exact, tol=1e-10, callback=lambda X: num_iterations.append(X.shape)
    )
    X = A_inv @ B
    assert_close(X[:, 0], x_exact)
    assert_close(X[:, 1], linalg.solve(A, B[:, 1]), rtol=1e-8)
    assert num_iterations and all(shape == (10, 2) for shape in num_iterations)


def test_cg_hyperparameters():
    A, b = _spd_matrix(), rand(8, dtype=float64)
    iterates = []
    A_inv = CGInverseLinearOperator(A, callback=iterates.append)
    # initial guess that solves the system: no iteration
    x0 = linalg.solve(A, b).numpy()
    A_inv.set_cg_hyperparameters(x0=x0, callback=iterates.append)
    A_inv @ b
    assert not iterates
    # the exact inverse as preconditioner: one iteration
    A_inv.set_cg_hyperparameters(M=linalg.inv(A).numpy(), callback=iterates.append)
    assert_close(A_inv @ b, linalg.solve(A, b))
    assert len(iterates) == 1
    # a loose absolute tolerance: no iteration
    A_inv.set_cg_hyperparameters(atol=1e3, tol=0.0)
    assert_close(A_inv @ b, zeros(8, dtype=float64))


def test_cg_returns_numpy_for_numpy_inputs():
    A = _spd_matrix()
    b = rand(8, dtype=float64).numpy()
    x = CGInverseLinearOperator(A.numpy(), tol=1e-12) @ b
    assert isinstance(x, numpy.ndarray)
    assert_close(x, numpy.linalg.solve(A.numpy(), b))


def test_cg_rejects_bad_input():
    A = _spd_matrix()
    with pytest.raises(ValueError, match="square"):
        CGInverseLinearOperator(A[:, :5])
    with pytest.raises(ValueError, match="Tolerances"):
        CGInverseLinearOperator(A, tol=-1.0)
    with pytest.raises(ValueError, match="maxiter"):
        CGInverseLinearOperator(A, maxiter=0)
    with pytest.raises(ValueError, match="x0"):
        CGInverseLinearOperator(A, x0=zeros(5, dtype=float64)) @ rand(8, dtype=float64)
    with pytest.raises(TypeError, match="unexpected keyword"):
        CGInverseLinearOperator(A, rtol=1e-3)
    A_inv, b = CGInverseLinearOperator(A, tol=1e-12), rand(8, dtype=float64)
    with pytest.raises(ValueError, match="square"):  # changes no setting
        A_inv.set_cg_hyperparameters(tol=1.0, maxiter=1, M=A[:, :5])
    assert_close(A_inv @ b, linalg.solve(A, b))


# LSMR


@pytest.mark.parametrize("shape", [(8, 8), (10, 6), (6, 10)], ids=str)
@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_lsmr_pseudo_inverse_of_every_operator_kind(kind, shape):
    manual_seed(0)
    A = randn(*shape, dtype=float64)
    A_pinv = LSMRInverseLinearOperator(
        make_operator(A, kind), atol=1e-14, btol=1e-14, maxiter=100
    )
    compare_matmat(A_pinv, linalg.pinv(A), rtol=1e-6, atol=1e-8)


def test_lsmr_damped_least_squares():
    manual_seed(0)
    A, B = randn(10, 6, dtype=float64), randn(10, 2, dtype=float64)
    A_inv = LSMRInverseLinearOperator(A, damp=0.5, atol=1e-14, btol=1e-14)
    expected = linalg.solve(A.T @ A + 0.25 * eye(6, dtype=float64), A.T @ B)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A_inv.set_lsmr_hyperparameters(damp=0.5, atol=1e-14, btol=1e-14, maxiter=50)
        assert_close(A_inv @ B, expected, rtol=1e-8)


@pytest.mark.parametrize(
    "hyperparameters",
    [{}, {"damp": 0.3}, {"maxiter": 3}, {"atol": 1e-3, "btol": 1e-3}],
    ids=["default", "damp", "maxiter", "loose"],
)
def test_lsmr_matches_scipy(hyperparameters):
    """Same stopping rules and (up to round-off) the same iterates as SciPy."""
    manual_seed(1)
    A, B = randn(12, 7, dtype=float64) + eye(12, 7), randn(12, 3, dtype=float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        X = LSMRInverseLinearOperator(A, **hyperparameters) @ B
    for x, b in zip(X.T, B.T):
        expected = lsmr(A.numpy(), b.numpy(), **hyperparameters)[0]
        assert_close(x, expected, rtol=1e-9, atol=1e-11)


def test_lsmr_pseudo_inverse_of_singular_ggn():
    """LSMR applies the GGN's pseudo-inverse, although the GGN is singular."""
    model, loss_func, params, data = Case("mlp", "mse").make()
    G = GGNLinearOperator(model, loss_func, params, data)
    G_dense = functorch_ggn(model, loss_func, params, data)
    b = randn(G.shape[0], dtype=float64)
    G_pinv = LSMRInverseLinearOperator(G, atol=1e-10, btol=1e-10, maxiter=500)
    expected = linalg.pinv(G_dense, hermitian=True, rtol=1e-10) @ b
    assert_close(G_pinv @ b, expected, rtol=1e-5, atol=1e-7)


def test_lsmr_warns_if_unconverged_and_rejects_bad_input():
    A = _spd_matrix()
    with pytest.warns(RuntimeWarning, match="did not converge in 1 iterations"):
        LSMRInverseLinearOperator(A, maxiter=1) @ rand(8, dtype=float64)
    with pytest.raises(ValueError, match="non-negative"):
        LSMRInverseLinearOperator(A, damp=-1.0)
    with pytest.raises(ValueError, match="maxiter"):
        LSMRInverseLinearOperator(A, maxiter=0)


# Neumann


def _truncated_neumann_series(A, num_terms: int, scale: float):
    identity = eye(A.shape[0], dtype=A.dtype)
    term, result = identity, identity.clone()
    for _ in range(num_terms):
        term = term @ (identity - scale * A)
        result = result + term
    return scale * result


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_neumann_is_truncated_series(kind):
    manual_seed(0)
    A = eye(6, dtype=float64) + 0.1 * randn(6, 6, dtype=float64)  # not symmetric
    A_inv = NeumannInverseLinearOperator(make_operator(A, kind), num_terms=5, scale=0.7)
    compare_matmat(A_inv, _truncated_neumann_series(A, 5, 0.7))


def test_neumann_converges_to_inverse():
    A = _spd_matrix()
    scale = 1.0 / linalg.eigvalsh(A).max().item()
    A_inv = NeumannInverseLinearOperator(A, num_terms=400, scale=scale)
    compare_matmat(A_inv, linalg.inv(A), rtol=1e-6, atol=1e-8)
    A_inv.set_neumann_hyperparameters(num_terms=0, scale=scale)
    compare_matmat(A_inv, scale * eye(8, dtype=float64))


def test_neumann_inverse_of_damped_ggn():
    G, G_dense = _damped_ggn(GGN_CASES[0])
    scale = 1.0 / linalg.eigvalsh(G_dense).max().item()
    G_inv = NeumannInverseLinearOperator(G, num_terms=60, scale=scale)
    b = randn(G.shape[0], dtype=float64)
    expected = linalg.solve(G_dense, b)
    # the error decays as (1 - scale * lambda_min)^61 < 1e-2
    assert (G_inv @ b - expected).norm() < 0.02 * expected.norm()


def test_neumann_divergence_raises_a_clear_error():
    A = _spd_matrix()
    scale = 3.0 / linalg.eigvalsh(A).max().item()  # lambda_max * scale > 2
    A_inv = NeumannInverseLinearOperator(A, num_terms=2000, scale=scale)
    with pytest.raises(RuntimeError, match="diverged.*decrease `scale`"):
        A_inv @ rand(8, dtype=float64)
    A_inv.set_neumann_hyperparameters(num_terms=2000, scale=scale, check_nan=False)
    with pytest.warns(UserWarning, match="diverges"):
        assert not (A_inv @ rand(8, dtype=float64)).isfinite().all()
    # few terms: still finite, but growing
    A_inv.set_neumann_hyperparameters(num_terms=20, scale=scale)
    with pytest.warns(UserWarning, match="diverges.*decrease `scale`"):
        assert (A_inv @ rand(8, dtype=float64)).isfinite().all()


def test_neumann_rejects_bad_input():
    A = _spd_matrix()
    with pytest.raises(ValueError, match="square"):
        NeumannInverseLinearOperator(A[:, :5])
    with pytest.raises(ValueError, match="num_terms"):
        NeumannInverseLinearOperator(A, num_terms=-1)
    with pytest.raises(ValueError, match="scale"):
        NeumannInverseLinearOperator(A, scale=0.0)


def test_inverses_of_tensor_list_operators_keep_the_format():
    """Products in tensor-list format; the inverse maps the range to the domain."""
    G, G_dense = _damped_ggn(GGN_CASES[0])
    B = randn(G.shape[0], 2, dtype=float64)
    expected = linalg.solve(G_dense, B)
    shapes = G._in_shape
    blocks = B.split([s.numel() for s in shapes])
    B_list = [b.reshape(*s, 2) for b, s in zip(blocks, shapes)]
    X_list = CGInverseLinearOperator(G, tol=1e-12) @ B_list
    assert [x.shape[:-1] for x in X_list] == shapes
    assert_close(
        [x.reshape(-1, 2) for x in X_list],
        list(expected.split([s.numel() for s in shapes])),
        rtol=1e-7,
        atol=1e-9,
    )
