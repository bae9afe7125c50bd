"""Tests for curvlinops.vivit.directional_derivatives."""

import pytest
from torch import einsum

from curvlinops.vivit import DirectionalDerivativesComputation
from test.cases import Case
from test.utils import assert_close
from test.vivit.utils import (
    BRANCHED_CASES,
    case_grid,
    dense_ggn,
    dense_gradient,
    eigenvectors,
    make_groups,
    make_problem,
    per_sample,
    run,
    top_three,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

# (subsampling_grad, subsampling_ggn)
SUBSAMPLINGS = [(None, None), ([1, 4], [0, 2, 3]), ([3, 0, 2], None)]
SUBSAMPLING_IDS = ["all", "both_sub", "grad_sub"]
MC_CASES = [Case("cnn", "ce"), *BRANCHED_CASES]
MC_IDS = ["cnn", "resnet", "parallel"]


@pytest.mark.parametrize(
    "case, grouping, subsamplings", case_grid(SUBSAMPLINGS, SUBSAMPLING_IDS)
)
def test_directional_derivatives_match_dense(case: Case, grouping: str, subsamplings):
    """γₙₖ = ∇ℓₙᵀ eₖ and λₙₖ = eₖᵀ Gₙ eₖ for the per-sample losses ℓₙ."""
    sub_grad, sub_ggn = subsamplings
    problem = make_problem(case)
    groups = make_groups(problem.params, grouping, criterion=top_three)
    computation = DirectionalDerivativesComputation(
        sub_grad, sub_ggn, warn_small_eigvals=0.0
    )
    run(problem, computation, groups)

    for group, (evals, E) in zip(groups, eigenvectors(problem, groups, sub_ggn)):
        gammas, lambdas = computation.get_result(group)
        grads = per_sample(dense_gradient, problem, group, sub_grad)  # [N_grad, D]
        ggns = per_sample(dense_ggn, problem, group, sub_ggn)  # [N_ggn, D, D]
        assert_close(gammas, grads @ E, atol=1e-8)
        assert_close(lambdas, einsum("dk,nde,ek->nk", E, ggns, E), atol=1e-8)
        # means: slope of the (sub-sampled) mini-batch loss and the eigenvalue
        slope = dense_gradient(problem, group, sub_grad) @ E
        assert_close(gammas.mean(0), slope, atol=1e-8)
        assert_close(lambdas.mean(0), evals, atol=1e-8)


@pytest.mark.parametrize("case", MC_CASES, ids=MC_IDS)
def test_mc_directional_derivatives(case):
    """With MC, the directions are MC GGN eigenvectors (same seed as EighComputation).

    The slopes still match per-sample gradients, and the curvatures average to the
    MC GGN's eigenvalues.
    """
    problem = make_problem(case)
    groups = make_groups(problem.params, "interleaved", criterion=top_three)
    computation = DirectionalDerivativesComputation(mc_samples_ggn=3)
    run(problem, computation, groups, seed=4)
    for group, (evals, E) in zip(groups, eigenvectors(problem, groups, None, 3, 4)):
        gammas, lambdas = computation.get_result(group)
        grads = per_sample(dense_gradient, problem, group)
        assert_close(gammas, grads @ E, atol=1e-8)
        assert lambdas.shape == (problem.X.shape[0], 3)
        assert (lambdas >= 0).all()
        assert_close(lambdas.mean(0), evals, atol=1e-8)


def test_directional_derivatives_warn_on_small_eigenvalues():
    problem = make_problem(Case("mlp", "ce"))
    group = {"params": problem.params, "criterion": lambda evals: [0]}
    with pytest.warns(UserWarning, match="directional gradients"):
        run(problem, DirectionalDerivativesComputation(), [group])
