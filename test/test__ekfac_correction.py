"""Tests for curvlinops._ekfac_correction: the contraction orders of the correction."""

import pytest
from torch import Generator, Tensor, einsum, equal, float64, randn
from torch.linalg import qr

from curvlinops import _ekfac_correction
from curvlinops._ekfac_correction import (
    STRATEGIES,
    bias_corrected_eigenvalues,
    choose_strategy,
    corrected_eigenvalues,
)
from curvlinops.ekfac import compute_eigenvalue_correction_linear_weight_sharing
from test.utils import assert_close


def _random(*shape: int, seed: int = 0) -> Tensor:
    return randn(*shape, generator=Generator().manual_seed(seed), dtype=float64)


def _orthogonal(dim: int, seed: int) -> Tensor:
    return qr(_random(dim, dim, seed=seed)).Q


def _reference(g: Tensor, QG: Tensor, a: Tensor, QA: Tensor | None) -> Tensor:
    """Materialize every per-datum gradient (grouped: block rows), rotate, square."""
    if a.ndim == 4:  # [N, groups, P, D_in]: each group's channels see its patches
        g = g.unflatten(-1, (a.shape[1], -1))
        gradients = einsum("knpgc,ngpi->kngci", g, a).flatten(2, 3)
    else:
        gradients = einsum("knpo,npi->knoi", g, a)
    rotated = QG.T @ gradients
    rotated = rotated if QA is None else rotated @ QA
    return (rotated**2).sum((0, 1))


# (K, N, P, D_out, D_in, groups)
SHAPES = [
    (2, 5, 1, 3, 4, 1),
    (1, 4, 6, 3, 2, 1),
    (3, 3, 4, 4, 3, 2),
    (1, 2, 3, 6, 2, 3),
]


@pytest.mark.parametrize("strategy", [*STRATEGIES, None])
@pytest.mark.parametrize("rotate_inputs", [True, False], ids=["QA", "no_QA"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_strategies_match_materialized_per_datum_gradients(
    shape, rotate_inputs, strategy
):
    K, N, P, D_out, D_in, groups = shape
    g = _random(K, N, P, D_out, seed=1)
    a = _random(N, *([groups] if groups > 1 else []), P, D_in, seed=2)
    QG, QA = _orthogonal(D_out, 3), _orthogonal(D_in, 4) if rotate_inputs else None
    result = corrected_eigenvalues(g, QG, a, QA, strategy)
    assert_close(result, _reference(g, QG, a, QA))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_chunks_over_data_sum_to_the_whole(strategy, monkeypatch):
    g, a = _random(2, 7, 3, 8, seed=1), _random(7, 3, 8, seed=2)
    QG, QA = _orthogonal(8, 3), _orthogonal(8, 4)
    whole = corrected_eigenvalues(g, QG, a, QA, strategy)
    chunk_sizes = []
    original = _ekfac_correction._chunked

    def recording(contract, g, a, per_datum, *args):
        chunk_sizes.append(max(1, (g.numel() + a.numel()) // per_datum))
        return original(contract, g, a, per_datum, *args)

    monkeypatch.setattr(_ekfac_correction, "_MIN_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(_ekfac_correction, "_chunked", recording)
    chunked = corrected_eigenvalues(g, QG, a, QA, strategy)
    assert chunk_sizes and chunk_sizes[0] < 7  # really split into chunks
    assert_close(chunked, whole)


def test_one_position_is_the_product_of_squared_rotated_rows():
    """Without weight sharing: bit for bit the per-position formula."""
    g, a = _random(3, 6, 1, 4, seed=1), _random(6, 1, 5, seed=2)
    QG, QA = _orthogonal(4, 3), _orthogonal(5, 4)
    assert choose_strategy(3, 6, 1, 4, 5) == "gram"
    per_position = einsum("kbpo,bpi->oi", (g @ QG) ** 2, (a @ QA) ** 2)
    assert equal(corrected_eigenvalues(g, QG, a, QA), per_position)
    assert equal(bias_corrected_eigenvalues(g, QG), ((g @ QG) ** 2).sum((0, 1, 2)))


def test_bias_sums_the_gradients_over_positions():
    g, QG = _random(2, 5, 3, 4, seed=1), _orthogonal(4, 3)
    expected = ((g.sum(2) @ QG) ** 2).sum((0, 1))
    assert_close(bias_corrected_eigenvalues(g, QG), expected)


@pytest.mark.parametrize(
    "P,D,expected", [(1, 64, "gram"), (8, 64, "direct"), (512, 64, "gradients")]
)
def test_strategy_follows_the_flop_count(P, D, expected):
    assert choose_strategy(1, 32, P, D, D) == expected


def test_public_function_takes_data_first_rows():
    g, a = _random(5, 3, 4, seed=1), _random(5, 3, 2, seed=2)
    QG, QA = _orthogonal(4, 3), _orthogonal(2, 4)
    for strategy in STRATEGIES:
        result = compute_eigenvalue_correction_linear_weight_sharing(
            g, QG, a, QA, _force_strategy=strategy
        )
        assert_close(result, _reference(g.unsqueeze(0), QG, a, QA))


@pytest.mark.parametrize(
    "a_shape,QA_dim,strategy,match",
    [
        ((5, 4, 2), 2, None, "Expected g"),  # positions differ
        ((5, 3, 2), 3, None, "Expected g"),  # QA does not fit
        ((5, 3, 3, 2), 2, None, "Expected g"),  # 3 groups do not divide D_out = 4
        ((5, 3, 2), 2, "fast", "strategy"),
    ],
)
def test_bad_input_raises(a_shape, QA_dim, strategy, match):
    g, QG = _random(1, 5, 3, 4), _orthogonal(4, 1)
    with pytest.raises(ValueError, match=match):
        corrected_eigenvalues(
            g, QG, _random(*a_shape), _orthogonal(QA_dim, 2), strategy
        )
