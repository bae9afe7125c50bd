"""Tests for curvlinops.inverse: CG, LSMR and Neumann inverses."""

import warnings

import numpy
import pytest
from scipy.sparse.linalg import cg, lsmr
from torch import (
    Tensor,
    eye,
    float64,
    linalg,
    logspace,
    manual_seed,
    rand,
    randn,
    stack,
    zeros,
)

from curvlinops import (
    CGInverseLinearOperator,
    DiagonalLinearOperator,
    GGNLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    LSMRInverseLinearOperator,
    NeumannInverseLinearOperator,
)
from curvlinops.examples import IdentityLinearOperator, TensorLinearOperator
from curvlinops.examples.functorch import functorch_ggn
from test.cases import Case
from test.operator_kinds import OPERATOR_KINDS, CountingOperator, make_operator
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


# CG with curvlinops 3.x's (GPyTorch-style) keywords, preconditioning


def _ill_conditioned(dim: int = 100):
    """SPD ``D^1/2 C D^1/2`` (condition ~1e4) and the preconditioner ``D^-1``.

    ``C`` has eigenvalues in [1, 2], ``D`` is diagonal from 1 to 1e4, so that
    ``D^-1 A`` is similar to ``C`` and well conditioned.
    """
    manual_seed(0)
    Q, _ = linalg.qr(randn(dim, dim, dtype=float64))
    C = Q @ (1 + rand(dim, dtype=float64)).diag() @ Q.T
    d = logspace(0, 4, dim, dtype=float64)
    return d.sqrt()[:, None] * C * d.sqrt(), (1 / d).diag()


def _iterations(A, B, **cg_hyperparameters) -> tuple[int, Tensor]:
    """Number of CG iterations (products per column) and the solution."""
    counted = CountingOperator(TensorLinearOperator(A))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        # no symmetry probe: only CG's products are counted
        X = (
            CGInverseLinearOperator(
                counted, check_symmetric=False, **cg_hyperparameters
            )
            @ B
        )
    return counted.num_columns // B.shape[1], X


@pytest.mark.parametrize("style", ["scipy", "3.x"])
@pytest.mark.parametrize("kind", ["operator", "matrix", "callable"])
def test_preconditioned_cg_needs_fewer_iterations(style: str, kind: str):
    A, P = _ill_conditioned()
    B = randn(A.shape[0], 3, dtype=float64)
    preconditioner = {
        "operator": TensorLinearOperator(P),
        "matrix": P,
        "callable": lambda R: P @ R,
    }[kind]
    if style == "scipy":
        plain, preconditioned = {"tol": 1e-10}, {"tol": 1e-10, "M": preconditioner}
    else:
        plain = {"tolerance": 1e-10, "max_iter": 1000, "eps": 1e-30}
        preconditioned = {**plain, "preconditioner": preconditioner}
    num_plain, X_plain = _iterations(A, B, **plain)
    num_preconditioned, X = _iterations(A, B, **preconditioned)
    expected = linalg.solve(A, B)
    assert_close(X, expected, rtol=1e-7, atol=1e-9)
    assert_close(X_plain, expected, rtol=1e-7, atol=1e-9)
    assert num_preconditioned < 30 < 150 < num_plain


def test_cg_preconditioned_by_kfac_inverse_solves_damped_ggn():
    """A KFAC inverse (tensor-list operator) preconditions CG on the GGN."""
    case = GGN_CASES[0]
    G, G_dense = _damped_ggn(case)
    model, loss_func, params, data = case.make()
    kfac = KFACLinearOperator(model, loss_func, params, data, fisher_type="type-2")
    P = KFACInverseLinearOperator(kfac, damping=DAMPING)
    B = randn(G.shape[0], 2, dtype=float64)
    expected = linalg.solve(G_dense, B)
    for hyperparameters in (
        {"tolerance": 1e-10, "eps": 1e-30, "preconditioner": P},
        {"tol": 1e-10, "M": P},
    ):
        X = CGInverseLinearOperator(G, **hyperparameters) @ B
        assert_close(X, expected, rtol=1e-7, atol=1e-9)


