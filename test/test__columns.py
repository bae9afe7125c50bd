"""Tests for curvlinops._columns: choosing between batched and per-column passes."""

import pickle
from copy import deepcopy
from time import perf_counter

import pytest
from torch import equal, float64, randn, zeros

from curvlinops import GGNLinearOperator, HessianLinearOperator, JacobianLinearOperator
from curvlinops._columns import ColumnPolicy
from test.cases import Case


def _busy(seconds: float):
    """Keep the CPU busy for a while."""
    start = perf_counter()
    while perf_counter() - start < seconds:
        pass


@pytest.mark.parametrize("slow", ["batched", "column"])
def test_column_policy_picks_the_faster_way_and_remembers(slow):
    """Batched first, then both ways timed twice, then the faster one."""
    calls = []

    def batched():
        calls.append("batched")
        _busy(0.05 if slow == "batched" else 0.0)
        return "all"

    def column(k, last):
        calls.append(k)
        _busy(0.05 if slow == "column" else 0.0)
        return k

    policy, like = ColumnPolicy(), zeros(3)
    for expected in (["batched"], [0, 1, "batched"], [0, 1, "batched"]):
        assert policy.choose("pass", like, batched, column, tuple) == "all"
        assert calls == expected
        calls.clear()
    result = policy.choose("pass", like, batched, column, tuple)
    if slow == "batched":
        assert (result, calls) == ((0, 1, 2), [0, 1, 2])
    else:
        assert (result, calls) == ("all", ["batched"])


@pytest.mark.parametrize("name", ["hessian", "ggn", "transposed_jacobian"])
def test_copies_keep_what_their_original_measured(name):
    """Copies and pickles make the same choices, so they multiply bit for bit."""
    model, loss_func, params, data = Case("mlp", "ce").make()
    op = {
        "hessian": lambda: HessianLinearOperator(model, loss_func, params, data),
        "ggn": lambda: GGNLinearOperator(model, loss_func, params, data),
        "transposed_jacobian": lambda: JacobianLinearOperator(
            model, params, data
        ).adjoint(),
    }[name]()
    op._mp.modes.columns.force = "loop"  # as if the original had measured it
    M = randn(op.shape[1], 3, dtype=float64)
    expected = op @ M
    for copied in (deepcopy(op), pickle.loads(pickle.dumps(op))):
        assert copied._mp.modes.columns.force == "loop"
        assert equal(copied @ M, expected)
