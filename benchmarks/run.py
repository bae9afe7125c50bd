"""Measure curvature products as multiples of one gradient evaluation.

For every problem and operator, report the median time (over ``--repeats`` runs) of

- ``precompute``: one-off work (Kronecker factors; EKFAC's eigendecompositions and
  eigenvalue correction; the KFAC inverse's inverted factors),
- ``matvec``: one product with a vector,
- ``matmat/col``: one product with an 8-column matrix, divided by 8,
- ``memory``: the peak memory allocated during one matvec,

each divided by the same quantity for one gradient on the same mini-batch. Time
ratios are medians of per-round ratios, each round timing one gradient right before
the measured call, so that a machine whose speed drifts (shared cores) biases
numerator and denominator alike. Prints a table that marks the targets, writes
``benchmarks/results/results.json`` and plots ``benchmarks/results/ratios.png``.

Usage: ``python benchmarks/run.py [--problems mlp cnn] [--operators hessian ggn]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from time import perf_counter

import torch
from torch.profiler import ProfilerActivity, profile

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from operators import OPERATORS, PRECOMPUTE  # noqa: E402
from problems import PROBLEMS, Problem  # noqa: E402

NUM_COLUMNS = 8
RESULTS_DIR = Path(__file__).parent / "results"
METRICS = ("precompute", "matvec", "matmat/col", "memory")

# Targets (multiples of one gradient) from the performance issue.
TARGETS = {
    "hessian": {"matvec": 2.0},
    "ggn": {"matvec": 1.6},
    "ef": {"matvec": 1.6},
    "mc_fisher": {"matvec": 1.6},
    "jacobian": {"matvec": 1.2},
    "transposed_jacobian": {"matvec": 1.2},
    "kfac": {"matvec": 0.2, "precompute": 1.5},
    "ekfac": {"precompute": 3.0},
}
MATMAT_TARGET, MEMORY_TARGET = 0.8, 2.0
KRONECKER = {"kfac", "ekfac", "kfac_inverse"}  # products need no backpropagation
CPU = torch.device("cpu")


def synchronize(device: torch.device):
    """Wait for queued GPU work, so that timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(func, device: torch.device = CPU) -> float:
    """Return the wall-clock time of one call ``func()`` in seconds."""
    synchronize(device)
    start = perf_counter()
    func()
    synchronize(device)
    return perf_counter() - start


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


def gradient_time(problem: Problem, repeats: int) -> float:
    """Time one gradient of the loss on the problem's mini-batch."""
    return timed(gradient(problem), repeats, device=problem.device)


def measure(problem: Problem, name: str, repeats: int) -> dict[str, tuple]:
    """Time an operator's products on a problem, and its memory.

    Returns:
        Per metric, the value (seconds or bytes) and its ratio to one gradient's.
    """
    op = OPERATORS[name](problem)
    device, result = problem.device, {}
    grad = gradient(problem)
    if name in PRECOMPUTE:
        precompute = PRECOMPUTE[name]
        result["precompute"] = timed_ratio(
            lambda: precompute(op), grad, repeats, 1, device
        )
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(op.shape[1], generator=generator).to(device, op.dtype)
    M = torch.randn(op.shape[1], NUM_COLUMNS, generator=generator).to(device, op.dtype)
    result["matvec"] = timed_ratio(lambda: op @ v, grad, repeats, device=device)
    seconds, ratio = timed_ratio(lambda: op @ M, grad, repeats, device=device)
    result["matmat/col"] = (seconds / NUM_COLUMNS, ratio / NUM_COLUMNS)
    memory = peak_memory(lambda: op @ v, device)
    result["memory"] = (memory, memory / peak_memory(grad, device))
    return result


def target(name: str, metric: str) -> float | None:
    """Return the target ratio of a metric, if there is one."""
    if metric == "matmat/col" and name not in KRONECKER:
        return MATMAT_TARGET
    if metric == "memory" and name not in KRONECKER:
        return MEMORY_TARGET
    return TARGETS.get(name, {}).get(metric)


def format_ratio(ratio: float | None, goal: float | None) -> str:
    """Format a ratio with a mark whether it meets its target."""
    if ratio is None:
        return f"{'':>9}"
    mark = "" if goal is None else (" ok" if ratio <= goal else " >")
    return f"{ratio:6.2f}{mark:<3}"


def plot(results: dict, path: Path):
    """Plot matvec and per-column costs of every operator, one panel per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4))
    axes = axes if len(results) > 1 else [axes]
    for ax, (problem, entry) in zip(axes, results.items()):
        names = list(entry["operators"])
        for offset, metric in [(-0.2, "matvec"), (0.2, "matmat/col")]:
            ratios = [entry["operators"][n][metric]["ratio"] for n in names]
            ax.bar([i + offset for i in range(len(names))], ratios, 0.4, label=metric)
        ax.axhline(1.0, color="black", linewidth=0.8, label="one gradient")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(problem)
        ax.set_ylabel("cost / gradient")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    """Run the benchmark, print the table, write JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_problems = [p for p in PROBLEMS if p != "resnet18"]
    if torch.cuda.is_available():
        default_problems.append("resnet18")
    parser.add_argument("--problems", nargs="+", default=default_problems)
    parser.add_argument("--operators", nargs="+", default=list(OPERATORS))
    parser.add_argument(
        "--repeats", type=int, default=int(os.environ.get("REPEATS", 7))
    )
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"multiples of one gradient; median of {args.repeats} runs; 'ok'/'>': target")
    header = f"{'problem':<12} {'operator':<20}" + "".join(f"{m:>12}" for m in METRICS)
    print(header + "\n" + "-" * len(header))
    results = {}
    for problem_name in args.problems:
        problem = PROBLEMS[problem_name]()
        grad_time = gradient_time(problem, args.repeats)
        grad_memory = peak_memory(gradient(problem), problem.device)
        results[problem_name] = {
            "device": str(problem.device),
            "gradient": {"seconds": grad_time, "memory_bytes": grad_memory},
            "operators": {},
        }
        print(
            f"{problem_name:<12} {'gradient':<20}{'':>12}{1e3 * grad_time:>9.2f} ms"
            f"{'':>12}{grad_memory / 2**20:>9.1f} MB"
        )
        for name in args.operators:
            values = measure(problem, name, args.repeats)
            entry = {
                metric: {"value": value, "ratio": ratio, "target": target(name, metric)}
                for metric, (value, ratio) in values.items()
            }
            results[problem_name]["operators"][name] = entry
            cells = []
            for metric in METRICS:
                e = entry.get(metric, {})
                cells.append(format_ratio(e.get("ratio"), e.get("target")))
            print(f"{problem_name:<12} {name:<20}" + "".join(f"{c:>12}" for c in cells))
    RESULTS_DIR.mkdir(exist_ok=True)
    with open(RESULTS_DIR / "results.json", "w") as file:
        json.dump(results, file, indent=2)
    plot(results, RESULTS_DIR / "ratios.png")
    print(f"Wrote {RESULTS_DIR / 'results.json'} and {RESULTS_DIR / 'ratios.png'}")


if __name__ == "__main__":
    main()
