"""Tests for the example operators in curvlinops.examples."""

import pytest
from torch import float32, float64, manual_seed, rand, randn

from curvlinops.examples import OuterProductLinearOperator
from test.utils import compare_matmat


def test_outer_product_operator_is_the_weighted_sum_of_outer_products():
    manual_seed(0)
    c, A = randn(3, dtype=float64), rand(7, 3, dtype=float64)  # indefinite weights
    dense = sum(c[i] * A[:, i].outer(A[:, i]) for i in range(3))
    B = OuterProductLinearOperator(c, A)
    compare_matmat(B, dense)
    assert B.adjoint() is B and B.SELF_ADJOINT


def test_outer_product_operator_rejects_mismatches():
    with pytest.raises(ValueError, match=r"c of shape \[K\] and A of shape \[D, K\]"):
        OuterProductLinearOperator(rand(2, dtype=float64), rand(5, 3, dtype=float64))
    with pytest.raises(ValueError, match="device and dtype"):
        OuterProductLinearOperator(rand(3, dtype=float32), rand(5, 3, dtype=float64))