def test_cg_3x_keywords_follow_gpytorch_stopping_rules():
    """At least 11 iterations; then stop at mean relative residual < tolerance."""
    B = randn(40, 2, dtype=float64)
    num_default, _ = _iterations(_spd_matrix(40), B, max_iter=1000)
    assert num_default == 11  # GPyTorch's default tolerance 1 is met at once
    A, _ = _ill_conditioned()
    B = randn(A.shape[0], 2, dtype=float64)
    num, X = _iterations(A, B, tolerance=1e-3, max_iter=1000)
    residual = (A @ X - B).norm(dim=0) / B.norm(dim=0)
    assert residual.mean() < 1e-3
    num_before, X_before = _iterations(A, B, tolerance=1e-3, max_iter=num - 1)
    residual = (A @ X_before - B).norm(dim=0) / B.norm(dim=0)
    assert num_before == num - 1 and residual.mean() >= 1e-3
    with pytest.warns(RuntimeWarning, match="mean relative residual"):
        CGInverseLinearOperator(A, tolerance=1e-3, max_iter=num - 1) @ B


def test_cg_3x_keywords_initial_guess_and_frozen_columns():
    """A column whose initial guess solves it stays frozen (stop_updating_after)."""
    A, _ = _ill_conditioned(30)
    B = randn(30, 2, dtype=float64)
    B[:, 1] = 0.0  # a zero right-hand side gives zero
    x_exact = linalg.solve(A, B[:, 0])
    X0 = stack([x_exact, zeros(30, dtype=float64)], dim=1)
    A_inv = CGInverseLinearOperator(A, initial_guess=X0, tolerance=1e-12, eps=0.0)
    X = A_inv @ B
    assert_close(X[:, 0], x_exact, rtol=1e-12, atol=1e-14)
    assert (X[:, 1] == 0).all()


def test_cg_3x_tridiagonal_matrices_have_the_eigenvalues():
    """n_tridiag keeps the Lanczos matrices of CG's implicit Lanczos process.

    With max_tridiag_iter = N, their eigenvalues are those of A.
    """
    A = _spd_matrix(8)
    B = randn(8, 3, dtype=float64)
    A_inv = CGInverseLinearOperator(
        A, n_tridiag=2, max_tridiag_iter=8, tolerance=1e-14, eps=1e-30
    )
    assert A_inv.tridiag_matrices is None
    A_inv @ B
    assert A_inv.tridiag_matrices.shape == (2, 8, 8)
    for T in A_inv.tridiag_matrices:
        assert_close(linalg.eigvalsh(T), linalg.eigvalsh(A), rtol=1e-8, atol=1e-10)
    A_inv = CGInverseLinearOperator(A, n_tridiag=1, max_tridiag_iter=3)
    A_inv @ B
    assert A_inv.tridiag_matrices.shape == (1, 3, 3)


def test_cg_rejects_mixed_hyperparameter_styles():
    A = _spd_matrix()
    with pytest.raises(ValueError, match="Do not mix SciPy-style CG keywords"):
        CGInverseLinearOperator(A, tol=1e-3, max_iter=10)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['rtol'\\]"):
        CGInverseLinearOperator(A, rtol=1e-3)
    with pytest.raises(ValueError, match="max_iter"):
        CGInverseLinearOperator(A, max_iter=0)
    with pytest.raises(ValueError, match="non-negative"):
        CGInverseLinearOperator(A, tolerance=-1.0)
    with pytest.raises(ValueError, match="shape"):
        CGInverseLinearOperator(A, preconditioner=eye(3, dtype=float64))
    with pytest.raises(TypeError, match="Expected a PyTorchLinearOperator"):
        CGInverseLinearOperator(A, M="not an operator")


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


def test_lsmr_initial_guess_and_show(capsys):
    """x0 as in SciPy: LSMR solves for the correction; show prints the progress."""
    manual_seed(2)
    A, B = randn(12, 7, dtype=float64) + eye(12, 7), randn(12, 2, dtype=float64)
    x0 = randn(7, dtype=float64)
    with pytest.warns(RuntimeWarning, match="did not converge in 3 iterations"):
        X = LSMRInverseLinearOperator(A, x0=x0, maxiter=3) @ B
    for x, b in zip(X.T, B.T):
        expected = lsmr(A.numpy(), b.numpy(), x0=x0.numpy(), maxiter=3)[0]
        assert_close(x, expected, rtol=1e-9, atol=1e-11)
    exact = linalg.lstsq(A, B).solution
    A_inv = LSMRInverseLinearOperator(A, x0=exact, show=True)
    assert_close(A_inv @ B, exact, rtol=1e-10, atol=1e-12)
    assert "LSMR: 2 of 2 columns met a stopping rule." in capsys.readouterr().out
    A_inv.set_lsmr_hyperparameters(atol=1e-12, btol=1e-12, show=True)
    A_inv @ B
    assert "LSMR iteration 1: 2 columns running" in capsys.readouterr().out


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


