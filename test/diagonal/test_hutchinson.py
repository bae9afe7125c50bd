"""Tests for curvlinops.diagonal.hutchinson."""

import pytest
from torch import float64, manual_seed, randn

from curvlinops import HutchinsonDiagonalEstimator, hutchinson_diag
from test.operator_kinds import (
    OPERATOR_KINDS,
    ColumnDrawer,
    assert_unbiased,
    assert_world,
    make_operator,
    rms_error,
    run_doctest,
    seed_everything,
    seeded_call,
)
from test.utils import assert_close

DISTRIBUTIONS = ["rademacher", "normal"]

# The example of the specification, verbatim (its numbers pin down the sampling).
SPEC_EXAMPLE = """
>>> from numpy import diag, mean, round
>>> from numpy.random import rand, seed
>>> from numpy.linalg import norm
>>> seed(0) # make deterministic
>>> A = rand(10, 10)
>>> diag_A = diag(A) # exact diagonal as reference
>>> estimator = HutchinsonDiagonalEstimator(A)
>>> # one- and multi-sample approximations
>>> diag_A_low_precision = estimator.sample()
>>> samples = [estimator.sample() for _ in range(1_000)]
>>> diag_A_high_precision = mean(samples, axis=0)
>>> # compute residual norms
>>> error_low_precision = norm(diag_A - diag_A_low_precision)
>>> error_high_precision = norm(diag_A - diag_A_high_precision)
>>> assert error_low_precision > error_high_precision
>>> round(error_low_precision, 4), round(error_high_precision, 4)
(5.7268, 0.1525)
"""


def test_spec_example_runs_unchanged():
    globs = {"HutchinsonDiagonalEstimator": HutchinsonDiagonalEstimator}
    run_doctest(SPEC_EXAMPLE, globs)


def _random_matrix(dim: int = 8):
    manual_seed(0)
    return randn(dim, dim, dtype=float64)  # not symmetric


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_hutchinson_diag_is_mean_of_products(kind, distribution):
    A = _random_matrix()
    estimate = seeded_call(
        kind, 3, hutchinson_diag, make_operator(A, kind), 5, distribution
    )
    assert_world(estimate, kind)
    V = ColumnDrawer(kind, 3).draw(5, A.shape[0], distribution)
    assert_close(estimate, (V * (A @ V)).mean(dim=1))


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_hutchinson_diag_unbiased(distribution):
    A = _random_matrix(6)
    assert_unbiased(
        lambda g: hutchinson_diag(A, 1, distribution, generator=g), A.diag(), 2000
    )


def test_hutchinson_diag_converges():
    A = _random_matrix(30)
    errors = [
        rms_error(lambda g, k=k: hutchinson_diag(A, k, generator=g), A.diag())
        for k in (4, 40, 400)
    ]
    assert errors[0] > 2 * errors[1] and errors[1] > 2 * errors[2]


def test_rademacher_is_exact_for_diagonal_matrices():
    A = randn(7, dtype=float64).diag()
    assert_close(hutchinson_diag(A, 1), A.diag())


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_estimator_class_draws_like_the_function(kind):
    A = _random_matrix()
    op = make_operator(A, kind)
    for distribution in DISTRIBUTIONS:
        seed_everything(1)
        sample = HutchinsonDiagonalEstimator(op).sample(distribution)
        assert_world(sample, kind)
        seed_everything(1)
        assert_close(sample, hutchinson_diag(op, 1, distribution))


def test_hutchinson_diag_rejects_bad_input():
    A = _random_matrix()
    with pytest.raises(ValueError, match="square"):
        hutchinson_diag(A[:, :5], 3)
    with pytest.raises(ValueError, match="square"):
        HutchinsonDiagonalEstimator(A[:, :5])
    with pytest.raises(ValueError, match="distribution"):
        hutchinson_diag(A, 3, distribution="uniform")
    with pytest.raises(ValueError, match="num_matvecs"):
        hutchinson_diag(A, 0)
