"""Tests for curvlinops._kfoc_rearrangement: products and power iteration."""

import pytest
from torch import Generator, einsum, eye, float64, kron, randn, zeros
from torch.linalg import matrix_norm

from curvlinops._kfoc_rearrangement import (
    RearrangedTerms,
    bias_block,
    power_iteration,
)
from test.kfac_references import optimal_kronecker
from test.utils import assert_close

K, N, P, D_OUT, D_IN = 2, 3, 4, 6, 5


def _rows(groups: int = 1, seed: int = 0):
    generator = Generator().manual_seed(seed)
    g = randn(K, N, P, D_OUT, generator=generator, dtype=float64)
    a_shape = (N, groups, P, D_IN) if groups > 1 else (N, P, D_IN)
    return randn(*a_shape, generator=generator, dtype=float64), g


def _gradients(a, g):
    """Per-datum gradients [K * N, D_out, D_in], group by group for grouped rows."""
    if a.ndim == 3:
        return einsum("knpo,npi->knoi", g, a).flatten(end_dim=1)
    grouped = g.unflatten(-1, (a.shape[1], -1))
    J = einsum("knpgc,ngpi->kngci", grouped, a)
    return J.flatten(2, 3).flatten(end_dim=1)


def _symmetric(dim: int, seed: int):
    X = randn(dim, dim, generator=Generator().manual_seed(seed), dtype=float64)
    return X @ X.T


@pytest.mark.parametrize("rows", [True, False, None], ids=["rows", "grads", "auto"])
@pytest.mark.parametrize("groups", [1, 2])
def test_products_are_sums_over_per_datum_gradients(rows, groups):
    a, g = _rows(groups)
    J = _gradients(a, g)
    terms = RearrangedTerms(a, g, rows=rows)
    if rows is not None:  # grouped convolutions always keep gradients
        assert terms.rows == (rows and groups == 1)
    X, Y = _symmetric(D_IN, 1), _symmetric(D_OUT, 2)
    assert_close(terms.matmat(X), einsum("moi,ij,mpj->op", J, X, J))
    assert_close(terms.matmat(None), einsum("moi,mpi->op", J, J))
    assert_close(terms.rmatmat(Y), einsum("moi,op,mpj->ij", J, Y, J))
    assert terms.nbytes == 8 * ((a.numel() + g.numel()) if terms.rows else J.numel())


def test_cheaper_representation_is_chosen():
    """One position: rows; many positions and small layers: gradients."""
    a, g = _rows()
    assert RearrangedTerms(a[:, :1], g[:, :, :1]).rows
    many = (a.repeat(1, 20, 1), g.repeat(1, 1, 20, 1))
    assert not RearrangedTerms(*many).rows


def test_bias_block_sums_outer_products_of_position_sums():
    _, g = _rows()
    summed = g.sum(2).flatten(end_dim=1)
    assert_close(bias_block(g), einsum("mo,mp->op", summed, summed))


def _explicit_products(J):
    def products(operands, adjoint):
        pattern = "moi,op,mpj->ij" if adjoint else "moi,ij,mpj->op"
        return {key: einsum(pattern, J, X, J) for key, X in operands.items()}

    return products


def test_power_iteration_finds_the_optimal_kronecker_product():
    a, g = _rows()
    J = _gradients(a, g)
    block = einsum("moi,mpj->oipj", J, J).reshape(D_OUT * D_IN, -1)
    products = _explicit_products(J)
    v0 = eye(D_IN, dtype=float64) / D_IN**0.5
    first = {"layer": (v0, products({"layer": v0}, False)["layer"])}
    factors, iterations = power_iteration(products, first, 1e-13, 500)
    S1, S2 = factors["layer"]
    assert_close(kron(S1, S2), optimal_kronecker(block, D_OUT, D_IN), atol=1e-10)
    assert_close(matrix_norm(S1), matrix_norm(S2))
    assert 1 < iterations < 500


def test_power_iteration_gives_zero_factors_for_zero_blocks():
    v0 = eye(D_IN, dtype=float64) / D_IN**0.5
    first = {"layer": (v0, zeros(D_OUT, D_OUT, dtype=float64))}
    factors, iterations = power_iteration(_explicit_products(None), first, 1e-8, 10)
    S1, S2 = factors["layer"]
    assert iterations == 0 and not S1.any() and not S2.any()
    assert S1.shape == (D_OUT, D_OUT) and S2.shape == (D_IN, D_IN)
