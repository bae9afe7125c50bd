"""Tests for curvlinops.trace.meyer2020hutch."""

import pytest
from torch import einsum, float64, manual_seed, randn
from torch.linalg import qr

from curvlinops import HutchPPTraceEstimator, hutchinson_trace, hutchpp_trace
from curvlinops.examples import IdentityLinearOperator, TensorLinearOperator
from test.faults import INJECTED
from test.operator_kinds import (
    OPERATOR_KINDS,
    ColumnDrawer,
    CountingOperator,
    assert_unbiased,
    assert_world,
    decaying_matrix,
    make_operator,
    rms_error,
    run_doctest,
    seed_everything,
    seeded_call,
)
from test.utils import assert_close

# The example of the specification, verbatim (its numbers pin down the sampling).
SPEC_EXAMPLE = """
>>> from numpy import trace, mean, round
>>> from numpy.random import rand, seed
>>> seed(0) # make deterministic
>>> A = rand(10, 10)
>>> tr_A = trace(A) # exact trace as reference
>>> estimator = HutchPPTraceEstimator(A)
>>> # one- and multi-sample approximations
>>> tr_A_low_precision = estimator.sample()
>>> tr_A_high_precision = mean([estimator.sample() for _ in range(998)])
>>> # assert abs(tr_A - tr_A_low_precision) > abs(tr_A - tr_A_high_precision)
>>> round(tr_A, 4), round(tr_A_low_precision, 4), round(tr_A_high_precision, 4)
(4.4575, 2.4085, 4.5791)
"""


def test_spec_example_runs_unchanged():
    run_doctest(SPEC_EXAMPLE, {"HutchPPTraceEstimator": HutchPPTraceEstimator})


def _random_matrix(dim: int = 9):
    manual_seed(0)
    return randn(dim, dim, dtype=float64)  # not symmetric


def _hutchpp_reference(A, S, G):
    """Hutch++ with explicit sketch S and Hutchinson vectors G."""
    Q, _ = qr(A @ S)
    P = Q @ Q.T
    G = G - P @ G
    return (Q.T @ A @ Q).trace() + einsum("nk,nm,mk->", G, A, G) / G.shape[1]


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
@pytest.mark.parametrize("num_matvecs", [3, 7])
def test_hutchpp_trace_matches_reference(kind, num_matvecs):
    A = _random_matrix()
    estimate = seeded_call(kind, 2, hutchpp_trace, make_operator(A, kind), num_matvecs)
    assert_world(estimate, kind, scalar=True)
    drawer, basis_dim = ColumnDrawer(kind, 2), num_matvecs // 3
    S = drawer.draw(basis_dim, A.shape[0], "rademacher")
    G = drawer.draw(num_matvecs - 2 * basis_dim, A.shape[0], "rademacher")
    assert_close(estimate, _hutchpp_reference(A, S, G))


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_hutchpp_trace_unbiased(distribution):
    A = _random_matrix(6)
    assert_unbiased(
        lambda g: hutchpp_trace(A, 3, distribution, generator=g), A.trace(), 1000
    )


def test_hutchpp_trace_converges_and_beats_hutchinson():
    A = decaying_matrix(100, 0.8)
    truth = A.trace()
    errors = [
        rms_error(lambda g, k=k: hutchpp_trace(A, k, generator=g), truth)
        for k in (6, 30, 90)
    ]
    assert errors[0] > 2 * errors[1] and errors[1] > 2 * errors[2]
    hutchinson = rms_error(lambda g: hutchinson_trace(A, 30, generator=g), truth)
    assert errors[1] < hutchinson / 2


def test_hutchpp_trace_is_exact_with_full_basis():
    A = _random_matrix()
    assert_close(hutchpp_trace(A, 3 * A.shape[0]), A.trace())


def test_hutchpp_trace_uses_num_matvecs_products():
    A = CountingOperator(TensorLinearOperator(_random_matrix()))
    hutchpp_trace(A, 8)
    assert A.num_columns == 8


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_estimator_class_matches_reference(kind):
    A = _random_matrix()
    seed_everything(4)
    estimator = HutchPPTraceEstimator(make_operator(A, kind), basis_dim=2)
    samples = [estimator.sample(d) for d in ("rademacher", "normal")]
    assert_world(samples[0], kind, scalar=True)
    drawer = ColumnDrawer(kind, 4, global_torch_rng=True)
    S = drawer.draw(2, A.shape[0], "rademacher")
    for sample, distribution in zip(samples, ("rademacher", "normal")):
        G = drawer.draw(1, A.shape[0], distribution)
        assert_close(sample, _hutchpp_reference(A, S, G))


def test_estimator_class_caches_the_basis_and_is_unbiased():
    A = CountingOperator(TensorLinearOperator(_random_matrix(6)))
    manual_seed(0)
    estimator = HutchPPTraceEstimator(A, basis_dim=2)
    estimator.sample()
    assert A.num_columns == 2 * 2 + 1
    estimator.sample()
    assert A.num_columns == 2 * 2 + 2
    truth = A.operator.tensor.trace()
    assert_unbiased(lambda _: estimator.sample(), truth, 1000)


@pytest.mark.parametrize("dim, basis_dim", [(10, 1), (500, 5), (2000, 10)])
def test_estimator_class_default_basis_dim(dim, basis_dim):
    identity = IdentityLinearOperator([(dim,)], "cpu", float64)
    assert HutchPPTraceEstimator(identity)._basis_dim == basis_dim


def test_hutchpp_rejects_bad_input():
    A = _random_matrix()
    with pytest.raises(ValueError, match="num_matvecs"):
        hutchpp_trace(A, 2)
    with pytest.raises(ValueError, match="distribution"):
        hutchpp_trace(A, 3, distribution="uniform")
    with pytest.raises(ValueError, match="square"):
        hutchpp_trace(A[:, :3], 3)
    for basis_dim in (0, A.shape[0] + 1, 1.5):
        with pytest.raises(ValueError, match="basis_dim"):
            HutchPPTraceEstimator(A, basis_dim=basis_dim)
    with pytest.raises(ValueError, match="distribution"):
        HutchPPTraceEstimator(A, basis_distribution="uniform")


class _FailingOnce(CountingOperator):
    """Raises at its ``at``-th product (from 0), once."""

    def __init__(self, operator, at: int):
        super().__init__(operator)
        self.countdown = at

    def _matmat(self, M):
        self.countdown -= 1
        if self.countdown == -1:
            raise RuntimeError(INJECTED)
        return super()._matmat(M)


def test_estimator_class_keeps_no_half_computed_basis():
    """A product that fails while the basis is computed leaves nothing cached."""
    A = _random_matrix(6)
    failing = _FailingOnce(TensorLinearOperator(A), at=1)  # the product A Q
    estimator = HutchPPTraceEstimator(failing, basis_dim=2)
    manual_seed(0)
    with pytest.raises(RuntimeError, match=INJECTED):
        estimator.sample()
    manual_seed(0)
    retry = estimator.sample()
    manual_seed(0)
    assert_close(retry, HutchPPTraceEstimator(A, basis_dim=2).sample())
