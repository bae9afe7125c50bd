"""Tests for curvlinops.vivit.damped_newton."""

import pytest
from torch import ones_like

from curvlinops.vivit import DirectionalDampedNewtonComputation
from test.cases import Case
from test.utils import assert_close
from test.vivit.utils import (
    BRANCHED_CASES,
    case_grid,
    dense_ggn,
    dense_gradient,
    eigenvectors,
    flatten_vectors,
    make_groups,
    make_problem,
    run,
    top_three,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

# (subsampling_grad, subsampling_ggn)
SUBSAMPLINGS = [(None, None), ([1, 4], [0, 2, 3])]
SUBSAMPLING_IDS = ["all", "sub"]


def damping(evals, gram_evecs, gammas, lambdas):
    """A damping that differs between directions."""
    return 0.1 + evals


def recording_damping(idx: int, received: dict):
    """Wrap the damping to record its arguments under a group index."""

    def wrapped(*args):
        received[idx] = args
        return damping(*args)

    return wrapped


@pytest.mark.parametrize(
    "case, grouping, subsamplings", case_grid(SUBSAMPLINGS, SUBSAMPLING_IDS)
)
def test_damped_newton_matches_dense(case: Case, grouping: str, subsamplings):
    """The step is -Σₖ (gᵀeₖ) / (eₖᵀ G eₖ + δₖ) eₖ with dense gradient and GGN."""
    sub_grad, sub_ggn = subsamplings
    problem = make_problem(case)
    groups = make_groups(problem.params, grouping, criterion=top_three)
    received = {}
    for idx, group in enumerate(groups):
        group["damping"] = recording_damping(idx, received)
    computation = DirectionalDampedNewtonComputation(
        sub_grad, sub_ggn, warn_small_eigvals=0.0
    )
    run(problem, computation, groups)

    results = eigenvectors(problem, groups, sub_ggn)
    for idx, (group, (evals, E)) in enumerate(zip(groups, results)):
        args = received[idx]
        step = computation.get_result(group)
        assert [s.shape for s in step] == [p.shape for p in group["params"]]
        g, G = (
            dense_gradient(problem, group, sub_grad),
            dense_ggn(problem, group, sub_ggn),
        )
        slopes, curvatures = g @ E, (E * (G @ E)).sum(0)
        expected = E @ (-slopes / (curvatures + damping(evals, None, None, None)))
        assert_close(flatten_vectors([s.unsqueeze(0) for s in step])[:, 0], expected)
        # the damping receives eigenvalues, Gram eigenvectors, slopes, curvatures
        num_samples = problem.X.shape[0]
        n_grad = num_samples if sub_grad is None else len(sub_grad)
        n_ggn = num_samples if sub_ggn is None else len(sub_ggn)
        num_classes = problem.model(problem.X).shape[1]
        K = len(evals)
        shapes = [(K,), (num_classes * n_ggn, K), (n_grad, K), (n_ggn, K)]
        assert [tuple(a.shape) for a in args] == shapes
        assert_close(args[0], evals)


@pytest.mark.parametrize("case", BRANCHED_CASES, ids=["resnet", "parallel"])
def test_mc_damped_newton(case):
    """With MC, the step is built from the MC GGN's eigenpairs.

    The directions are EighComputation's with the same seed, the slopes those of the
    exact gradient, and the curvatures the MC eigenvalues.
    """
    problem = make_problem(case)
    groups = make_groups(problem.params, "interleaved", criterion=top_three)
    for group in groups:
        group["damping"] = damping
    computation = DirectionalDampedNewtonComputation(
        subsampling_ggn=[1, 2, 4], mc_samples_ggn=2, warn_small_eigvals=0.0
    )
    run(problem, computation, groups, seed=5)
    results = eigenvectors(problem, groups, [1, 2, 4], mc_samples=2, seed=5)
    for group, (evals, E) in zip(groups, results):
        step = flatten_vectors([s.unsqueeze(0) for s in computation.get_result(group)])
        slopes = dense_gradient(problem, group) @ E
        expected = E @ (-slopes / (evals + damping(evals, None, None, None)))
        assert_close(step[:, 0], expected)
        # not the exact GGN's step: the MC eigenvalues differ from the exact ones
        exact_evals, _ = eigenvectors(problem, [group], [1, 2, 4])[0]
        assert not evals.allclose(exact_evals)


def test_undamped_newton_step_solves_linear_least_squares():
    """Linear model + MSE: the undamped step along all directions is Newton's step."""
    problem = make_problem(Case("mlp", "mse"))
    group = {
        "params": problem.params[-2:],  # last layer: the loss is quadratic in it
        "criterion": lambda evals: list(range(evals.numel() - 15, evals.numel())),
        "damping": lambda evals, *_: 0 * evals,
    }
    computation = DirectionalDampedNewtonComputation()
    run(problem, computation, [group])
    step = flatten_vectors([s.unsqueeze(0) for s in computation.get_result(group)])
    G, g = dense_ggn(problem, group), dense_gradient(problem, group)
    assert_close(G @ step[:, 0], -g, atol=1e-10)


def test_damping_with_wrong_shape_raises():
    problem = make_problem(Case("mlp", "ce"))
    group = {
        "params": problem.params,
        "criterion": top_three,
        "damping": lambda evals, *_: ones_like(evals)[:2],
    }
    with pytest.raises(ValueError, match="one value per direction"):
        run(problem, DirectionalDampedNewtonComputation(), [group])