def _preconditioned_neumann_series(A, P, num_terms: int, scale: float):
    """``scale * sum_k (I - scale P A)^k P``, densely."""
    return _truncated_neumann_series(P @ A, num_terms, scale) @ P


@pytest.mark.parametrize("kind", ["operator", "torch", "numpy", "diagonal", "callable"])
def test_preconditioned_neumann_is_truncated_series(kind):
    """Any kind of preconditioner; the adjoint is preconditioned with P^T."""
    manual_seed(0)
    A = eye(6, dtype=float64) + 0.1 * randn(6, 6, dtype=float64)  # not symmetric
    P = eye(6, dtype=float64) + 0.1 * randn(6, 6, dtype=float64)
    if kind in {"diagonal", "callable"}:  # symmetric (a function is taken to be)
        A, P = A @ A.T, (1 + rand(6, dtype=float64)).diag()
    preconditioner = {
        "operator": TensorLinearOperator(P),
        "torch": P,
        "numpy": P.numpy(),
        "diagonal": DiagonalLinearOperator(P.diag()),
        "callable": lambda X: P @ X,
    }[kind]
    A_inv = NeumannInverseLinearOperator(
        A, num_terms=5, scale=0.7, preconditioner=preconditioner
    )
    compare_matmat(A_inv, _preconditioned_neumann_series(A, P, 5, 0.7))


def test_preconditioned_neumann_converges_where_plain_neumann_cannot():
    """Condition number 1e4; the preconditioned operator's eigenvalues in [1, 2]."""
    A, P = _ill_conditioned()
    B = randn(A.shape[0], 2, dtype=float64)
    expected = linalg.solve(A, B)
    eigenvalues = linalg.eigvalsh(A)
    best = 2 / (eigenvalues.min() + eigenvalues.max()).item()
    plain = NeumannInverseLinearOperator(A, num_terms=40, scale=best)
    preconditioned = NeumannInverseLinearOperator(
        A, num_terms=40, scale=2 / 3, preconditioner=DiagonalLinearOperator(P.diag())
    )
    error = (preconditioned @ B - expected).norm() / expected.norm()
    assert error < 1e-12  # contraction (1/3)^41
    assert (plain @ B - expected).norm() / expected.norm() > 0.5
    exact = NeumannInverseLinearOperator(A, 0, preconditioner=linalg.inv(A))
    assert_close(exact @ B, expected)


def test_neumann_preconditioned_by_kfac_inverse_on_damped_ggn():
    """A KFAC inverse makes the series on the damped GGN converge faster."""
    case = GGN_CASES[0]
    G, G_dense = _damped_ggn(case)
    model, loss_func, params, data = case.make()
    kfac = KFACLinearOperator(model, loss_func, params, data, fisher_type="type-2")
    P = KFACInverseLinearOperator(kfac, damping=DAMPING, use_exact_damping=True)
    P_dense = P @ eye(P.shape[0], dtype=float64)
    b = randn(G.shape[0], dtype=float64)
    expected = linalg.solve(G_dense, b)

    def error(preconditioner, matrix, num_terms: int = 20) -> float:
        eigenvalues = linalg.eigvals(matrix).real
        scale = 2 / (eigenvalues.min() + eigenvalues.max()).item()  # optimal
        G_inv = NeumannInverseLinearOperator(G, num_terms, scale, True, preconditioner)
        return ((G_inv @ b - expected).norm() / expected.norm()).item()

    plain, with_kfac = error(None, G_dense), error(P, P_dense @ G_dense)
    assert with_kfac < 0.25 * plain  # measured: 0.0085 versus 0.040


def test_neumann_rejects_bad_preconditioners():
    """Also: self-adjoint only if operator and preconditioner are."""
    D = DiagonalLinearOperator(1 + rand(4, dtype=float64))
    assert NeumannInverseLinearOperator(D, preconditioner=D).SELF_ADJOINT
    not_symmetric = TensorLinearOperator(eye(4, dtype=float64))
    assert not NeumannInverseLinearOperator(
        D, preconditioner=not_symmetric
    ).SELF_ADJOINT
    A = _spd_matrix()
    with pytest.raises(ValueError, match=r"preconditioner has shape \(5, 5\)"):
        NeumannInverseLinearOperator(A, preconditioner=eye(5, dtype=float64))
    with pytest.raises(TypeError, match="Expected a PyTorchLinearOperator"):
        NeumannInverseLinearOperator(A, preconditioner="jacobi")


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
