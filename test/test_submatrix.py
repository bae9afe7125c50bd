"""Tests for curvlinops.submatrix."""

import pytest
from numpy import array, int64
from torch import float64, manual_seed, randn, tensor

from curvlinops import GGNLinearOperator, SubmatrixLinearOperator
from curvlinops.examples.functorch import functorch_ggn
from test.cases import Case
from test.operator_kinds import OPERATOR_KINDS, make_operator
from test.utils import compare_matmat

ROWS, COLS = [5, 0, 3], [1, 6, 2, 4]


def _random_matrix(rows: int = 7, cols: int = 8):
    manual_seed(0)
    return randn(rows, cols, dtype=float64)


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_submatrix_of_every_operator_kind(kind):
    A = _random_matrix()
    A_sub = SubmatrixLinearOperator(make_operator(A, kind), ROWS, COLS)
    compare_matmat(A_sub, A[ROWS][:, COLS])


def test_set_submatrix_changes_shape_and_selection():
    A = _random_matrix()
    A_sub = SubmatrixLinearOperator(A, ROWS, COLS)
    A_sub.set_submatrix(COLS, ROWS)
    assert A_sub.shape == (len(COLS), len(ROWS))
    compare_matmat(A_sub, A[COLS][:, ROWS])
    with pytest.raises(ValueError, match="col_idxs"):  # valid rows, invalid columns
        A_sub.set_submatrix(ROWS, [-1])
    compare_matmat(A_sub, A[COLS][:, ROWS])  # unchanged


def test_numpy_integer_indices():
    A = _random_matrix()
    rows, cols = [int64(i) for i in ROWS], [int64(i) for i in COLS]
    compare_matmat(SubmatrixLinearOperator(A, rows, cols), A[ROWS][:, COLS])


def test_index_arrays():
    """Integer tensors and NumPy arrays work as indices (e.g. from ``topk``)."""
    A = _random_matrix()
    rows, cols = tensor(ROWS), array(COLS)
    compare_matmat(SubmatrixLinearOperator(A, rows, cols), A[ROWS][:, COLS])
    with pytest.raises(ValueError, match="integers"):
        SubmatrixLinearOperator(A, tensor(ROWS, dtype=float64), cols)


def test_submatrix_of_ggn():
    """A block of the GGN, e.g. the rows and columns of one layer, matrix-free."""
    model, loss_func, params, data = Case("mlp", "ce").make()
    G = GGNLinearOperator(model, loss_func, params, data, check_deterministic=False)
    G_dense = functorch_ggn(model, loss_func, params, data)
    rows, cols = list(range(20, 24)), [0, 7, 30, 38, 24]
    compare_matmat(SubmatrixLinearOperator(G, rows, cols), G_dense[rows][:, cols])


@pytest.mark.parametrize(
    "row_idxs, col_idxs, match",
    [
        ([0, 0], [1], "duplicates"),
        ([0], [1, 2, 1], "duplicates"),
        ([0.0], [1], "integers"),
        ([0], [True], "integers"),
        ([7], [1], r"\[0, 7\)"),
        ([0], [-1], r"\[0, 8\)"),
        ([], [1], "empty"),
    ],
)
def test_submatrix_rejects_invalid_indices(row_idxs, col_idxs, match):
    A = _random_matrix()
    with pytest.raises(ValueError, match=match):
        SubmatrixLinearOperator(A, row_idxs, col_idxs)
    A_sub = SubmatrixLinearOperator(A, ROWS, COLS)
    with pytest.raises(ValueError, match=match):
        A_sub.set_submatrix(row_idxs, col_idxs)
