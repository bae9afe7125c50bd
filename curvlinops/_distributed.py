"""Reductions over a ``torch.distributed`` process group for data-parallel products.

Every helper is a no-op when ``process_group`` is ``None`` (single process), so
operators call them unconditionally. With a group, each rank holds a shard of the
data, and the helpers combine the ranks' partial results with one collective each.

Ranks fail together instead of waiting for each other: a computation that raises
on one rank reports the failure from :func:`shared_failure` through an error flag
(:func:`first_error_over_ranks`), and the other ranks read that flag at their next
collective (every helper below reads it first) and raise with the failing rank's
message. Errors raised on all ranks alike are marked (:func:`mark_shared`) so that
they are not reported twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from threading import local

import torch.distributed as dist
from torch import Tensor, cat, tensor
from torch import device as torch_device

# 2**32 over the golden ratio: spacing of the ranks' seeds (see `rank_seed`).
_SEED_STRIDE = 0x9E3779B9
# How deeply this thread's computations in `shared_failure` are nested.
_NESTING = local()


def check_process_group(process_group):
    """Verify that a process group can be used.

    Args:
        process_group: A ``torch.distributed`` process group, or ``None``.

    Raises:
        ValueError: If a group is given but ``torch.distributed`` is not initialized.
    """
    if process_group is not None and not (
        dist.is_available() and dist.is_initialized()
    ):
        raise ValueError(
            "`process_group` was given, but torch.distributed is not initialized: "
            "call torch.distributed.init_process_group first (e.g. under torchrun)."
        )


def rank(process_group) -> int:
    """Return this process's rank in the group (``0`` without a group).

    Args:
        process_group: A process group or ``None``.

    Returns:
        The rank.
    """
    return 0 if process_group is None else dist.get_rank(process_group)


def rank_seed(seed: int, process_group) -> int:
    r"""Derive this rank's seed for a random number generator from a shared seed.

    Rank :math:`r` of the group uses :math:`(s + r \cdot \mathtt{0x9E3779B9})
    \bmod 2^{64}` for the shared seed :math:`s`; rank 0 (and a single process)
    uses :math:`s` itself. The stride is :math:`2^{32}` over the golden ratio, which
    keeps the 32-bit seeds of PyTorch's CPU generator apart: with up to 1024 ranks,
    generators for seeds that differ by less than a million never coincide.
    Results are therefore reproducible for a fixed number of ranks.

    Args:
        seed: The seed shared by all ranks.
        process_group: A process group or ``None``.

    Returns:
        This rank's seed.
    """
    this_rank = rank(process_group)
    return seed if this_rank == 0 else (seed + this_rank * _SEED_STRIDE) % 2**64


def all_reduce_sum(tensors: list[Tensor], process_group) -> list[Tensor]:
    """Sum tensors over all ranks with a single collective.

    Args:
        tensors: Tensors of this rank (same shapes, dtype and device on all ranks).
        process_group: A process group or ``None``.

    Returns:
        The summed tensors (new tensors with a group, the inputs without).
    """
    if process_group is None or not tensors:
        return tensors
    raise_if_another_rank_failed(process_group, tensors[0].device)
    flat = cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    chunks = flat.split([t.numel() for t in tensors])
    return [c.reshape(t.shape) for c, t in zip(chunks, tensors)]


def sum_over_ranks(value: float, process_group, device: torch_device) -> float:
    """Sum a number over all ranks.

    Args:
        value: This rank's number.
        process_group: A process group or ``None``.
        device: Device for the communication buffer (CUDA for NCCL).

    Returns:
        The sum over ranks.
    """
    if process_group is None:
        return value
    (total,) = all_reduce_sum([tensor([float(value)], device=device)], process_group)
    return total.item()


def first_error_over_ranks(error: str | None, process_group, device) -> str | None:
    """Share an error message so that all ranks fail together (instead of hanging).

    One collective exchanges the error flag; only if a rank failed, a second one
    hands the message of the lowest failing rank to all ranks.

    Args:
        error: This rank's error message, or ``None``.
        process_group: A process group or ``None``.
        device: Device for the communication buffer.

    Returns:
        This rank's error, else the lowest failing rank's message (prefixed with
        its rank), else ``None``.
    """
    if process_group is None:
        return error
    world = dist.get_world_size(process_group)
    failed = tensor([world if error is None else rank(process_group)], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MIN, group=process_group)
    if failed.item() == world:
        return None
    messages = [None] * world
    dist.all_gather_object(messages, error, group=process_group)
    if error is not None:
        return error
    return f"Rank {failed.item()} failed: {messages[failed.item()]}"


def raise_if_another_rank_failed(process_group, device: torch_device):
    """Read the error flag before a collective; raise if another rank failed.

    Args:
        process_group: A process group or ``None``.
        device: Device for the communication buffer.

    Raises:
        RuntimeError: With the failing rank's message, if a rank failed.
    """
    error = first_error_over_ranks(None, process_group, device)
    if error is not None:
        raise mark_shared(RuntimeError(error))


def mark_shared(error: BaseException) -> BaseException:
    """Mark an error as known to all ranks, so that it is not reported again.

    Args:
        error: An error raised on all ranks, or already reported.

    Returns:
        The error.
    """
    error.__curvlinops_shared__ = True
    return error


@contextmanager
def shared_failure(process_group, device: torch_device) -> Iterator[None]:
    """Report an error of the enclosed computation to the other ranks, then raise it.

    The other ranks learn of it at their next collective and raise, too, instead of
    waiting for this rank until the process group's timeout. Interrupts
    (``KeyboardInterrupt``) and errors of the communication itself are not
    reported.

    Args:
        process_group: A process group or ``None`` (then nothing is reported).
        device: Device for the communication buffer.

    Yields:
        Nothing.
    """
    depth = getattr(_NESTING, "depth", 0)  # computations may nest
    _NESTING.depth = depth + 1
    try:
        yield
    except Exception as error:
        reported = getattr(error, "__curvlinops_shared__", False)
        communication = isinstance(error, getattr(dist, "DistError", ()))
        if not (process_group is None or reported or communication):
            mark_shared(error)
            message = f"{type(error).__name__}: {error}"
            first_error_over_ranks(message, process_group, device)
        if depth == 0 and hasattr(error, "__curvlinops_shared__"):
            del error.__curvlinops_shared__  # the caller may raise it again
        raise
    finally:
        _NESTING.depth = depth


def gather_rows(x: Tensor, process_group) -> Tensor:
    """Concatenate every rank's tensor along the leading axis, in rank order.

    The leading axes may differ between ranks (uneven shards).

    Args:
        x: This rank's tensor ``[n_rank, *]``.
        process_group: A process group or ``None``.

    Returns:
        ``[sum_rank n_rank, *]``, the same on all ranks.
    """
    if process_group is None:
        return x
    raise_if_another_rank_failed(process_group, x.device)
    world = dist.get_world_size(process_group)
    sizes = [None] * world
    dist.all_gather_object(sizes, x.shape[0], group=process_group)
    padded = x.new_zeros(max(sizes), *x.shape[1:])
    padded[: x.shape[0]] = x
    gathered = [padded.clone() for _ in range(world)]
    dist.all_gather(gathered, padded, group=process_group)
    return cat([g[:n] for g, n in zip(gathered, sizes)])


def row_range(num_rows: int, process_group, device: torch_device) -> tuple[int, int]:
    """Locate this rank's rows among the rows of all ranks, stacked in rank order.

    Args:
        num_rows: Number of rows (e.g. data points) of this rank.
        process_group: A process group or ``None``.
        device: Device for the error flag's communication buffer.

    Returns:
        ``(start, stop)`` of this rank's rows; ``(0, num_rows)`` without a group.
    """
    if process_group is None:
        return 0, num_rows
    raise_if_another_rank_failed(process_group, device)
    sizes = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(sizes, num_rows, group=process_group)
    start = sum(sizes[: rank(process_group)])
    return start, start + num_rows


def first_over_ranks(value, process_group, device: torch_device):
    """Return the value of the lowest rank that has one (not ``None``).

    Args:
        value: This rank's picklable value, or ``None``.
        process_group: A process group or ``None``.
        device: Device for the error flag's communication buffer.

    Returns:
        The first value that is not ``None`` in rank order, or ``None``.
    """
    if process_group is None:
        return value
    raise_if_another_rank_failed(process_group, device)
    values = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(values, value, group=process_group)
    return next((v for v in values if v is not None), None)
