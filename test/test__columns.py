"""Tests for curvlinops._columns: choosing between batched and per-column passes."""

from time import perf_counter

import pytest
from torch import zeros

from curvlinops._columns import ColumnPolicy


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
