"""Timing and memory measurements relative to one gradient evaluation.

Time ratios are medians of per-round ratios: each round times one gradient right
before the measured call, so that a machine whose speed drifts (shared cores)
biases numerator and denominator alike. On a machine shared with other work,
:func:`use_cpu_time` times the CPU time of one thread instead (one PyTorch thread),
which waiting for a core does not inflate. Memory is the peak allocated during one
call above what was allocated before it (CPU: replayed from the profiler's record
of allocations and frees).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from statistics import median
from time import perf_counter, thread_time

import torch
from problems import Problem
from torch.profiler import ProfilerActivity, profile

NUM_COLUMNS = 8
CPU = torch.device("cpu")
_clock = perf_counter


def use_cpu_time():
    """Time the CPU time of the calling thread, with one PyTorch thread (CPU only)."""
    global _clock
    torch.set_num_threads(1)
    _clock = thread_time


def synchronize(device: torch.device):
    """Wait for queued GPU work, so that timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(func, device: torch.device = CPU) -> float:
    """Return the wall-clock time of one call ``func()`` in seconds."""
    synchronize(device)
    start = _clock()
    func()
    synchronize(device)
    return _clock() - start


def timed(func, repeats: int, warmup: int = 2, device: torch.device = CPU) -> float:
    """Return the median wall-clock time of ``func()`` in seconds."""
    for _ in range(warmup):
        func()
    return median(time_once(func, device) for _ in range(repeats))


def timed_ratio(
    func, reference, repeats: int, warmup: int = 2, device: torch.device = CPU
) -> tuple[float, float]:
    """Time ``func()`` against ``reference()``, called right before it each round.

    Returns:
        The median time of ``func()`` in seconds and the median of the per-round
        ratios of its time to the reference's.
    """
    for _ in range(warmup):
        reference()
        func()
    times, ratios = [], []
    for _ in range(repeats):
        reference_time = time_once(reference, device)
        times.append(time_once(func, device))
        ratios.append(times[-1] / reference_time)
    return median(times), median(ratios)


@contextmanager
def quiet_stderr():
    """Silence the profiler library's start/stop messages on standard error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(func, device: torch.device) -> float:
    """Return the peak of memory allocated during ``func()`` (bytes, above start)."""
    if device.type == "cuda":
        synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        func()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    # CPU: replay the allocations and frees the profiler records, in order
    with (
        quiet_stderr(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        func()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def gradient(problem: Problem):
    """Return a function that evaluates one gradient on the problem's mini-batch."""

    def func():
        loss = problem.loss_func(problem.model(problem.X), problem.y)
        torch.autograd.grad(loss, problem.params)

    return func


def measure_products(
    problem: Problem,
    op,
    repeats: int,
    precompute=None,
    metrics=("precompute", "matvec", "per col.", "memory"),
) -> dict[str, tuple[float, float]]:
    """Time an operator's products on a problem, and their memory.

    Args:
        problem: The problem (for the gradient the figures are relative to).
        op: The operator.
        repeats: Rounds per timing.
        precompute: One-off work before products (timed as ``precompute``).
        metrics: Which figures to measure.

    Returns:
        Per metric, the value (seconds or bytes) and its ratio to one gradient's;
        ``col/vec`` is the ratio of the per-column cost to the matvec's.
    """
    device, result = problem.device, {}
    grad = gradient(problem)
    if precompute is not None and "precompute" in metrics:
        result["precompute"] = timed_ratio(
            lambda: precompute(op), grad, repeats, 1, device
        )
    elif precompute is not None:
        precompute(op)
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(op.shape[1], generator=generator).to(device, op.dtype)
    M = torch.randn(op.shape[1], NUM_COLUMNS, generator=generator)
    M = M.to(device, op.dtype)
    if "matvec" in metrics:
        result["matvec"] = timed_ratio(lambda: op @ v, grad, repeats, device=device)
    if "per col." in metrics:
        seconds, ratio = timed_ratio(lambda: op @ M, grad, repeats, device=device)
        result["per col."] = (seconds / NUM_COLUMNS, ratio / NUM_COLUMNS)
        if "matvec" in result:
            vec_seconds, vec_ratio = result["matvec"]
            result["col/vec"] = (
                seconds / NUM_COLUMNS / vec_seconds,
                ratio / NUM_COLUMNS / vec_ratio,
            )
    if "memory" in metrics:
        memory = peak_memory(lambda: op @ v, device)
        result["memory"] = (memory, memory / peak_memory(grad, device))
    return result
