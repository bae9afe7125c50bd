"""Tests for curvlinops.vivit._directional: per-sample gradients."""

import pytest
from backpack import backpack
from torch import cat

from curvlinops.vivit._directional import PerSampleGradients
from test.cases import Case
from test.utils import assert_close
from test.vivit.utils import (
    SUBSAMPLING_IDS,
    SUBSAMPLINGS,
    dense_gradient,
    make_problem,
    per_sample,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.mark.parametrize("subsampling", SUBSAMPLINGS, ids=SUBSAMPLING_IDS)
def test_per_sample_gradients(subsampling):
    """N times BackPACK's per-sample gradients are those of the per-sample losses."""
    problem = make_problem(Case("cnn", "ce"))
    with backpack(PerSampleGradients("grads", subsampling)):
        problem.loss_func(problem.model(problem.X), problem.y).backward()
    group = {"params": problem.params}
    grads = cat([p.grads.flatten(1) for p in problem.params], 1)
    expected = per_sample(dense_gradient, problem, group, subsampling)
    assert_close(problem.X.shape[0] * grads, expected)
    assert not hasattr(problem.params[0], "grad_batch")
