"""Check which products ``torch.compile`` handles, and what it gains.

For each operator, compile ``lambda v: op @ v`` (one pass over the problem's single
mini-batch). Report the number of graph breaks ``torch._dynamo.explain`` finds,
whether the compiled function runs and agrees with eager mode, and the median times
of both.

Curvature products call ``torch.autograd.grad``, which dynamo traces into the graph
only with ``torch._dynamo.config.trace_autograd_ops = True`` (otherwise every call is
a graph break, and the Hessian's double backward cannot compile). The script sets it,
as users who compile products should.

Usage: ``python benchmarks/compile.py [--problems mlp] [--operators ggn jacobian]``
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from measure import timed  # noqa: E402
from operators import OPERATORS  # noqa: E402
from problems import PROBLEMS, Problem  # noqa: E402

COMPILED_OPERATORS = [
    "hessian",
    "ggn",
    "ef",
    "mc_fisher",
    "jacobian",
    "transposed_jacobian",
]


def product(problem: Problem, name: str):
    """Return a vector and the operator's product with it, as a function."""
    op = OPERATORS[name](problem)
    return (lambda v: op @ v), torch.randn(op.shape[1], generator=torch.Generator())


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Compare two float32 results relative to their largest entry."""
    return ((a - b).abs().max() <= 1e-4 * b.abs().max()).item()


def check(problem: Problem, name: str, repeats: int) -> str:
    """Explain, compile, verify and time one operator's per-batch product."""
    func, v = product(problem, name)
    args = [v]
    torch._dynamo.reset()
    breaks = torch._dynamo.explain(func)(*args).graph_break_count
    torch._dynamo.reset()
    compiled = torch.compile(func)
    try:
        correct = close(compiled(*args), func(*args))
    except Exception as error:  # report why PyTorch cannot compile it
        reason = str(error).strip().splitlines()[0][:70]
        return f"{breaks:>7} {'fails':>9}   {reason}"
    eager_time = timed(lambda: func(*args), repeats)
    compiled_time = timed(lambda: compiled(*args), repeats)
    return (
        f"{breaks:>7} {'agrees' if correct else 'DIFFERS':>9} "
        f"{1e3 * eager_time:>10.2f} {1e3 * compiled_time:>10.2f} "
        f"{eager_time / compiled_time:>8.2f}"
    )


def main():
    """Run the checks and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["mlp", "transformer"])
    parser.add_argument("--operators", nargs="+", default=COMPILED_OPERATORS)
    parser.add_argument(
        "--repeats", type=int, default=int(os.environ.get("REPEATS", 5))
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch._dynamo.config.trace_autograd_ops = True
    print(f"torch {torch.__version__}: torch.compile of the per-batch products")
    header = (
        f"{'problem':<12} {'operator':<20} {'breaks':>7} {'compiled':>9} "
        f"{'eager ms':>10} {'comp. ms':>10} {'speedup':>8}"
    )
    print(header + "\n" + "-" * len(header))
    for problem_name in args.problems:
        problem = PROBLEMS[problem_name]()
        for name in args.operators:
            print(f"{problem_name:<12} {name:<20} {check(problem, name, args.repeats)}")


if __name__ == "__main__":
    main()
