"""Tests for curvlinops.norm.hutchinson."""

import pytest
from torch import float64, manual_seed, randn

from curvlinops import GGNLinearOperator, hutchinson_squared_fro
from curvlinops.examples.functorch import functorch_ggn
from test.cases import Case
from test.operator_kinds import (
    OPERATOR_KINDS,
    ColumnDrawer,
    CountingOperator,
    assert_unbiased,
    assert_world,
    make_operator,
    rms_error,
    seeded_call,
)
from test.utils import assert_close

DISTRIBUTIONS = ["rademacher", "normal"]


def _random_matrix(rows: int = 7, cols: int = 5):
    manual_seed(0)
    return randn(rows, cols, dtype=float64)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_hutchinson_squared_fro_is_mean_of_squared_norms(kind, distribution):
    A = _random_matrix()  # not square
    op = make_operator(A, kind)
    estimate = seeded_call(kind, 3, hutchinson_squared_fro, op, 4, distribution)
    assert_world(estimate, kind, scalar=True)
    V = ColumnDrawer(kind, 3).draw(4, A.shape[1], distribution)
    assert_close(estimate, (A @ V).square().sum() / 4)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_hutchinson_squared_fro_unbiased(distribution):
    A = _random_matrix()
    truth = A.square().sum()
    assert_unbiased(
        lambda g: hutchinson_squared_fro(A, 1, distribution, generator=g), truth, 2000
    )


def test_hutchinson_squared_fro_converges():
    A = _random_matrix(30, 20)
    truth = A.square().sum()
    errors = [
        rms_error(lambda g, k=k: hutchinson_squared_fro(A, k, generator=g), truth)
        for k in (4, 40, 400)
    ]
    assert errors[0] > 2 * errors[1] and errors[1] > 2 * errors[2]


def test_hutchinson_squared_fro_on_ggn_is_matrix_free():
    model, loss_func, params, data = Case("sequence", "bce").make()
    G = GGNLinearOperator(model, loss_func, params, data, check_deterministic=False)
    G = CountingOperator(G)
    truth = functorch_ggn(model, loss_func, params, data).square().sum()
    estimate = hutchinson_squared_fro(G, 500)
    assert G.num_columns == 500
    assert abs(estimate - truth) < 0.1 * truth


def test_hutchinson_squared_fro_rejects_bad_input():
    A = _random_matrix()
    with pytest.raises(ValueError, match="distribution"):
        hutchinson_squared_fro(A, 3, distribution="uniform")
    with pytest.raises(ValueError, match="num_matvecs"):
        hutchinson_squared_fro(A, -1)
