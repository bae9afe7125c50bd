"""Tests for curvlinops.trace.epperly2024xtrace."""

import pytest
from torch import cat, einsum, eye, float64, manual_seed, randn, stack
from torch.linalg import qr

from curvlinops import (
    GGNLinearOperator,
    hutchinson_trace,
    hutchpp_trace,
    xtrace,
)
from curvlinops.examples import TensorLinearOperator
from curvlinops.examples.functorch import functorch_ggn
from test.cases import Case
from test.operator_kinds import (
    OPERATOR_KINDS,
    ColumnDrawer,
    CountingOperator,
    assert_unbiased,
    assert_world,
    decaying_matrix,
    make_operator,
    rms_error,
    seeded_call,
)
from test.utils import assert_close


def _random_matrix(dim: int = 9):
    manual_seed(0)
    return randn(dim, dim, dtype=float64)  # not symmetric


def _xtrace_reference(A, Omega):
    """Average of the leave-one-out Hutch++ estimates, with one QR per column."""
    Y, identity = A @ Omega, eye(A.shape[0], dtype=A.dtype)
    estimates = []
    for i in range(Omega.shape[1]):
        Q, _ = qr(cat([Y[:, :i], Y[:, i + 1 :]], dim=1))
        residual = (identity - Q @ Q.T) @ Omega[:, i]
        estimates.append((Q.T @ A @ Q).trace() + residual @ A @ residual)
    return stack(estimates).mean()


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_xtrace_matches_leave_one_out_reference(kind, distribution):
    A = _random_matrix()
    estimate = seeded_call(kind, 1, xtrace, make_operator(A, kind), 8, distribution)
    assert_world(estimate, kind, scalar=True)
    Omega = ColumnDrawer(kind, 1).draw(4, A.shape[0], distribution)
    assert_close(estimate, _xtrace_reference(A, Omega))


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_xtrace_unbiased(distribution):
    A = _random_matrix(6)
    assert_unbiased(lambda g: xtrace(A, 4, distribution, generator=g), A.trace(), 1000)


def test_xtrace_converges_and_beats_hutchinson_and_hutchpp():
    A = decaying_matrix(100, 0.8)
    truth = A.trace()
    errors = [
        rms_error(lambda g, k=k: xtrace(A, k, generator=g), truth) for k in (6, 30, 60)
    ]
    assert errors[0] > 2 * errors[1] and errors[1] > 2 * errors[2]
    for baseline in (hutchinson_trace, hutchpp_trace):
        baseline_error = rms_error(lambda g, f=baseline: f(A, 30, generator=g), truth)
        assert errors[1] < baseline_error / 2


def test_xtrace_is_exact_for_low_rank_operators():
    """Rank r: every leave-one-out basis of more than r sketch columns is complete."""
    manual_seed(0)
    B = randn(40, 5, dtype=float64)
    A = B @ B.T
    for num_matvecs in (12, 40, 80):
        assert_close(xtrace(A, num_matvecs), A.trace())


def test_xtrace_on_ggn_is_matrix_free():
    model, loss_func, params, data = Case("mlp", "ce").make()
    G = GGNLinearOperator(model, loss_func, params, data, check_deterministic=False)
    G = CountingOperator(G)
    G_dense = functorch_ggn(model, loss_func, params, data)
    # the GGN's rank (15) is below num_matvecs / 2, so the estimate is exact
    assert_close(xtrace(G, 40), G_dense.trace(), rtol=1e-6)
    assert G.num_columns == 40


def test_xtrace_uses_num_matvecs_products():
    A = CountingOperator(TensorLinearOperator(_random_matrix()))
    xtrace(A, 6)
    assert A.num_columns == 6


def test_xtrace_rejects_bad_input():
    A = _random_matrix()
    for num_matvecs in (0, 3):
        with pytest.raises(ValueError, match="num_matvecs"):
            xtrace(A, num_matvecs)
    with pytest.raises(ValueError, match="At most 18"):
        xtrace(A, 20)
    with pytest.raises(ValueError, match="square"):
        xtrace(A[:, :3], 2)
    with pytest.raises(ValueError, match="distribution"):
        xtrace(A, 2, distribution="uniform")


def test_reference_is_the_definition():
    """Sanity check of the reference with an explicit, einsum-free formula."""
    A, Omega = _random_matrix(5), randn(5, 2, dtype=float64)
    Q0, _ = qr((A @ Omega)[:, 1:])
    P0 = Q0 @ Q0.T
    r0 = Omega[:, 0] - P0 @ Omega[:, 0]
    term0 = einsum("ij,ji->", P0, A) + r0 @ A @ r0
    Q1, _ = qr((A @ Omega)[:, :1])
    P1 = Q1 @ Q1.T
    r1 = Omega[:, 1] - P1 @ Omega[:, 1]
    term1 = einsum("ij,ji->", P1, A) + r1 @ A @ r1
    assert_close(_xtrace_reference(A, Omega), (term0 + term1) / 2)
