"""Tests for curvlinops.vivit.eigvalsh."""

import pytest
from scipy.sparse.linalg import eigsh
from torch import from_numpy

from curvlinops import GGNLinearOperator
from curvlinops.vivit import EigvalshComputation
from test.cases import Case
from test.utils import assert_close
from test.vivit.utils import (
    SUBSAMPLING_IDS,
    SUBSAMPLINGS,
    BranchedCase,
    assert_same_spectrum,
    case_grid,
    dense_ggn,
    make_groups,
    make_problem,
    run,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.mark.parametrize(
    "case, grouping, subsampling", case_grid(SUBSAMPLINGS, SUBSAMPLING_IDS)
)
def test_eigvalsh_matches_dense(case: Case, grouping: str, subsampling):
    """Gram eigenvalues = GGN block eigenvalues, padded with zeros to N * C."""
    problem = make_problem(case)
    computation = EigvalshComputation(subsampling=subsampling)
    groups = make_groups(problem.params, grouping)
    run(problem, computation, groups)

    num_classes = problem.model(problem.X).shape[1]
    num_samples = problem.X.shape[0] if subsampling is None else len(subsampling)
    for group in groups:
        evals = computation.get_result(group)
        assert evals.shape == (num_classes * num_samples,)
        assert_same_spectrum(evals, dense_ggn(problem, group, subsampling))


def test_eigvalsh_agrees_with_lanczos_on_ggn_operator():
    """ViViT and Lanczos (eigsh) on GGNLinearOperator give the same top eigenvalues."""
    for case in [Case("mlp", "ce"), Case("cnn", "mse")]:
        problem = make_problem(case)
        computation = EigvalshComputation()
        group = {"params": problem.params}
        run(problem, computation, [group])
        top = computation.get_result(group)[-4:]

        data = [(problem.X, problem.y)]
        G = GGNLinearOperator(problem.model, problem.loss_func, problem.params, data)
        lanczos = eigsh(G.to_scipy(), k=4, which="LA", return_eigenvectors=False)
        assert_close(top, from_numpy(lanczos).sort().values, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    "case", [Case("cnn", "ce"), BranchedCase("resnet")], ids=["cnn", "resnet"]
)
def test_mc_eigvalsh_sizes_and_reproducibility(case):
    """MC Gram matrices are [N M, N M]; the same seed gives the same eigenvalues."""
    problem = make_problem(case)
    group = {"params": problem.params}
    results = []
    for _ in range(2):
        computation = EigvalshComputation(subsampling=[1, 2, 4], mc_samples=2)
        run(problem, computation, [group], seed=3)
        results.append(computation.get_result(group))
    assert results[0].shape == (6,)
    assert_close(results[0], results[1], rtol=0, atol=0)
