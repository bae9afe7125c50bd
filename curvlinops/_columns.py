"""Products with several columns: one batched pass or one pass per column.

Batched passes (``vmap``, ``is_grads_batched``) share work between columns, but
PyTorch's batching rules of some operations (convolutions on CPUs) cost more per
column than separate passes, and on a compute-bound model a column's tangents and
backward pass cost as much as a single product's anyway. :class:`ColumnPolicy`
measures which way is faster, once per operator, kind of pass and number of
columns.
"""

from __future__ import annotations

from time import perf_counter

from torch import Tensor, cat, cuda
from torch.compiler import is_compiling


def stack_columns(results: list[list[Tensor]]) -> list[Tensor]:
    """Concatenate per-column results along the leading column axis.

    Args:
        results: Per column, a list of tensors ``[1, *shape]``.

    Returns:
        One tensor ``[K, *shape]`` per entry.
    """
    return [cat(parts) for parts in zip(*results)]


class ColumnPolicy:
    """Multiply onto ``K`` columns in one batched pass or one pass per column.

    Batched passes (``vmap``, ``is_grads_batched``) share work between columns,
    but PyTorch's batching rules of some operations (convolutions on CPUs) cost
    more per column than separate passes. The first time a kind of pass meets
    ``K > 1`` columns it runs batched (which warms that pass up); the next two
    times the policy also times two single columns against the batched pass. From
    then on it uses separate passes for that kind and ``K`` only if both
    measurements found them more than a tenth cheaper per column (a single
    measurement on a busy machine can mislead; so can CPU times, which count
    idle or spinning worker threads differently for the two ways). Both ways give
    the same numbers up to rounding. Under ``torch.compile`` passes are batched.

    Attributes:
        force: ``"batched"`` or ``"loop"`` to skip the measurement (tests);
            ``None`` (default) to measure.
    """

    def __init__(self):
        """Start without measurements."""
        self.force: str | None = None
        self._votes: dict[tuple[str, int], list[bool]] = {}

    def choose(self, kind: str, like: Tensor, batched, column, combine):
        """Run the batched pass or one pass per column, as decided for ``kind``.

        Args:
            kind: Name of the pass (decisions are kept per kind and ``K``).
            like: A tensor ``[K, ...]`` of columns (for ``K``).
            batched: ``batched()`` computes all columns at once.
            column: ``column(k, last)`` computes column ``k``; ``last`` says
                whether it is the last call of the pass.
            combine: Combines the per-column results.

        Returns:
            The result for all columns.
        """
        votes = self._votes.setdefault((kind, like.shape[0]), [])
        if self.force is not None or is_compiling():
            loop = self.force == "loop"
        elif len(votes) < MEASUREMENTS + 1:
            return self._measure(votes, like, batched, column)
        else:
            loop = all(votes[1:])
        if not loop:
            return batched()
        num_cols = like.shape[0]
        return combine([column(k, k == num_cols - 1) for k in range(num_cols)])

    @staticmethod
    def _measure(votes: list[bool], like: Tensor, batched, column):
        """Run the batched pass; from the second call on, vote on looping.

        Args:
            votes: The votes so far (the first entry stands for the warm-up).
            like: A tensor ``[K, ...]`` of columns.
            batched: Computes all columns at once.
            column: Computes one column.

        Returns:
            The batched pass's result.
        """
        if not votes:
            votes.append(False)
            return batched()
        times = [clock()]
        for k in range(2):
            column(k, last=False)
            times.append(clock())
        result = batched()
        single = min(times[1] - times[0], times[2] - times[1])
        per_column = (clock() - times[2]) / like.shape[0]
        votes.append(per_column > LOOP_MARGIN * single)
        return result


# Measurements (after the warm-up) that must all favor separate passes.
MEASUREMENTS = 2
# One pass per column only if the batched pass costs this much more per column.
LOOP_MARGIN = 1.1


def clock() -> float:
    """Return a wall-clock time stamp in seconds, after queued GPU work has finished.

    Returns:
        The time stamp.
    """
    if cuda.is_initialized():
        cuda.synchronize()
    return perf_counter()
