"""Tests for curvlinops.vivit.eigh."""

from warnings import catch_warnings, simplefilter

import pytest
from torch import eye
from torch.linalg import eigvalsh

from curvlinops.vivit import EighComputation
from test.cases import Case
from test.utils import assert_close
from test.vivit.utils import (
    SUBSAMPLING_IDS,
    SUBSAMPLINGS,
    BranchedCase,
    case_grid,
    dense_ggn,
    flatten_vectors,
    make_groups,
    make_problem,
    non_zero,
    run,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.mark.parametrize(
    "case, grouping, subsampling", case_grid(SUBSAMPLINGS, SUBSAMPLING_IDS)
)
def test_eigh_matches_dense(case: Case, grouping: str, subsampling):
    """Eigenpairs satisfy G e = λ e, are orthonormal, and cover the spectrum."""
    problem = make_problem(case)
    computation = EighComputation(subsampling=subsampling, warn_small_eigvals=0.0)
    received = []

    def criterion(evals):
        received.append(evals)
        return non_zero(evals)

    groups = make_groups(problem.params, grouping, criterion=criterion)
    run(problem, computation, groups)

    assert len(received) == len(groups)
    for group in groups:
        evals, evecs = computation.get_result(group)
        assert [e.shape[1:] for e in evecs] == [p.shape for p in group["params"]]
        G, E = dense_ggn(problem, group, subsampling), flatten_vectors(evecs)
        scale = G.norm().item()
        assert_close(G @ E, E * evals, atol=1e-10 * scale)
        assert_close(E.T @ E, eye(len(evals), dtype=E.dtype), atol=1e-9)
        expected = eigvalsh(G)
        assert_close(evals, expected[-len(evals) :], atol=1e-10 * scale)
        # the remaining GGN eigenvalues are zero
        assert (expected[: -len(evals)].abs() < 1e-8 * scale).all()
    for evals in received:  # the criterion sees ascending Gram eigenvalues
        assert (evals.diff() >= 0).all()


@pytest.mark.parametrize(
    "case", [Case("mlp", "ce"), BranchedCase("parallel")], ids=["mlp", "parallel"]
)
def test_mc_eigh_is_eigendecomposition_of_mc_ggn(case):
    """With MC, the eigenpairs decompose the MC GGN, which converges to the GGN."""
    problem = make_problem(case)
    G = dense_ggn(problem, {"params": problem.params}, [0, 1])
    errors = []
    for mc_samples in [2, 32, 512]:
        computation = EighComputation(subsampling=[0, 1], mc_samples=mc_samples)
        group = {"params": problem.params, "criterion": non_zero}
        run(problem, computation, [group])
        evals, evecs = computation.get_result(group)
        E = flatten_vectors(evecs)
        assert_close(E.T @ E, eye(len(evals), dtype=E.dtype), atol=1e-8)
        G_mc = (E * evals) @ E.T
        errors.append((G_mc - G).norm() / G.norm())
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.1


def test_eigh_warns_on_small_eigenvalues():
    problem = make_problem(Case("mlp", "ce"))  # CE: N zero Gram eigenvalues

    def all_evals(evals):
        return list(range(evals.numel()))

    group = {"params": problem.params, "criterion": all_evals}
    with pytest.warns(UserWarning, match="eigenvalue"):
        run(problem, EighComputation(), [group])
    with catch_warnings(record=True) as record:
        simplefilter("always")
        run(problem, EighComputation(warn_small_eigvals=0.0), [group])
    assert not any("divides" in str(w.message) for w in record)
