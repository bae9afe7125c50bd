"""Tests for curvlinops.vivit._factors: the structured Linear weight factor."""

import pytest
from torch import Generator, float64, randn

from curvlinops.vivit._factors import DenseFactor, LinearWeightFactor
from test.utils import assert_close


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_weight_factor_matches_dense(seed: int):
    """Gram matrix, combinations and projections equal those of the dense rows."""
    generator = Generator().manual_seed(seed)
    V, N, d_out, d_in, K = 3, 4, 5, 2, 6

    def draw(*shape):
        return randn(*shape, generator=generator, dtype=float64)

    structured = LinearWeightFactor(draw(V, N, d_out), draw(N, d_in))
    dense = DenseFactor(structured.to_tensor())
    assert dense.to_tensor().shape == (V, N, d_out, d_in)
    assert structured.num_columns == dense.num_columns == V

    assert_close(structured.gram(), dense.gram())
    coefficients = draw(V * N, K)
    assert_close(structured.combine(coefficients), dense.combine(coefficients))
    vectors = draw(K, d_out, d_in)
    assert_close(structured.project(vectors), dense.project(vectors))
