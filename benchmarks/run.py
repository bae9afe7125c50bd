"""Measure curvature products as multiples of one gradient evaluation.

For every problem and operator, report the median time (over ``--repeats`` runs) of

- ``matvec``: one product with a vector,
- ``matmat/col``: one product with an 8-column matrix, divided by 8,
- ``precompute``: one-off work such as Kronecker factors (if any),

each divided by the median time of one gradient on the same mini-batch, measured in
the same run. Prints a table and writes ``benchmarks/results/results.json``.

Usage: ``python benchmarks/run.py [--problems mlp cnn] [--operators hessian ggn]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from statistics import median
from time import perf_counter

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from operators import OPERATORS, PRECOMPUTE  # noqa: E402
from problems import PROBLEMS, Problem  # noqa: E402

NUM_COLUMNS = 8
RESULTS_DIR = Path(__file__).parent / "results"


def timed(func, repeats: int, warmup: int = 2) -> float:
    """Return the median wall-clock time of ``func()`` in seconds."""
    for _ in range(warmup):
        func()
    times = []
    for _ in range(repeats):
        start = perf_counter()
        func()
        times.append(perf_counter() - start)
    return median(times)


def gradient_time(problem: Problem, repeats: int) -> float:
    """Time one gradient of the loss on the problem's mini-batch."""

    def gradient():
        loss = problem.loss_func(problem.model(problem.X), problem.y)
        torch.autograd.grad(loss, problem.params)

    return timed(gradient, repeats)


def measure(problem: Problem, name: str, repeats: int) -> dict[str, float]:
    """Time an operator's products on a problem (seconds)."""
    op = OPERATORS[name](problem)
    result = {}
    if name in PRECOMPUTE:
        result["precompute"] = timed(lambda: PRECOMPUTE[name](op), repeats, warmup=1)
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(op.shape[1], generator=generator)
    M = torch.randn(op.shape[1], NUM_COLUMNS, generator=generator)
    result["matvec"] = timed(lambda: op @ v, repeats)
    result["matmat/col"] = timed(lambda: op @ M, repeats) / NUM_COLUMNS
    return result


def _row(problem: str, operator: str, metric: str, seconds: float, ratio: float):
    """Format one line of the results table."""
    name = f"{problem:<12} {operator:<12} {metric:<11}"
    return f"{name} {1e3 * seconds:>10.2f} {ratio:>7.2f}"


def main():
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS))
    parser.add_argument("--operators", nargs="+", default=list(OPERATORS))
    parser.add_argument(
        "--repeats", type=int, default=int(os.environ.get("REPEATS", 7))
    )
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    results = {}
    header = (
        f"{'problem':<12} {'operator':<12} {'metric':<11} {'time [ms]':>10} "
        f"{'x grad':>7}"
    )
    print(header)
    print("-" * len(header))
    for problem_name in args.problems:
        problem = PROBLEMS[problem_name]()
        t_grad = gradient_time(problem, args.repeats)
        results[problem_name] = {"gradient_s": t_grad, "operators": {}}
        print(_row(problem_name, "gradient", "", t_grad, 1.0))
        for name in args.operators:
            timings = measure(problem, name, args.repeats)
            results[problem_name]["operators"][name] = {
                metric: {"seconds": t, "ratio_to_gradient": t / t_grad}
                for metric, t in timings.items()
            }
            for metric, t in timings.items():
                print(_row(problem_name, name, metric, t, t / t_grad))
    RESULTS_DIR.mkdir(exist_ok=True)
    with open(RESULTS_DIR / "results.json", "w") as file:
        json.dump(results, file, indent=2)
    print(f"Wrote {RESULTS_DIR / 'results.json'}")


if __name__ == "__main__":
    main()
