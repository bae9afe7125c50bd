"""Tests for curvlinops.trace.hutchinson."""

import pytest
from torch import Generator, einsum, float64, manual_seed, rand, randn

from curvlinops import HutchinsonTraceEstimator, hutchinson_trace
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

# The example of the specification, verbatim. Its numbers come from NumPy's global
# random number generator, so they pin down how random vectors are drawn.
SPEC_EXAMPLE = """
>>> from numpy import trace, mean, round
>>> from numpy.random import rand, seed
>>> seed(0) # make deterministic
>>> A = rand(10, 10)
>>> tr_A = trace(A) # exact trace as reference
>>> estimator = HutchinsonTraceEstimator(A)
>>> # one- and multi-sample approximations
>>> tr_A_low_precision = estimator.sample()
>>> tr_A_high_precision = mean([estimator.sample() for _ in range(1_000)])
>>> assert abs(tr_A - tr_A_low_precision) > abs(tr_A - tr_A_high_precision)
>>> round(tr_A, 4), round(tr_A_low_precision, 4), round(tr_A_high_precision, 4)
(4.4575, 6.6796, 4.3886)
"""


def test_spec_example_runs_unchanged():
    run_doctest(SPEC_EXAMPLE, {"HutchinsonTraceEstimator": HutchinsonTraceEstimator})


def _random_matrix(dim: int = 8):
    manual_seed(0)
    return randn(dim, dim, dtype=float64)  # not symmetric


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_hutchinson_trace_is_mean_of_quadratic_forms(kind, distribution):
    A = _random_matrix()
    estimate = seeded_call(
        kind, 3, hutchinson_trace, make_operator(A, kind), 5, distribution
    )
    assert_world(estimate, kind, scalar=True)
    V = ColumnDrawer(kind, 3).draw(5, A.shape[0], distribution)
    assert_close(estimate, einsum("nk,nm,mk->", V, A, V) / 5)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_hutchinson_trace_unbiased(distribution):
    A = _random_matrix(6)
    assert_unbiased(
        lambda g: hutchinson_trace(A, 1, distribution, generator=g), A.trace(), 2000
    )


def test_hutchinson_trace_converges():
    A = _random_matrix(30)
    errors = [
        rms_error(lambda g, k=k: hutchinson_trace(A, k, generator=g), A.trace())
        for k in (4, 40, 400)
    ]
    assert errors[0] > 2 * errors[1] and errors[1] > 2 * errors[2]


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_estimator_class_draws_like_the_function(kind):
    """``sample()`` equals ``hutchinson_trace(A, 1)`` from the same random state."""
    A = _random_matrix()
    op = make_operator(A, kind)
    for distribution in DISTRIBUTIONS:
        seed_everything(1)
        sample = HutchinsonTraceEstimator(op).sample(distribution)
        seed_everything(1)
        assert_world(sample, kind, scalar=True)
        assert sample == hutchinson_trace(op, 1, distribution)


def test_torch_generator_in_numpy_world():
    """A torch generator is used for NumPy inputs too; the result is a float."""
    A = rand(5, 5, dtype=float64)
    results = [
        hutchinson_trace(A.numpy(), 3, generator=Generator().manual_seed(0)),
        hutchinson_trace(A, 3, generator=Generator().manual_seed(0)),
    ]
    assert isinstance(results[0], float)
    assert_close(results[0], results[1])


def test_hutchinson_trace_rejects_bad_input():
    A = _random_matrix()
    with pytest.raises(ValueError, match="square"):
        hutchinson_trace(A[:, :5], 3)
    with pytest.raises(ValueError, match="distribution"):
        hutchinson_trace(A, 3, distribution="uniform")
    for num_matvecs in (0, 2.0, True):
        with pytest.raises(ValueError, match="num_matvecs"):
            hutchinson_trace(A, num_matvecs)
    with pytest.raises(ValueError, match="square"):
        HutchinsonTraceEstimator(A[:, :5])
    with pytest.raises(TypeError, match="Expected a PyTorchLinearOperator"):
        hutchinson_trace([[1.0]], 1)
