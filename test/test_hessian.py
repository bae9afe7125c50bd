"""Tests for curvlinops.hessian."""

import pytest
from torch import block_diag

from curvlinops import HessianLinearOperator
from curvlinops.examples.functorch import functorch_hessian
from curvlinops.utils import split_list
from test.cases import CASE_IDS, CASES, Case
from test.utils import compare_matmat


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hessian_matches_functorch(case: Case):
    model, loss_func, params, data = case.make()
    H = HessianLinearOperator(model, loss_func, params, data, **case.kwargs())
    H_dense = functorch_hessian(model, loss_func, params, data, case.input_key)
    compare_matmat(H, H_dense)


BLOCK_CASES = [Case("mlp", "ce", "mean"), Case("cnn", "mse", "sum")]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=[c.id for c in BLOCK_CASES])
@pytest.mark.parametrize("blocks", ["per_param", "two_blocks"])
def test_hessian_block_diagonal(case: Case, blocks: str):
    model, loss_func, params, data = case.make()
    block_sizes = [1] * len(params) if blocks == "per_param" else [1, len(params) - 1]
    H = HessianLinearOperator(model, loss_func, params, data, block_sizes=block_sizes)
    H_dense = functorch_hessian(model, loss_func, params, data)
    sizes = [sum(p.numel() for p in ps) for ps in split_list(params, block_sizes)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    expected = block_diag(
        *(H_dense[s : s + n, s : s + n] for s, n in zip(starts, sizes))
    )
    compare_matmat(H, expected)


@pytest.mark.parametrize("block_sizes", [[1], [0, 4], [2, 1.0, 1]])
def test_hessian_rejects_invalid_block_sizes(block_sizes):
    model, loss_func, params, data = Case("mlp", "mse").make()
    with pytest.raises(ValueError, match="block_sizes"):
        HessianLinearOperator(model, loss_func, params, data, block_sizes=block_sizes)


def test_hessian_subset_of_parameters():
    """The Hessian w.r.t. some parameters is the corresponding sub-block."""
    model, loss_func, params, data = Case("cnn", "ce").make()
    H_dense = functorch_hessian(model, loss_func, params, data)
    sizes = [p.numel() for p in params]
    start, stop = sum(sizes[:2]), sum(sizes[:4])
    H = HessianLinearOperator(model, loss_func, params[2:4], data)
    compare_matmat(H, H_dense[start:stop, start:stop])
