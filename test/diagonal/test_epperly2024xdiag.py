"""Tests for curvlinops.diagonal.epperly2024xdiag."""

import pytest
from torch import cat, eye, float64, manual_seed, randn, stack
from torch.linalg import qr

from curvlinops import GGNLinearOperator, hutchinson_diag, xdiag
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


def _xdiag_reference(A, Omega):
    """Average of leave-one-out estimates, with one QR per column."""
    Y, identity = A @ Omega, eye(A.shape[0], dtype=A.dtype)
    estimates = []
    for i in range(Omega.shape[1]):
        Q, _ = qr(cat([Y[:, :i], Y[:, i + 1 :]], dim=1))
        P = Q @ Q.T
        residual = (identity - P) @ A @ Omega[:, i]
        estimates.append((P @ A).diag() + Omega[:, i] * residual)
    return stack(estimates).mean(0)


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_xdiag_matches_leave_one_out_reference(kind):
    A = _random_matrix()
    estimate = seeded_call(kind, 1, xdiag, make_operator(A, kind), 8)
    assert_world(estimate, kind)
    Omega = ColumnDrawer(kind, 1).draw(4, A.shape[0], "rademacher")
    assert_close(estimate, _xdiag_reference(A, Omega))


def test_xdiag_unbiased():
    A = _random_matrix(6)
    assert_unbiased(lambda g: xdiag(A, 4, generator=g), A.diag(), 1000)


def test_xdiag_converges_and_beats_hutchinson():
    A = decaying_matrix(100, 0.8)
    truth = A.diag()
    errors = [
        rms_error(lambda g, k=k: xdiag(A, k, generator=g), truth) for k in (6, 30, 60)
    ]
    assert errors[0] > 2 * errors[1] and errors[1] > 2 * errors[2]
    hutchinson = rms_error(lambda g: hutchinson_diag(A, 30, generator=g), truth)
    assert errors[1] < hutchinson / 2


def test_xdiag_on_ggn_is_matrix_free():
    model, loss_func, params, data = Case("mlp", "mse").make()
    G = GGNLinearOperator(model, loss_func, params, data, check_deterministic=False)
    G = CountingOperator(G)
    G_dense = functorch_ggn(model, loss_func, params, data)
    # the GGN's rank (15) is below num_matvecs / 2, so the estimate is exact
    assert_close(xdiag(G, 40), G_dense.diag(), rtol=1e-6, atol=1e-8)
    assert G.num_columns == 40


def test_xdiag_uses_num_matvecs_products():
    A = CountingOperator(TensorLinearOperator(_random_matrix()))
    xdiag(A, 6)
    assert A.num_columns == 6


def test_xdiag_rejects_bad_input():
    A = _random_matrix()
    for num_matvecs in (0, 3):
        with pytest.raises(ValueError, match="num_matvecs"):
            xdiag(A, num_matvecs)
    with pytest.raises(ValueError, match="At most 18"):
        xdiag(A, 20)
    with pytest.raises(ValueError, match="square"):
        xdiag(A[:, :3], 2)
