"""Tests for curvlinops._adapter: any operator as a PyTorch operator."""

import numpy
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.linalg import aslinearoperator
from torch import Tensor, float32, float64, manual_seed, randn

from curvlinops._adapter import AdaptedOperator, adapt, adapt_square
from curvlinops.examples import TensorLinearOperator
from test.operator_kinds import NUMPY_KINDS, OPERATOR_KINDS, make_operator
from test.utils import compare_matmat


def _random_matrix(rows: int = 5, cols: int = 4):
    manual_seed(0)
    return randn(rows, cols, dtype=float64)


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_adapt_every_operator_kind(kind):
    A = _random_matrix()
    adapted = adapt(make_operator(A, kind))
    assert adapted.numpy_world == (kind in NUMPY_KINDS)
    assert adapted.shape == (5, 4)
    compare_matmat(adapted.operator, A)
    assert adapt(adapted) is adapted


def test_adapt_scipy_sparse_matrix_and_dtypes():
    A = _random_matrix()
    adapted = adapt(csr_matrix(A.numpy()))
    assert adapted.numpy_world and adapted.operator.dtype == float64
    compare_matmat(adapted.operator, A)
    # float32 stays float32; integers become float64
    assert adapt(A.numpy().astype(numpy.float32)).operator.dtype == float32
    assert adapt(numpy.eye(3, dtype=int)).operator.dtype == float64
    scipy_float32 = aslinearoperator(A.numpy().astype(numpy.float32))
    assert adapt(scipy_float32).operator.dtype == float32
    # explicit device and dtype
    assert adapt(A.numpy(), "cpu", float32).operator.dtype == float32
    assert adapt(scipy_float32, dtype=float64).operator.dtype == float64


def test_results_in_the_callers_world():
    A = _random_matrix()
    x = randn(3, dtype=float64)
    numpy_world = adapt(A.numpy())
    assert isinstance(numpy_world.to_caller(x), numpy.ndarray)
    assert isinstance(numpy_world.scalar_to_caller(x.sum()), float)
    torch_world = adapt(TensorLinearOperator(A))
    assert isinstance(torch_world.to_caller(x), Tensor)
    assert isinstance(torch_world.scalar_to_caller(x.sum()), Tensor)


def test_random_columns_in_both_worlds():
    A = _random_matrix()
    numpy.random.seed(0)
    columns = adapt(A.numpy()).random_columns(3, "rademacher")
    numpy.random.seed(0)
    expected = numpy.where(numpy.random.rand(3, 4) < 0.5, -1.0, 1.0).T
    assert numpy.array_equal(columns.numpy(), expected)
    columns = adapt(A).random_columns(2, "normal", dim=7)
    assert columns.shape == (7, 2) and columns.dtype == float64


def test_adapt_rejects_bad_input():
    with pytest.raises(TypeError, match="Expected a PyTorchLinearOperator"):
        adapt([[1.0, 2.0]])
    with pytest.raises(ValueError, match="Expected a matrix"):
        adapt(randn(2, 3, 4))
    with pytest.raises(ValueError, match="square"):
        adapt_square(_random_matrix())
    assert isinstance(adapt_square(numpy.eye(2)), AdaptedOperator)
